"""Questions and long descriptive answers about a Scene, from a varied grammar, and their parser.

The answer depends on the clip: which objects there are, what each does, which events happen and
when. Its form varies too: the order objects are described in (as listed, left to right, largest
first, or by when they show up), several phrasings of every sentence, and closing remarks that
depend on what happened. Every answer is 40-120 words. The wording of a clip's answer is drawn from
a generator seeded by the clip's seed, so (seed -> question, answer) is deterministic.

`parse_answer` reads per-object attributes back out of any text in this grammar (the target's
greedy answers included); target.score_answer compares them to Scene.attributes().

Every object is described in one sentence that starts with its first mention,
"<size> <colour> <shape>"; later mentions (collisions, closing remarks) never carry the size.
"""

from __future__ import annotations

import re

import numpy as np

from sparrow.world.scene import COLOURS, OPPOSITE, SHAPES, Scene, phase_of

QUESTIONS = (
    "describe the video in detail .",
    "what happens in this video ?",
    "describe what you see in the clip .",
    "tell me about the shapes in this video and what they do .",
    "can you describe the scene and the motion of each object ?",
    "give a detailed description of the clip .",
    "what do the shapes in the video do ?",
    "please explain what is going on in this clip .",
)
MAX_WORDS = 120  # closing remarks stop here (object sentences are always kept)
COUNT = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
LOCATION = {
    "top left": "top left corner", "top": "top edge", "top right": "top right corner",
    "left": "left side", "center": "center", "right": "right side",
    "bottom left": "bottom left corner", "bottom": "bottom edge", "bottom right": "bottom right corner",
}
DIR_PHRASES = {
    "left": ("to the left", "toward the left"),
    "right": ("to the right", "toward the right"),
    "up": ("upward", "toward the top"),
    "down": ("downward", "toward the bottom"),
}
PHASES = {
    "early": ("early in the clip", "near the beginning"),
    "midway": ("halfway through", "in the middle of the clip"),
    "late": ("near the end", "late in the clip"),
}
EDGE_WORD = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}
MOVE_VERBS = ("moves", "slides", "travels", "glides")
ORDINALS = {
    "first": ("first", "to begin with"),
    "middle": ("next", "then", "also", "in addition"),
    "last": ("finally", "lastly"),
}


