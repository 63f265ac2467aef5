#!/usr/bin/env python3
"""Reproduce the world's target: `python scripts/train_world_target.py --out assets/world_target`.

Trains the small Qwen2.5-VL target on generated clips (sparrow/world/target.py), saves it with its
tokenizer, then scores its greedy answers on held-out clips (attribute accuracy vs chance) at the
visual lengths given by --eval. A directory already trained with the same config is reused.
The shipped target is this command with the defaults (1500 steps of the vision tower alone, then
2000 joint steps with the tower frozen, each batch at one visual length: 16 + 47 min on one thread
with another job on the second core).

--init-from DIR continues from a trained target (a second stage with its own schedule and clips,
e.g. `--seed 1 --lr 1e-3 --warmup 20`). Tried on an earlier target whose tower trained jointly:
1200 more steps with the pretrained frozen tower stopped reading direction (teacher-forced).
Not part of the shipped recipe.

--vision-pretrain-steps N (default 1500) first trains the vision tower and the probe alone on
token_labels; --freeze-vision (default; --no-freeze-vision turns it off) keeps the tower fixed in
the joint run.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparrow.world.target import ModelConfig, TrainConfig, evaluate, load_world_target, train_world_target  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/world_target")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--aux-fraction", type=float, default=TrainConfig.aux_fraction)
    ap.add_argument("--probe-weight", type=float, default=TrainConfig.probe_weight)
    ap.add_argument("--vision-pretrain-steps", type=int, default=TrainConfig.vision_pretrain_steps,
                    help="steps of the vision tower alone on token_labels before the joint run (0: none)")
    ap.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=TrainConfig.freeze_vision,
                    help="keep the vision tower fixed in the joint run (default: on)")
    ap.add_argument("--kv-heads", type=int, default=ModelConfig.num_key_value_heads,
                    help="key/value heads of the language model's attention")
    ap.add_argument("--init-from", default="", help="continue from this trained target (a second stage)")
    ap.add_argument("--force", action="store_true", help="retrain even if --out holds this config")
    ap.add_argument("--eval", default="8x112,4x224,16x224,48x224,96x224,192x224",
                    help="FRAMESxSIZE,... to score (empty: none); default: 8x112 and the demo's lengths")
    ap.add_argument("--eval-clips", type=int, default=24)
    ap.add_argument("--bench-decode", action="store_true",
                    help="also time decoding per token: the target vs a 1-layer model of its width")
    ap.add_argument("--eval-json", default=None, help="write the evaluation here (default: OUT/eval.json)")
    args = ap.parse_args()

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                      lr=args.lr, warmup=args.warmup, aux_fraction=args.aux_fraction, init_from=args.init_from,
                      probe_weight=args.probe_weight, vision_pretrain_steps=args.vision_pretrain_steps,
                      freeze_vision=args.freeze_vision,
                      model=ModelConfig(num_key_value_heads=args.kv_heads))
    train_world_target(args.out, cfg, force=args.force, log=lambda s: print(s, flush=True))
    if not args.eval:
        return
    model, tok = load_world_target(args.out)
    results = []
    for spec in args.eval.split(","):
        frames, size = (int(v) for v in spec.split("x"))
        r = evaluate(model, tok, n=args.eval_clips, frames=frames, height=size)
        results.append(r)
        acc, ch = r["accuracy"], r["chance_shuffled"]
        print(f"{frames} frames @ {size}px: core {acc['core']:.3f} (chance {ch['core']:.3f})  "
              + "  ".join(f"{a} {acc[a]:.2f}/{ch[a]:.2f}" for a in acc if a != "core")
              + f"  | {r['mean_words']:.0f} words, {r['distinct_answers']} distinct, {r['generate_seconds']}s",
              flush=True)
        for kind, read in r["teacher_forced"].items():
            print(f"    teacher-forced {kind}: " + "  ".join(
                f"{c} {v['accuracy']:.2f}/{v['chance']:.2f} (n={v['count']})" for c, v in read.items()), flush=True)
    if args.bench_decode:
        import torch

        from sparrow.world.target import decode_ms_per_token, one_layer_twin

        torch.set_num_threads(args.threads)
        twin = one_layer_twin(model, tok)
        for frames, size in ((8, 112), (32, 336)):
            t_ms, d_ms = decode_ms_per_token(model, tok, frames, size), decode_ms_per_token(twin, tok, frames, size)
            print(f"decode {frames}x{size}: target {t_ms:.1f} ms/token, 1-layer {d_ms:.1f} ms/token "
                  f"({t_ms / d_ms:.1f}x)", flush=True)
            results.append({"decode_ms_per_token": {"frames": frames, "height": size, "target": t_ms,
                                                    "one_layer": d_ms}})
    path = args.eval_json or os.path.join(args.out, "eval.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
