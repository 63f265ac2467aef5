#!/usr/bin/env python3
"""Build the demo's drafts against the world target: `python scripts/build_demo_drafts.py`.

Stages (each timed; all through the `sparrow` CLI, all seeded):
  1. records   held-out-from-the-target clips (seeds 5,000,000+) at mixed visual lengths, each with
               its question (a JSONL under --work)
  2. gen-data  the target answers each clip greedily (self-distillation: the draft learns the text
               the target really produces) and, reading prompt + answer once more, stores its
               features h, its layer-L/2 visual states and its visual input embeddings (for the
               MSD-style draft). One Hugging Face generate per clip, ~0.5 s each here.
  3. train     five drafts on the same data, same seed and schedule:
                 sparrow  visual_source none, IVSB + MTP      (the method)
                 msd      visual_source embed                 (MSD-style baseline)
                 no_vata  visual_source mid                   (ablation: attends to visual states)
                 no_ivsb  visual_source none, --no-ivsb       (ablation)
                 no_mtp   visual_source none, --no-mtp        (ablation)
  4. ship      each draft's fc + decoder layer (save_pretrained) stored in bfloat16 under
               --out/<name>/ (~1 MB each), plus --out/build_info.json: the target's weight hash, the
               settings, the time of every stage and each draft's final training figures.

The demo (python -m sparrow.demo) rebuilds the drafts when build_info.json names another target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRAIN_SEED0 = 5_000_000  # the target trains on seeds below 10M with seed 0 (~5k clips); eval uses 10M+
# (frames, height = width) of the training clips: 32 to 4096 visual tokens. The demo's longest
# clips (6144) stay beyond them, a test of how each draft extrapolates.
TRAIN_LENGTHS = ((4, 112), (16, 112), (8, 168), (4, 224), (16, 224), (32, 224), (64, 224), (128, 224))
DRAFTS = {
    "sparrow": [],
    "msd": ["--visual-source", "embed"],
    "no_vata": ["--visual-source", "mid"],
    "no_ivsb": ["--no-ivsb"],
    "no_mtp": ["--no-mtp"],
}


def write_records(path: str, samples: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(samples):
            frames, height = TRAIN_LENGTHS[int(rng.integers(len(TRAIN_LENGTHS)))]
            f.write(json.dumps({"id": f"clip-{i:05d}", "seed": TRAIN_SEED0 + i, "frames": frames,
                                "height": height}) + "\n")


def cli(args: list[str]) -> None:
    from sparrow.cli import main

    print("  sparrow " + " ".join(args), flush=True)
    rc = main(args)
    if rc:
        raise SystemExit(f"build_demo_drafts: `sparrow {args[0]}` failed (exit {rc})")


def ship(trained_dir: str, out_dir: str) -> dict:
    """The trained draft -> out_dir: config.json + model.safetensors in bfloat16 (no checkpoints,
    no optimizer state). Returns the training summary."""
    import torch
    from safetensors.torch import load_file, save_file

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    shutil.copy(os.path.join(trained_dir, "config.json"), out_dir)
    state = load_file(os.path.join(trained_dir, "model.safetensors"))
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    summary_path = os.path.join(trained_dir, "train_summary.json")
    return json.load(open(summary_path)) if os.path.exists(summary_path) else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=os.path.join(ROOT, "assets", "world_target"))
    ap.add_argument("--out", default=os.path.join(ROOT, "assets", "drafts"))
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "demo_drafts"),
                    help="records, data and full training outputs (not shipped)")
    ap.add_argument("--samples", type=int, default=640, help="training clips")
    ap.add_argument("--max-steps", type=int, default=600, help="training steps per draft")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--mid-pool", type=int, default=256, help="visual states kept per clip (pooled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a 2-core machine shared with other jobs, two threads "
                         "spin against each other and a forward can take 50x longer; 0: torch's default)")
    ap.add_argument("--only", default=",".join(DRAFTS), help="comma list of drafts to train")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()

    import torch

    from sparrow.demo import BUILD_INFO, target_fingerprint

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if not os.path.exists(os.path.join(a.target, "config.json")):
        raise SystemExit(f"build_demo_drafts: no target in {a.target} (run scripts/train_world_target.py)")
    names = [n for n in a.only.split(",") if n]
    bad = [n for n in names if n not in DRAFTS]
    if bad:
        raise SystemExit(f"build_demo_drafts: --only: unknown drafts {bad}; choose from {list(DRAFTS)}")
    fp = target_fingerprint(a.target)
    work = os.path.join(a.work, fp)  # per target: data of another target is never reused
    os.makedirs(work, exist_ok=True)
    common = ["--target", a.target, "--device", "cpu", "--dtype", "float32"]
    progress = ["--no-progress"] if a.no_progress else []
    times = {}
    t_all = time.time()

    print(f"[1/4] records: {a.samples} clips at {len(TRAIN_LENGTHS)} visual lengths", flush=True)
    t0 = time.time()
    records = os.path.join(work, "records.jsonl")
    write_records(records, a.samples, a.seed)
    times["records"] = time.time() - t0

    print("[2/4] gen-data: the target's greedy answers and its features over prompt + answer", flush=True)
    t0 = time.time()
    with open(records, "rb") as f:  # the data folder belongs to exactly these records
        records_id = hashlib.sha256(f.read()).hexdigest()[:8]
    data = os.path.join(work, f"data-{a.samples}-pool{a.mid_pool}-seed{a.seed}-{records_id}")
    cli(["gen-data", *common, "--data", records, "--processor", "sparrow.demo:world_inputs", "--out", data,
         "--answers", "target", "--max-new-tokens", "160", "--store-embeds", "--mid-pool", str(a.mid_pool), *progress])
    times["gen-data"] = time.time() - t0
    print(f"      gen-data took {times['gen-data']:.0f}s", flush=True)

    summaries = {}
    for i, name in enumerate(names):
        print(f"[3/4] train {name} ({i + 1}/{len(names)}): {' '.join(DRAFTS[name]) or 'IVSB + MTP, visual_source none'}",
              flush=True)
        t0 = time.time()
        trained = os.path.join(work, "train", name)
        if os.path.isdir(trained):
            shutil.rmtree(trained)  # a fresh, deterministic run every time
        cli(["train", *common, "--data", data, "--out", trained, *DRAFTS[name], "--max-steps", str(a.max_steps),
             "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps),
             "--seed", str(a.seed), *progress])
        times[f"train {name}"] = time.time() - t0
        print(f"      train {name} took {times[f'train {name}']:.0f}s", flush=True)
        summaries[name] = trained

    print(f"[4/4] ship: bfloat16 drafts to {a.out}", flush=True)
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    shipped = {}
    for name, trained in summaries.items():
        s = ship(trained, os.path.join(a.out, name))
        last = s.get("last", {})
        shipped[name] = {"args": DRAFTS[name], "steps": s.get("steps"), "loss": last.get("loss"),
                         "top1_agreement": last.get("acc0"), "train_seconds": s.get("seconds")}
    times["ship"] = time.time() - t0
    times["total"] = time.time() - t_all
    info_path = os.path.join(a.out, BUILD_INFO)
    info = json.load(open(info_path)) if os.path.exists(info_path) and set(names) != set(DRAFTS) else {}
    info.update({
        "target": os.path.relpath(os.path.abspath(a.target), ROOT),
        "target_sha256": fp,
        "settings": {"samples": a.samples, "train_lengths": TRAIN_LENGTHS, "train_seed0": TRAIN_SEED0,
                     "max_steps": a.max_steps, "batch_size": a.batch_size, "lr": a.lr,
                     "warmup_steps": a.warmup_steps, "mid_pool": a.mid_pool, "seed": a.seed, "answers": "target",
                     "threads": torch.get_num_threads(), "stored_dtype": "bfloat16"},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "drafts": {**info.get("drafts", {}), **shipped},
        "torch": torch.__version__,
    })
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print("\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    for name, d in shipped.items():
        print(f"  {name:<8} loss {d['loss']:.4f}  top-1 agreement {d['top1_agreement']:.3f}")
    print(f"drafts in {a.out} ({info_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
