#!/usr/bin/env python3
"""Can the world target's vision tower learn shapes? `python scripts/shape_learnability.py`

The shipped target names colours but not shapes, even teacher-forced (target.teacher_forced_reading).
This asks the vision tower alone, with no language model: it trains the target's architecture of
vision tower (random init, ModelConfig) plus a linear head on the shape of the object centred in
each visual token's cell (token_labels.py), and, for comparison, a 3-layer CNN on the first frame
of the same cells' pixels. Both see about the same number of labelled cells; both are scored on
cells of clips they did not train on.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparrow.world import build_vocab, make_scene, render  # noqa: E402
from sparrow.world.render import TEMPORAL_PATCH, UNIT  # noqa: E402
from sparrow.world.target import ModelConfig, build_model, vision_inputs  # noqa: E402
from sparrow.world.token_labels import token_labels  # noqa: E402

SHAPE = 1  # token_labels column


def clip(seed: int, frames: int, height: int):
    scene = make_scene(seed)
    return render(scene, frames, height), token_labels(scene, frames, height)


def vision_tower(args) -> float:
    """Held-out shape accuracy of the target's vision tower + linear head, trained on shape alone."""
    model = build_model(build_vocab(), ModelConfig(), seed=0)
    tower, head = model.model.visual, torch.nn.Linear(ModelConfig().hidden_size, 5)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=args.lr)

    def run(seeds, train: bool) -> tuple[int, int]:
        pixels, grid, lab = vision_inputs([(s, args.frames, args.height) for s in seeds])
        with torch.set_grad_enabled(train):
            embeds = tower(pixels, grid_thw=grid).pooler_output
            on = lab[:, 0] > 0
            logits = head(embeds[on])
            if train:
                F.cross_entropy(logits, lab[on, SHAPE]).backward()
                opt.step()
                opt.zero_grad()
        return int((logits.argmax(-1) == lab[on, SHAPE]).sum()), int(on.sum())

    t0, seen = time.time(), 0
    for step in range(args.steps):
        seen += run(range(1_000_000 + step * args.clips, 1_000_000 + (step + 1) * args.clips), True)[1]
        if (step + 1) % 100 == 0:
            print(f"  vision tower step {step + 1}: {seen} cells seen, {time.time() - t0:.0f}s", flush=True)
    hits, total = zip(*(run(range(s, s + args.clips), False) for s in range(9_000_000, 9_000_000 + 200, args.clips)))
    return sum(hits) / sum(total), seen


def cnn(args, cells: int) -> float:
    """Held-out shape accuracy of a small CNN on the first frame of each labelled cell's pixels."""
    xs, ys, seed = [], [], 2_000_000
    side = args.height // UNIT  # cells per row and per column
    while len(xs) < cells:
        frames, lab = clip(seed, args.frames, args.height)
        lab = lab.reshape(-1, side, side, lab.shape[-1])
        for p, r, c in torch.nonzero(lab[..., 0] > 0).tolist():
            xs.append(frames[TEMPORAL_PATCH * p, r * UNIT:(r + 1) * UNIT, c * UNIT:(c + 1) * UNIT])
            ys.append(int(lab[p, r, c, SHAPE]))
        seed += 1
    x = torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    y = torch.tensor(ys)
    train = int(0.8 * len(x))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(args.cnn_steps):
        i = torch.randint(0, train, (128,))
        F.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return float((net(x[train:]).argmax(-1) == y[train:]).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="vision tower steps")
    ap.add_argument("--clips", type=int, default=8, help="clips per vision tower step")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=112)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cnn-steps", type=int, default=600, help="CNN steps of 128 cells")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit, seen = vision_tower(args)
    print(f"vision tower (target architecture): held-out shape accuracy {vit:.2f} after {seen} cells", flush=True)
    small = cnn(args, cells=12_000)
    print(f"3-layer CNN: held-out shape accuracy {small:.2f} after {args.cnn_steps * 128} cells "
          f"(chance 0.25: four shapes, evenly drawn)", flush=True)


if __name__ == "__main__":
    main()
