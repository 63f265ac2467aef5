"""Render a Scene to frames: uint8 [T, H, W, 3].

Frame i shows the scene at time i / (T - 1), so the same scene can be drawn with any number of
frames and at any resolution; only the visual length changes. Shapes are drawn from signed distance
functions with a one-pixel soft edge (anti-aliased), so small motions between frames stay visible.

Visual length. Qwen2.5-VL cuts frames into 14x14-pixel patches, pairs frames in time
(temporal_patch_size 2) and merges 2x2 neighbouring patches, so the language model sees one visual
token per 28x28 pixels per 2 frames:

    visual_tokens(T, H, W) = ceil(T / 2) * (H / 28) * (W / 28)

    frames  resolution   visual tokens
       8    112 x 112          64
      16    224 x 224         512
      32    336 x 336        2304
      64    448 x 448        8192
      64    672 x 672       18432
H and W must be multiples of 28.
"""

from __future__ import annotations

import math

import numpy as np

from sparrow.world.scene import BACKGROUNDS, COLOURS, Obj, Scene

PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
UNIT = PATCH * MERGE  # 28 pixels per visual token side


def visual_tokens(frames: int, height: int, width: int) -> int:
    """Visual tokens of a clip: ceil(T/2) * (H/28) * (W/28) (see the module docstring)."""
    check_size(height, width)
    return -(-frames // TEMPORAL_PATCH) * (height // UNIT) * (width // UNIT)


def check_size(height: int, width: int) -> None:
    if height % UNIT or width % UNIT or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {UNIT}, got {height}x{width}")


def _sdf(o: Obj, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (canvas units) to the object's outline, in its own rotated frame (u, v)."""
    r = o.radius
    if o.shape == "circle":
        return np.sqrt(u * u + v * v) - r
    if o.shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
    if o.shape == "triangle":  # equilateral, apex up; inradius 0.6 r
        d = None
        for ang in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            h = u * math.cos(ang) + v * math.sin(ang)
            d = h if d is None else np.maximum(d, h)
        return d - 0.6 * r
    if o.shape == "cross":
        a, b = r, 0.36 * r
        bar1 = np.maximum(np.abs(u) - a, np.abs(v) - b)
        bar2 = np.maximum(np.abs(u) - b, np.abs(v) - a)
        return np.minimum(bar1, bar2)
    raise ValueError(f"unknown shape {o.shape!r}")


def render_frame(scene: Scene, t: float, height: int, width: int) -> np.ndarray:
    """One frame at time t in [0, 1]: uint8 [H, W, 3]."""
    scale = min(height, width)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], np.float32)
    for o in scene.objects:  # listing order is drawing order (they never overlap anyway)
        if not o.visible(t):
            continue
        cx, cy = o.position(t)
        # only the bounding box of the object is evaluated
        x0, x1 = np.searchsorted(xs, [cx - 1.6 * o.radius, cx + 1.6 * o.radius])
        y0, y1 = np.searchsorted(ys, [cy - 1.6 * o.radius, cy + 1.6 * o.radius])
        if x1 <= x0 or y1 <= y0:
            continue
        dx = xs[None, x0:x1] - cx
        dy = ys[y0:y1, None] - cy
        ang = o.angle(t)
        c, s = math.cos(ang), math.sin(ang)
        u, v = c * dx + s * dy, -s * dx + c * dy
        alpha = np.clip(0.5 - _sdf(o, u, v) * scale, 0.0, 1.0)[..., None]  # 1-pixel soft edge
        patch = img[y0:y1, x0:x1]
        patch += alpha * (np.asarray(COLOURS[o.colour], np.float32) - patch)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render(scene: Scene, frames: int = 8, height: int = 112, width: int | None = None) -> np.ndarray:
    """The clip as uint8 [T, H, W, 3]; frame i is the scene at time i / (T - 1)."""
    width = height if width is None else width
    check_size(height, width)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    times = [0.0] if frames == 1 else [i / (frames - 1) for i in range(frames)]
    return np.stack([render_frame(scene, t, height, width) for t in times])
