"""Procedural clips: coloured shapes that move, spin, turn around, appear, collide and leave.

A `Scene` is pure ground truth in normalised units: the canvas is the unit square (x to the right,
y downwards), the clip lasts from time 0 to time 1. Rendering (render.py) samples it at any frame
count and resolution, so one scene can be shown at many visual lengths.

Every object follows one scripted story, chosen so that the ground truth is unambiguous:
  still        stays where it is (it may spin)
  move         moves in a straight line (left/right/up/down), slowly or quickly
  leave        moves towards an edge and leaves the frame before the end
  turn         moves, then turns around halfway and comes back
  appear       pops into view part way through, then moves or stays still
  collide      two objects on one lane move towards each other, touch, and both bounce back
Objects that are not a collision pair never touch (scenes are re-drawn until that holds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 215),
    "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (12, 12, 16), "gray": (105, 105, 110), "brown": (80, 50, 30)}
SIZES = {"small": (0.075, 0.09), "large": (0.12, 0.14)}  # radius ranges (unit canvas)
SPEEDS = {"slow": (0.25, 0.35), "fast": (0.55, 0.75)}  # distance per clip (unit canvas)
SPEED_SPLIT = 0.45  # distance per clip below which a mover is called slow
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
STORIES = ("still", "move", "leave", "turn", "appear")
EDGE_OF = {"left": "left", "right": "right", "up": "top", "down": "bottom"}


def phase_of(t: float) -> str:
    """When something happens, in words the grammar uses: early / midway / late."""
    return "early" if t < 0.4 else ("midway" if t < 0.65 else "late")


def location_of(x: float, y: float) -> str:
    """3x3 grid cell of a point: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    col = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    row = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    return (row + " " + col).strip() or "center"


@dataclass
class Obj:
    shape: str
    colour: str
    size: str  # "small" | "large"
    radius: float
    x0: float  # centre at time 0 (or at appearance, extrapolated back to time 0 for movers)
    y0: float
    story: str  # one of STORIES or "collide"
    direction: str | None = None  # initial direction of motion (None: still)
    speed: str | None = None  # "slow" | "fast" (None: still)
    v: float = 0.0  # distance per clip
    spin: float = 0.0  # radians per clip (0: no spin)
    angle0: float = 0.0
    appear_t: float = 0.0  # visible from this time on
    turn_t: float | None = None  # reverses direction at this time (turn, collide)
    leave_t: float | None = None  # has fully left the frame at this time
    partner: int | None = None  # index of the other object of a collision

    # -- kinematics ---------------------------------------------------------------------------
    def position(self, t: float) -> tuple[float, float]:
        if self.direction is None:
            return self.x0, self.y0
        dx, dy = DIRECTIONS[self.direction]
        if self.turn_t is None or t <= self.turn_t:
            s = self.v * t
        else:
            s = self.v * self.turn_t - self.v * (t - self.turn_t)
        return self.x0 + dx * s, self.y0 + dy * s

    def visible(self, t: float) -> bool:
        if t < self.appear_t:
            return False
        x, y = self.position(t)
        r = self.radius
        return -r < x < 1 + r and -r < y < 1 + r

    def angle(self, t: float) -> float:
        return self.angle0 + self.spin * t

    def final_direction(self) -> str | None:
        if self.direction is None:
            return None
        return OPPOSITE[self.direction] if self.turn_t is not None else self.direction

    def start_location(self) -> str:
        return location_of(*self.position(self.appear_t))

    def end_location(self) -> str:
        return location_of(*self.position(1.0))


@dataclass
class Scene:
    seed: int
    background: str
    objects: list[Obj] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "background": self.background, "objects": [asdict(o) for o in self.objects]}

    def events(self) -> list[dict]:
        """Ground-truth events in time order: dicts with kind, time, object index (and partner, edge)."""
        ev = []
        for i, o in enumerate(self.objects):
            if o.appear_t > 0:
                ev.append({"kind": "appear", "t": o.appear_t, "obj": i})
            if o.story == "turn":
                ev.append({"kind": "turn", "t": o.turn_t, "obj": i})
            if o.story == "collide" and o.partner is not None and i < o.partner:
                ev.append({"kind": "collide", "t": o.turn_t, "obj": i, "partner": o.partner})
            if o.leave_t is not None:
                ev.append({"kind": "leave", "t": o.leave_t, "obj": i, "edge": EDGE_OF[o.direction]})
        return sorted(ev, key=lambda e: (e["t"], e["obj"]))

    def attributes(self) -> list[dict]:
        """Per-object ground truth the scorer checks (see target.score_answer)."""
        out = []
        for o in self.objects:
            out.append({
                "colour": o.colour, "shape": o.shape, "size": o.size,
                "motion": o.direction or "still", "speed": o.speed or "none",
                "spin": o.spin != 0.0, "start": o.start_location(),
                "appear": o.appear_t > 0, "turn": o.story == "turn", "collide": o.story == "collide",
                "leave": o.leave_t is not None,
            })
        return out


# -- generation --------------------------------------------------------------------------------

def _uniform(rng, lo_hi):
    return float(rng.uniform(*lo_hi))


def _new_obj(rng, used: set) -> Obj:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        if (shape, colour) not in used:  # colour+shape names an object uniquely
            used.add((shape, colour))
            break
    size = "large" if rng.random() < 0.5 else "small"
    spin = 0.0
    if shape != "circle" and rng.random() < 0.3:
        spin = float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.0) * math.pi)
    return Obj(shape=shape, colour=colour, size=size, radius=_uniform(rng, SIZES[size]), x0=0.5,
               y0=0.5, story="still", spin=spin, angle0=float(rng.uniform(0, 2 * math.pi)) if spin else 0.0)


