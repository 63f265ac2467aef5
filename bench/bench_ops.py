"""Times every sparrow op against its pure-PyTorch reference and `torch.compile` of it.

Shapes are those of a 7B target (H=3584, 28 query heads / 4 KV heads, d=128, V=152064) at decode-
like and prefill-like sizes; on a CPU the largest are scaled down (noted in the table). Each case
first checks the op against the reference, then times op, reference and compiled reference in
alternating rounds (medians), so that load changes on a shared machine hit all of them alike.
Writes bench/results/ops_<device>.json and .md.

    python bench/bench_ops.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sparrow  # noqa: E402
from sparrow import reference  # noqa: E402
from sparrow.tree import Tree  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    op: str
    regime: str  # decode / prefill / tree ...
    shape: str
    make: callable  # () -> args tuple
    run_op: callable  # args -> out
    run_ref: callable  # args -> out
    check: callable  # (out_op, out_ref) -> None (raises on mismatch)
    bytes_moved: float = 0.0  # fewest bytes the op must move (for GB/s)
    notes: str = ""
    times: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, args_list, device: str, min_time: float, max_rounds: int = 200) -> list[float]:
    """Median seconds per call of each fn, measured in alternating rounds (fn0, fn1, ... , fn0, ...)
    so that a change in machine load hits every contender alike (this matters on shared CPUs)."""
    for fn, args in zip(fns, args_list):  # warm-up (and compilation, for torch.compile)
        fn(*args)
        fn(*args)
    _sync(device)
    samples = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_time * len(fns) and rounds < max_rounds):
        for fn, args, out in zip(fns, args_list, samples):
            t0 = time.perf_counter()
            fn(*args)
            _sync(device)
            out.append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(s) for s in samples]


def _close(a, b, atol, rtol):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def fused_fc_cases(device, dtype, quick):
    H = 3584 if (device == "cuda" or not quick) else 1024
    V = 152064 if device == "cuda" else 32000
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    cases = []
    for regime, n in [("decode", 1), ("decode", 16), ("decode", 64), ("prefill", 512 if device == "cpu" else 4096)]:
        def make(n=n):
            g = torch.Generator().manual_seed(0)
            embed = torch.randn(V, H, generator=g).to(device, dtype)
            hidden = torch.randn(n, H, generator=g).to(device, dtype)
            weight = (torch.randn(H, 2 * H, generator=g) / (2 * H) ** 0.5).to(device, dtype)
            bias = torch.randn(H, generator=g).to(device, dtype)
            ids = torch.randint(0, V, (n,), generator=g).to(device)
            return ids, embed, hidden, weight, bias
        esize = torch.finfo(dtype).bits // 8
        moved = (H * 2 * H + n * 2 * H + n * H + H) * esize
        cases.append(Case("fused_fc", regime, f"N={n} D=H=Dout={H} V={V}", make,
                          lambda *a: sparrow.ops.fused_fc(*a), lambda *a: reference.fused_fc(*a),
                          lambda o, r: _close(o, r, tol, tol), moved))
    return cases


def text_attention_cases(device, dtype, quick):
    hq, hkv, d = 28, 4, 128
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    L_dec = 4096 if device == "cuda" else (1024 if quick else 2048)
    specs = [("decode", 1, 1, L_dec, False), ("decode", 8, 1, L_dec, False),
             ("tree", 1, 60, L_dec, True), ("prefill", 1, 512 if device == "cpu" else 2048, 0, False)]
    cases = []
    for regime, B, Lq, L, tree in specs:
        L = L or Lq  # prefill: the new block is the whole cache

        def make(B=B, Lq=Lq, L=L, tree=tree):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, Lq, hq, d, generator=g).to(device, dtype)
            k = torch.randn(B, L, hkv, d, generator=g).to(device, dtype)
            v = torch.randn(B, L, hkv, d, generator=g).to(device, dtype)
            lens = torch.full((B,), L, dtype=torch.int32, device=device)
            mask = None
            if tree:
                parents = torch.stack([torch.randint(0, i + 1, (B,), generator=g) for i in range(Lq - 1)], 1)
                mask = Tree.from_parents(torch.zeros_like(parents), parents).visible.to(device)
            return q, k, v, lens, mask, d ** -0.5, 0
        esize = torch.finfo(dtype).bits // 8
        moved = (2 * B * L * hkv * d + 2 * B * Lq * hq * d) * esize
        cases.append(Case("text_attention", regime, f"B={B} Lq={Lq} L={L} hq={hq} hkv={hkv} d={d}", make,
                          lambda *a: sparrow.ops.text_attention(*a), lambda *a: reference.text_attention(*a),
                          lambda o, r: _close(o, r, tol, tol), moved))
    return cases


def gather_kv_cases(device, dtype, quick):
    cases = []
    B, h, d, L, M = 8, 4, 128, 4096, 61  # a batch of trees committing up to 61 slots
    for layout, seq_dim in [("draft [B,L,h,d]", 1), ("hf [B,h,L,d]", 2)]:
        def make(seq_dim=seq_dim):
            g = torch.Generator().manual_seed(0)
            shape = (B, L, h, d) if seq_dim == 1 else (B, h, L, d)
            cache = torch.randn(shape, generator=g).to(device, dtype)
            # Sources: an ascending subset of the last 2M slots (the tree), destination: before them.
            base = L - 2 * M
            src = torch.stack([torch.randperm(2 * M, generator=g)[:M].sort().values for _ in range(B)]) + base
            counts = torch.randint(1, M + 1, (B,), generator=g)
            dst = torch.randint(0, base, (B,), generator=g)
            return cache, src.to(device), counts.to(device), dst.to(device), seq_dim

        def run(fn):
            def go(cache, *rest):
                fn(cache, *rest)
                return cache
            return go
        esize = torch.finfo(dtype).bits // 8
        moved = 2 * B * M * h * d * esize
        cases.append(Case("gather_kv_", "commit", f"{layout} B={B} L={L} M={M}", make,
                          run(sparrow.ops.gather_kv_), run(reference.gather_kv_),
                          lambda o, r: torch.testing.assert_close(o, r, atol=0, rtol=0), moved,
                          notes="in place"))
    return cases


def verify_cases(device, dtype, quick):
    B, N, V = 8, 60, 152064
    cases = []
    for regime, temp in [("greedy", 0.0), ("sampling", 1.0)]:
        def make(temp=temp):
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(B, N + 1, V, generator=g).to(device, dtype)
            parents = torch.stack([torch.randint(0, i + 1, (B,), generator=g) for i in range(N)], 1)
            tokens = torch.randint(0, V, (B, N), generator=g)
            # make part of the tree agree with the target so acceptance walks a few levels
            best = logits.float().argmax(-1).cpu()
            for i in range(1, N + 1, 7):
                tokens[:, i - 1] = best.gather(1, parents[:, i - 1 : i]).squeeze(1)
            temperature = torch.full((B,), temp, dtype=torch.float32)
            uniform = torch.rand(B, N + 1, generator=g)
            return (tokens.to(device), parents.to(device), logits, None, temperature.to(device), uniform.to(device))

        def check(o, r):
            for a, b in zip(o, r):
                torch.testing.assert_close(a.cpu(), b.cpu(), atol=0, rtol=0)
        esize = torch.finfo(dtype).bits // 8
        cases.append(Case("verify", regime, f"B={B} N={N} V={V}", make,
                          lambda *a: sparrow.ops.verify(*a), lambda *a: reference.verify(*a),
                          check, B * (N + 1) * V * esize, notes="one-hot (deterministic) drafts"))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="smaller CPU shapes, shorter timing")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not sparrow.ops.HAS_COMPILED_OPS:
        sys.exit("bench_ops: the compiled ops are not built (make build)")
    device = args.device
    min_time = args.min_time or (0.3 if args.quick else 1.0)
    rows = []
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        cases = (fused_fc_cases(device, dtype, args.quick) + text_attention_cases(device, dtype, args.quick)
                 + gather_kv_cases(device, dtype, args.quick) + verify_cases(device, dtype, args.quick))
        for case in cases:
            a = case.make()
            # Correctness first (gather_kv_ mutates: give each side its own copy).
            fresh = lambda: tuple(x.clone() if torch.is_tensor(x) else x for x in a)  # noqa: E731
            case.check(case.run_op(*fresh()), case.run_ref(*fresh()))
            fns, arg_sets = [case.run_op, case.run_ref], [fresh(), fresh()]
            if not args.no_compile and case.op != "verify":  # verify's reference is a data-dependent walk
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(case.run_ref)
                    compiled(*fresh())
                    fns.append(compiled)
                    arg_sets.append(fresh())
                except Exception as err:  # noqa: BLE001 - report, don't die: a bench, not a test
                    print(f"  torch.compile failed for {case.op} {case.shape}: {type(err).__name__}")
            times = time_interleaved(fns, arg_sets, device, min_time)
            t_op, t_ref = times[0], times[1]
            t_cmp = times[2] if len(times) > 2 else None
            row = {
                "op": case.op, "regime": case.regime, "shape": case.shape, "dtype": str(dtype).split(".")[1],
                "op_ms": t_op * 1e3, "reference_ms": t_ref * 1e3,
                "compiled_reference_ms": None if t_cmp is None else t_cmp * 1e3,
                "speedup_vs_reference": t_ref / t_op,
                "speedup_vs_compiled": None if t_cmp is None else t_cmp / t_op,
                "GB_per_s": case.bytes_moved / t_op / 1e9 if case.bytes_moved else None,
                "notes": case.notes,
            }
            rows.append(row)
            cmp = "-" if t_cmp is None else f"{t_cmp * 1e3:9.3f}"
            print(f"{case.op:15s} {case.regime:8s} {row['dtype']:8s} {case.shape:45s} "
                  f"op {t_op * 1e3:9.3f} ms  ref {t_ref * 1e3:9.3f} ms  compiled {cmp} ms  "
                  f"x{t_ref / t_op:6.2f}", flush=True)
    write_results(rows, device, args)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'' if n == 1 else 's'})"


def write_results(rows, device, args) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = os.path.join(RESULTS, f"ops_{device}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}. "
             "Times are medians in ms; speedup = reference time / op time.", "",
             "| op | regime | dtype | shape | op ms | reference ms | compiled ref ms | x ref | x compiled | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['regime']} | {r['dtype']} | {r['shape']} | {fmt(r['op_ms'])} | "
                     f"{fmt(r['reference_ms'])} | {fmt(r['compiled_reference_ms'])} | "
                     f"{r['speedup_vs_reference']:.2f} | {fmt(r['speedup_vs_compiled'])} | "
                     f"{fmt(r['GB_per_s'])} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