class _Pick:
    """Draws phrasings from a numpy generator (deterministic per seed)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def make_question(seed: int) -> str:
    return QUESTIONS[int(np.random.default_rng([seed, 0xA5C]).integers(len(QUESTIONS)))]


def _name(o) -> str:
    return f"{o.colour} {o.shape}"


def _motion_phrase(scene: Scene, i: int, pick: _Pick) -> str:
    """Verb phrase of what object i does, events included (no subject)."""
    o = scene.objects[i]
    if o.direction is None:
        still = pick(("stays in place", "does not move at all", "remains still for the whole clip"))
        if o.spin:
            still += pick((" but keeps spinning", " , rotating around its center"))
        return still
    adv = "slowly" if o.speed == "slow" else "quickly"
    verb = pick(MOVE_VERBS)
    dirp = pick(DIR_PHRASES[o.direction])
    core = pick((f"{verb} {adv} {dirp}", f"{adv} {verb} {dirp}"))
    if o.spin:
        core += pick((" while spinning", " , rotating as it goes"))
    if o.story == "turn":
        ph = pick(PHASES[phase_of(o.turn_t)])
        back = pick(DIR_PHRASES[OPPOSITE[o.direction]])
        core += pick((f" , then turns around {ph} and moves back {back}",
                      f" , but {ph} it reverses direction and heads {back}"))
    elif o.story == "collide":
        p = scene.objects[o.partner]
        ph = pick(PHASES[phase_of(o.turn_t)])
        back = pick(DIR_PHRASES[OPPOSITE[o.direction]])
        core += pick((f" , hits the {_name(p)} {ph} and bounces back {back}",
                      f" until it collides with the {_name(p)} {ph} and bounces {back}"))
    if o.leave_t is not None:
        edge = {"left": "left", "right": "right", "up": "top", "down": "bottom"}[o.direction]
        ph = pick(PHASES[phase_of(o.leave_t)])
        core += pick((f" and leaves the frame through the {edge} edge {ph}",
                      f" until it exits on the {edge} side {ph}"))
    return core


def _object_sentence(scene: Scene, i: int, ordinal: str, pick: _Pick) -> str:
    o = scene.objects[i]
    mention = f"{o.size} {o.colour} {o.shape}"
    loc = LOCATION[o.start_location()]
    motion = _motion_phrase(scene, i, pick)
    if o.appear_t > 0:
        ph = pick(PHASES[phase_of(o.appear_t)])
        forms = (
            f"{ordinal} , a {mention} appears {ph} near the {loc} and {motion} .",
            f"{ordinal} , a {mention} only shows up {ph} , near the {loc} , and {motion} .",
        )
    else:
        forms = (
            f"{ordinal} , there is a {mention} near the {loc} that {motion} .",
            f"{ordinal} , a {mention} starts near the {loc} and {motion} .",
            f"{ordinal} , the {mention} begins near the {loc} and {motion} .",
        )
    return pick(forms)


def _order(scene: Scene, pick: _Pick) -> list[int]:
    n = len(scene.objects)
    objs = scene.objects
    rule = pick(("listed", "left_to_right", "largest_first", "appearance"))
    if rule == "left_to_right":
        return sorted(range(n), key=lambda i: (objs[i].position(objs[i].appear_t)[0], i))
    if rule == "largest_first":
        return sorted(range(n), key=lambda i: (-objs[i].radius, i))
    if rule == "appearance":
        return sorted(range(n), key=lambda i: (objs[i].appear_t, i))
    return list(range(n))


def _closing(scene: Scene, pick: _Pick) -> list[str]:
    objs = scene.objects
    n = len(objs)
    out = []
    pair = next((o for o in objs if o.story == "collide"), None)
    if pair is not None:
        p = objs[pair.partner]
        out.append(pick((f"the collision between the {_name(pair)} and the {_name(p)} is the main event of the video .",
                         f"the most interesting moment is when the {_name(pair)} and the {_name(p)} bump into each other .")))
    elif n > 1:
        out.append(pick(("none of the shapes touch each other .", "the shapes never collide .")))
    visible_end = sum(o.visible(1.0) for o in objs)
    if visible_end < n:
        k = "no shape is" if visible_end == 0 else (
            "only one shape is" if visible_end == 1 else f"only {COUNT[visible_end]} shapes are")
        out.append(pick((f"by the last frame , {k} still visible .", f"at the end of the video , {k} left on screen .")))
    elif n > 1 and pick.chance(0.5):
        out.append(pick(("all of the shapes are still visible at the end .", "every shape stays on screen until the end .")))
    if n > 1 and len({o.size for o in objs}) > 1 and pick.chance(0.6):
        big = max(objs, key=lambda o: o.radius)
        out.append(pick((f"the largest shape is the {_name(big)} .", f"the {_name(big)} is the biggest object in the scene .")))
    moving = sum(o.direction is not None for o in objs)
    if n > 1 and 0 < moving < n and pick.chance(0.6):
        out.append(f"only one of the {COUNT[n]} shapes moves , and the rest stay still ." if moving == 1
                   else f"{COUNT[moving]} of the {COUNT[n]} shapes move , and the rest stay still .")
    if n == 1:
        out.append(pick(("nothing else happens in the video .", "there is nothing else in the scene .")))
        out.append(pick(("the background stays the same the whole time .", "the camera does not move .")))
    return out


def describe(scene: Scene, seed: int | None = None) -> str:
    """The reference answer of a scene (deterministic for a seed; default: the scene's seed)."""
    pick = _Pick(np.random.default_rng([scene.seed if seed is None else seed, 0xD35]))
    n = len(scene.objects)
    bg = scene.background
    if n == 1:
        intro = pick((f"the video shows a single shape on a {bg} background .",
                      f"in this clip , there is only one object , shown on a plain {bg} background .",
                      f"this short video contains just one shape in front of a {bg} background ."))
    else:
        N = COUNT[n]
        intro = pick((f"the video shows {N} shapes on a {bg} background .",
                      f"in this clip , {N} colored shapes move around on a {bg} background .",
                      f"this short video contains {N} objects in front of a plain {bg} background .",
                      f"there are {N} shapes in the video , and the background is {bg} ."))
    parts = [intro]
    order = _order(scene, pick)
    for k, i in enumerate(order):
        if n == 1:
            ordinal = pick(("here", "in the clip"))
        else:
            ordinal = pick(ORDINALS["first" if k == 0 else ("last" if k == n - 1 else "middle")])
        parts.append(_object_sentence(scene, i, ordinal, pick))
    words = sum(len(p.split()) for p in parts)
    for sentence in _closing(scene, pick):  # closing remarks while the answer stays <= MAX_WORDS
        if words + len(sentence.split()) > MAX_WORDS:
            break
        parts.append(sentence)
        words += len(sentence.split())
    return " ".join(parts)


AUX_QUESTIONS = {
    "inventory": ("list the shapes in the video .", "which shapes are in the clip ?"),
    "motion": ("how does each shape move ?", "in which direction does each shape move ?"),
}


def aux_qa(scene: Scene, kind: str) -> tuple[str, str]:
    """Short training-only questions that name each object ("inventory") or its motion ("motion"),
    objects in colour order. They concentrate the loss on the words the video decides."""
    pick = _Pick(np.random.default_rng([scene.seed, 0xA0C]))
    objs = sorted(scene.objects, key=lambda o: (list(COLOURS).index(o.colour), SHAPES.index(o.shape)))
    if kind == "inventory":
        names = [f"a {o.size} {o.colour} {o.shape}" for o in objs]
        listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
        return pick(AUX_QUESTIONS[kind]), f"there {'is' if len(names) == 1 else 'are'} {listed} ."
    parts = []
    for o in objs:
        if o.direction is None:
            parts.append(f"the {_name(o)} stays in place .")
        else:
            adv = "slowly" if o.speed == "slow" else "quickly"
            parts.append(f"the {_name(o)} moves {adv} {DIR_PHRASES[o.direction][0]} .")
    return pick(AUX_QUESTIONS[kind]), " ".join(parts)


def make_qa(seed: int, scene: Scene | None = None) -> tuple[str, str]:
    from sparrow.world.scene import make_scene

    scene = make_scene(seed) if scene is None else scene
    return make_question(seed), describe(scene)


# -- parsing ---------------------------------------------------------------------------------

_MENTION = re.compile(r"\b(small|large) (%s) (%s)\b" % ("|".join(COLOURS), "|".join(SHAPES)))
_LOC = re.compile(r"near the (top left|top right|bottom left|bottom right|top|bottom|left|right|center)")
_VERB = re.compile(r"\b(%s)\b" % "|".join(MOVE_VERBS))
_DIR = re.compile(r"(to the left|toward the left|to the right|toward the right|upward|toward the top|"
                  r"downward|toward the bottom)")
# the last word of a direction phrase -> the direction it says
DIRECTION_OF_WORD = {"left": "left", "right": "right", "upward": "up", "top": "up", "downward": "down", "bottom": "down"}


def parse_answer(text: str) -> list[dict]:
    """Per-object attributes stated in an answer, in the order the objects are described.

    Keys as in Scene.attributes(); an attribute the sentence does not state is None."""
    objs = []
    # no word contains "." or "?"; the tokenizer's decode glues them to the word before ("clip.")
    for sent in re.split(r"[.?]", text):
        m = _MENTION.search(sent)
        if m is None:
            continue
        rest = sent[m.end():]
        loc = _LOC.search(rest)
        start = None
        if loc:
            start = loc.group(1)
        motion = None
        if re.search(r"stays in place|does not move|remains still", rest):
            motion = "still"
        else:
            v = _VERB.search(rest)
            if v:
                d = _DIR.search(rest, v.end())
                if d:
                    motion = DIRECTION_OF_WORD[d.group(1).split()[-1]]
        speed = "slow" if "slowly" in rest else ("fast" if "quickly" in rest else ("none" if motion == "still" else None))
        objs.append({
            "colour": m.group(2), "shape": m.group(3), "size": m.group(1), "motion": motion, "speed": speed,
            "spin": bool(re.search(r"spinning|rotating", rest)), "start": start,
            "appear": bool(re.search(r"appears|shows up", rest)),
            "turn": bool(re.search(r"turns around|reverses direction", rest)),
            "collide": bool(re.search(r"hits the|collides with", rest)),
            "leave": bool(re.search(r"leaves the frame|exits on", rest)),
        })
    return objs