def _place_story(rng, o: Obj, story: str) -> None:
    """Choose start position, direction and speed for one object so its story holds."""
    r = o.radius
    o.story = story
    if story == "appear":
        o.appear_t = float(rng.uniform(0.25, 0.6))
        story = "move" if rng.random() < 0.5 else "still"
    if story == "still":
        o.x0, o.y0 = rng.uniform(r + 0.02, 1 - r - 0.02, size=2).tolist()
        return
    o.direction = list(DIRECTIONS)[rng.integers(4)]
    o.speed = "fast" if (story in ("leave", "turn") or rng.random() < 0.5) else "slow"
    o.v = _uniform(rng, SPEEDS[o.speed])
    dx, dy = DIRECTIONS[o.direction]
    # coordinate along the motion axis, measured in the direction of motion (a: 0 .. 1)
    if story == "leave":
        o.leave_t = float(rng.uniform(0.55, 0.9))
        a_end = 1 + r  # fully out at leave_t
        a0 = a_end - o.v * o.leave_t
        if a0 < r:  # too slow to leave from inside: go faster
            a0 = float(rng.uniform(r, 0.5))
            o.v = (a_end - a0) / o.leave_t
    elif story == "turn":
        o.turn_t = float(rng.uniform(0.35, 0.65))
        # along-axis path: a0 -> a0 + v*turn_t (the turning point) -> a0 + v*(2*turn_t - 1)
        o.v = min(o.v, (1 - 2 * r - 0.02) / max(o.turn_t, 1 - o.turn_t))
        lo = r + 0.01 + max(0.0, o.v * (1 - 2 * o.turn_t))
        hi = 1 - r - 0.01 - o.v * o.turn_t
        a0 = float(rng.uniform(lo, hi)) if hi > lo else lo
    else:  # move: whole path (appear_t .. 1) inside the frame
        span = o.v * (1 - o.appear_t) if o.appear_t else o.v
        lo, hi = r + 0.01, 1 - r - 0.01 - span
        if hi <= lo:
            o.v = (1 - 2 * r - 0.04) / max(1 - o.appear_t, 1e-3)
            hi = lo
        a_vis = float(rng.uniform(lo, hi)) if hi > lo else lo
        a0 = a_vis - o.v * o.appear_t
    cross = float(rng.uniform(r + 0.02, 1 - r - 0.02))
    along = a0 if (dx + dy) > 0 else 1 - a0
    if dx:
        o.x0, o.y0 = along, cross
    else:
        o.x0, o.y0 = cross, along


def _place_collision(rng, a: Obj, b: Obj, ia: int, ib: int) -> None:
    axis = "h" if rng.random() < 0.5 else "v"
    t_c = float(rng.uniform(0.35, 0.6))
    m = float(rng.uniform(0.42, 0.58))
    cross = float(rng.uniform(max(a.radius, b.radius) + 0.03, 1 - max(a.radius, b.radius) - 0.03))
    for o, sign, partner in ((a, 1, ib), (b, -1, ia)):
        o.story = "collide"
        o.partner = partner
        o.turn_t = t_c
        o.speed = "fast" if rng.random() < 0.5 else "slow"
        o.v = _uniform(rng, SPEEDS[o.speed])
        start = m - sign * (o.radius + o.v * t_c)
        start = min(max(start, o.radius + 0.005), 1 - o.radius - 0.005)
        o.v = abs(m - sign * o.radius - start) / t_c  # touch exactly at t_c
        if axis == "h":
            o.direction = "right" if sign > 0 else "left"
            o.x0, o.y0 = start, cross
        else:
            o.direction = "down" if sign > 0 else "up"
            o.x0, o.y0 = cross, start


def _clean(scene: Scene) -> bool:
    """No two objects overlap (collision pairs only touch); every object is visible for a while."""
    objs = scene.objects
    for t in np.linspace(0, 1, 41):
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                if not (a.visible(t) and b.visible(t)):
                    continue
                (xa, ya), (xb, yb) = a.position(t), b.position(t)
                gap = math.hypot(xa - xb, ya - yb) - a.radius * 1.15 - b.radius * 1.15
                if a.partner == j:
                    if gap < -0.25 * min(a.radius, b.radius):
                        return False
                elif gap < 0.03:
                    return False
    for o in objs:
        vis = sum(o.visible(t) for t in np.linspace(0, 1, 41))
        if vis < 8:
            return False
    return True


def make_scene(seed: int) -> Scene:
    """The scene of a seed: deterministic, and different seeds give different clips."""
    rng = np.random.default_rng([seed, 0x5A7])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.4, 0.3, 0.1]))
    while True:
        used: set = set()
        objs = [_new_obj(rng, used) for _ in range(n)]
        scene = Scene(seed=seed, background=background, objects=objs)
        pair = n >= 2 and rng.random() < 0.35
        start = 0
        if pair:
            _place_collision(rng, objs[0], objs[1], 0, 1)
            start = 2
        for o in objs[start:]:
            story = STORIES[rng.choice(len(STORIES), p=[0.2, 0.35, 0.15, 0.15, 0.15])]
            _place_story(rng, o, story)
        for o in objs:  # the speed word follows the speed actually used
            if o.direction is not None:
                o.speed = "slow" if o.v < SPEED_SPLIT else "fast"
        if _clean(scene):
            # listing order is not the order of the stories: shuffle so object 0 is not special
            perm = rng.permutation(n).tolist()
            inv = {old: new for new, old in enumerate(perm)}
            scene.objects = [objs[k] for k in perm]
            for o in scene.objects:
                if o.partner is not None:
                    o.partner = inv[o.partner]
            return scene
