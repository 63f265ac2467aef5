"""What one decode step costs the host: ATen dispatches, host reads of device values, wall time.

On a GPU each dispatch costs a few microseconds of launch overhead and each host read stalls the
launch queue until the device has caught up, so a step that dispatches thousands of ops or reads
the device a dozen times is slow however fast its kernels are. Both counts are taken on the CPU, on
the code path a CUDA run takes (sparrow/profiling.py), on a tiny Qwen2.5-VL with the depth of a 7B
target (28 layers), beside Hugging Face `generate`'s per-token figures on the same model.

Per-step figures are differences: a generation of N2 tokens minus one of N1 tokens, divided by
the difference in verify steps (tokens, for `generate`), so prefill cancels out. The draft is
untrained (it proposes, and almost nothing is accepted, so every step does a full step's work).

    python bench/bench_step.py [--device cuda] [--compile] [--batch 1 4] [--reps 3]

Writes bench/results/step_<device>.json and .md (device, versions, shapes beside the numbers).
It only uses calls that older versions of Sparrow have too, so the same script measures a
checkout from before this change: copy it and sparrow/profiling.py there, run with `--label`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # tiny_models
sys.path.insert(0, _ROOT)  # sparrow, when not installed

N1, N2 = 8, 24


def build(device: str, layers: int, dtype):
    import sparrow
    from sparrow.draft import SparrowDraft
    from sparrow.targets import load_target
    from tiny_models import tiny_target

    model = tiny_target("qwen2_5_vl", dtype=dtype, num_hidden_layers=layers).to(device)
    target = load_target(model)
    if hasattr(type(target), "use_tree_attention"):  # older versions: their CPU-only shortcut off, as on CUDA
        type(target).use_tree_attention = False
    draft = SparrowDraft.from_target(target)
    return sparrow, model, target, draft


def cases(sparrow, target, draft, compile_on: bool):
    from sparrow.drafting import TreeConfig

    extra = {"compile": True} if compile_on else {}
    return {
        "autoregressive": lambda inp, n: sparrow.generate(target, None, inp, n, **extra),
        "chain-4": lambda inp, n: sparrow.generate(target, draft, inp, n, chain=4, **extra),
        "tree-60": lambda inp, n: sparrow.generate(target, draft, inp, n, tree=TreeConfig(6, 10, 60), **extra),
    }


def count_step(fn, inputs, steps_of, count: bool) -> dict:
    """Warm up (and compile, when compiling), then dispatches and host reads per step (not under
    compile, which refuses to trace under a dispatch mode)."""
    from sparrow.profiling import HostCounter

    fn(inputs, N1)
    fn(inputs, N2)
    if not count:
        return {}
    counted = []
    for n in (N1, N2):
        with HostCounter() as c:
            out = fn(inputs, n)
        counted.append((c.dispatches, c.host_reads, steps_of(out, n)))
    steps = counted[1][2] - counted[0][2]
    return {"dispatches_per_step": (counted[1][0] - counted[0][0]) / steps,
            "host_reads_per_step": (counted[1][1] - counted[0][1]) / steps}


def time_step(fn, inputs, steps_of, device: str) -> float:
    """Seconds per step, once."""
    t = []
    for n in (N1, N2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(inputs, n)
        if device == "cuda":
            torch.cuda.synchronize()
        t.append((time.perf_counter() - t0, steps_of(out, n)))
    return (t[1][0] - t[0][0]) / max(1, t[1][1] - t[0][1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also run every case with compile=True")
    ap.add_argument("--label", default="", help="a name for this checkout in the output")
    ap.add_argument("--out", default=os.path.join(_ROOT, "bench", "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the count does not depend on it; the time is steadier
    from tiny_models import tiny_inputs

    sparrow, model, target, draft = build(args.device, args.layers, torch.float32)
    can_compile = "compile" in inspect.signature(sparrow.generate).parameters
    phases = {False: [], True: []}  # compile off / on: (row, fn, inputs, steps_of)
    for B in args.batch:
        inputs = {k: v.to(args.device) for k, v in tiny_inputs(model, batch=B, frames=4).items()}

        def hf(inp, n):
            return model.generate(**inp, do_sample=False, max_new_tokens=n, min_new_tokens=n)

        phases[False].append(({"batch": B, "case": "hf-generate (per token)", "compile": False}, hf, inputs,
                              lambda out, n: n))
        for compile_on in ([False, True] if args.compile and can_compile else [False]):
            for name, fn in cases(sparrow, target, draft, compile_on).items():
                phases[compile_on].append(({"batch": B, "case": name, "compile": compile_on}, fn, inputs,
                                           lambda out, n: out.stats.steps))
    rows = []
    for runs in phases.values():  # eager first, written before compiling starts (which may be cut short)
        if runs:
            rows += measure(runs, args.reps, args.device)
            write(rows, args)


def measure(runs: list, reps: int, device: str) -> list:
    for row, fn, inputs, steps_of in runs:
        row.update(count_step(fn, inputs, steps_of, count=not row["compile"]))
        print(row, flush=True)
    # Timed round-robin, the fastest of the repeats kept: a slow spell of a shared machine then
    # hits every case alike instead of one.
    times = [[] for _ in runs]
    for _ in range(reps):
        for i, (row, fn, inputs, steps_of) in enumerate(runs):
            times[i].append(time_step(fn, inputs, steps_of, device))
    return [{**row, "ms_per_step": 1000 * min(t)} for (row, *_), t in zip(runs, times)]


def write(rows: list, args) -> None:
    meta = {
        "label": args.label,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, 1 thread)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": f"tiny Qwen2.5-VL, {args.layers} layers, hidden 64, float32, 4 frames",
        "method": f"per-step = (generation of {N2} tokens - one of {N1}) / (difference in verify steps); "
                  f"ms: the fastest of {args.reps} round-robin repeats",
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_{args.device}{'_' + args.label if args.label else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Decode step: host work per step ({meta['device']})", "",
             f"{meta['model']}; torch {meta['torch']}, transformers {meta['transformers']}. {meta['method']}.", "",
             "| batch | case | compile | dispatches / step | host reads / step | ms / step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d, h = r.get("dispatches_per_step"), r.get("host_reads_per_step")
        lines.append(f"| {r['batch']} | {r['case']} | {'yes' if r['compile'] else 'no'} | "
                     f"{'-' if d is None else f'{d:.0f}'} | {'-' if h is None else f'{h:.2f}'} | {r['ms_per_step']:.2f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
