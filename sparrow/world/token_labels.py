"""Ground truth per visual token, for the vision tower's auxiliary loss while training the target.

A caption loss alone teaches a small random-init VLM its grammar long before it teaches it to look:
the words the video decides are a few percent of the answer. The renderer knows what every visual
token shows, so training also asks a linear probe on the merger's output (the embeddings the
language model reads) to name, per visual token, the object centred in its 28x28 cell during its
frame pair: colour, shape, size and current direction of motion. The probe is dropped after
training; the shipped model is the plain Qwen2.5-VL architecture.

    token_labels(scene, frames, height, width) -> LongTensor [visual_tokens, 4]

Columns (0 = no object centred in the cell):
    colour     1 + index in scene.COLOURS
    shape      1 + index in scene.SHAPES
    size       1 small, 2 large
    direction  1 still, 2 left, 3 right, 4 up, 5 down (the direction it moves in at that time)
Token order is the merger's: frame pair, then row, then column (processor.patchify's order).
"""

from __future__ import annotations

import torch

from sparrow.world.render import TEMPORAL_PATCH, UNIT, check_size
from sparrow.world.scene import COLOURS, DIRECTIONS, SHAPES, Scene

NUM_CLASSES = (1 + len(COLOURS), 1 + len(SHAPES), 3, 2 + len(DIRECTIONS))
_DIRECTION_CODE = {d: 2 + i for i, d in enumerate(DIRECTIONS)}


def _direction_at(o, t: float) -> int:
    if o.direction is None:
        return 1
    eps = 1e-3
    (xa, ya), (xb, yb) = o.position(max(0.0, t - eps)), o.position(min(1.0, t + eps))
    dx, dy = xb - xa, yb - ya
    if abs(dx) >= abs(dy):
        return _DIRECTION_CODE["right" if dx > 0 else "left"]
    return _DIRECTION_CODE["down" if dy > 0 else "up"]


def token_labels(scene: Scene, frames: int, height: int, width: int | None = None) -> torch.Tensor:
    """[ceil(frames/2) * (height/28) * (width/28), 4] int64 labels (see the module docstring)."""
    width = height if width is None else width
    check_size(height, width)
    rows, cols = height // UNIT, width // UNIT
    pairs = -(-frames // TEMPORAL_PATCH)
    times = [0.0] if frames == 1 else [i / (frames - 1) for i in range(frames)]
    out = torch.zeros(pairs, rows, cols, 4, dtype=torch.long)
    for p in range(pairs):
        # an odd frame count repeats the last frame (processor.patchify)
        pair = times[TEMPORAL_PATCH * p:TEMPORAL_PATCH * (p + 1)]
        t = sum(pair) / len(pair)
        for o in scene.objects:
            if not o.visible(t):
                continue
            x, y = o.position(t)
            r, c = int(y * rows), int(x * cols)
            if 0 <= r < rows and 0 <= c < cols:
                out[p, r, c] = torch.tensor([1 + list(COLOURS).index(o.colour), 1 + SHAPES.index(o.shape),
                                             1 if o.size == "small" else 2, _direction_at(o, t)])
    return out.reshape(-1, 4)
