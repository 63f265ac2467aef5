"""Times every sparrow op against its pure-PyTorch reference and `torch.compile` of it.

Shapes are those of a 7B target (H=3584, 28 query heads / 4 KV heads, d=128, V=152064) at decode-
like and prefill-like sizes; on a CPU the largest are scaled down (noted in the table); --tiny
shrinks everything (a dry run in seconds). Each case first checks the op against the reference,
then times op, reference, compiled reference and, for text_attention, SDPA with enable_gqa over a
prefix + block mask built once (the "sdpa" verify backend), in alternating rounds (medians; CUDA
events on a GPU), so that load changes on a shared machine hit all of them alike. The device's
copy bandwidth is measured in the same run, and each op's bytes/s is given as a share of it.
Writes ops_<device>.json and .md into --out (default bench/results).

    python bench/bench_ops.py [--device cpu|cuda] [--quick | --tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparrow  # noqa: E402
from sparrow import reference  # noqa: E402
from sparrow.targets.verify_attention import VerifyBlock  # noqa: E402
from sparrow.tree import Tree  # noqa: E402
from timing import copy_bandwidth  # noqa: E402

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
    run_sdpa: callable = None  # args -> out: torch's SDPA on the same work (text_attention)
    times: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, arg_sets, device: str, min_time: float, max_rounds: int = 200) -> list[float]:
    """Median seconds per call of each fn, measured in alternating rounds (fn0, fn1, ... , fn0, ...)
    so that a change in machine load hits every contender alike (this matters on shared CPUs).
    arg_sets[i] is a list of argument tuples that fn i cycles through (copies, so that inputs
    smaller than the GPU's L2 are not served from it). On CUDA each sample is a pair of events
    around 5 back-to-back calls: no host sync inside."""
    cycles = [itertools.cycle(sets) for sets in arg_sets]
    for fn, sets in zip(fns, arg_sets):  # warm-up (compilation, SDPA's masks): every set, at least twice
        for args in sets * (2 if len(sets) == 1 else 1):
            fn(*args)
    _sync(device)
    samples = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < min_time * len(fns) and rounds < max_rounds):
        for fn, cycle, out in zip(fns, cycles, samples):
            out.append(_one_sample(fn, cycle, device))
        rounds += 1
    return [statistics.median(s) for s in samples]


def _one_sample(fn, cycle, device: str, calls: int = 5) -> float:
    if device != "cuda":
        args = next(cycle)
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn(*next(cycle))
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / calls


def copies_past_l2(case: "Case", device: str, most: int = 16) -> int:
    """How many copies of a case's inputs make its timed calls read at least 3x the L2 (1 on CPU)."""
    if device != "cuda" or not case.bytes_moved:
        return 1
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 60 << 20)  # (an older torch without the field: an H100/H200's)
    return max(1, min(most, math.ceil(3 * l2 / case.bytes_moved)))


def _close(a, b, atol, rtol):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


# Shapes per --size: "full" (a 7B target; the default on CUDA), "quick" (the CPU's default scale),
# "tiny" (a dry run in seconds).
FC_WIDTH = {"full": 3584, "quick": 1024, "tiny": 64}
VOCAB = {"full": 152064, "quick": 32000, "tiny": 1000}
FC_ROWS = {"full": [1, 2, 4, 8, 16, 17, 32, 64, 80, 128, 256, 512, 4096], "quick": [1, 16, 64, 512], "tiny": [1, 16, 80]}


def fused_fc_cases(device, dtype, size):
    H, V = FC_WIDTH[size], VOCAB[size] if device == "cuda" else min(VOCAB[size], 32000)
    rows = FC_ROWS[size] if device == "cuda" or size == "tiny" else FC_ROWS["quick"]
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    cases, shared = [], {}  # the embedding and weight, drawn once for every N
    for n in rows:
        def make(n=n):
            if not shared:
                g = torch.Generator(device).manual_seed(0)
                shared["embed"] = torch.randn(V, H, generator=g, device=device).to(dtype)
                shared["weight"] = (torch.randn(H, 2 * H, generator=g, device=device) / (2 * H) ** 0.5).to(dtype)
                shared["bias"] = torch.randn(H, generator=g, device=device).to(dtype)
            g = torch.Generator(device).manual_seed(n)
            hidden = torch.randn(n, H, generator=g, device=device).to(dtype)
            ids = torch.randint(0, V, (n,), generator=g, device=device)
            return ids, shared["embed"], hidden, shared["weight"], shared["bias"]
        esize = torch.finfo(dtype).bits // 8
        moved = (H * 2 * H + n * 2 * H + n * H + H) * esize
        regime = "decode" if n <= 64 else "tree" if n <= 512 else "prefill"
        cases.append(Case("fused_fc", regime, f"N={n} D=H=Dout={H} V={V}", make,
                          lambda *a: sparrow.ops.fused_fc(*a), lambda *a: reference.fused_fc(*a),
                          lambda o, r: _close(o, r, tol, tol), moved))
    return cases


def text_attention_cases(device, dtype, size):
    hq, hkv, d = (28, 4, 128) if size != "tiny" else (4, 2, 16)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    L_dec = {"full": 4096 if device == "cuda" else 2048, "quick": 1024, "tiny": 128}[size]
    specs = [("decode", 1, 1, L_dec, False), ("decode", 8, 1, L_dec, False), ("tree", 1, 61, L_dec, True),
             ("tree", 8, 61, L_dec, True), ("prefill", 1, 512 if device == "cpu" else 2048, 0, False)]
    if device == "cuda" and size == "full":  # the verify of a 25k-token video: one row, the whole prefix
        specs.insert(4, ("tree", 1, 61, 25600, True))
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
                          lambda o, r: _close(o, r, tol, tol), moved, run_sdpa=sdpa_text_attention()))
    return cases


def sdpa_text_attention():
    """text_attention's work done by SDPA as the "sdpa" verify backend does it: enable_gqa, one
    [B, 1, Lq, L] bool mask (prefix + block), built once per step and so not timed."""
    masks = {}

    def run(q, k, v, lens, mask, scale, window):
        B, Lq = q.shape[:2]
        key = (q.data_ptr(), k.data_ptr())
        if key not in masks:
            visible = mask if mask is not None else torch.ones(Lq, Lq, dtype=torch.bool, device=q.device).tril()
            visible = visible.expand(B, Lq, Lq)
            masks[key] = VerifyBlock.build(lens.long() - Lq, visible, k.shape[1], "sdpa").dense
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=masks[key], scale=scale,
            enable_gqa=True)
        return out.transpose(1, 2)
    return run


def gather_kv_cases(device, dtype, size):
    cases = []
    B, h, d, L, M = (8, 4, 128, 4096, 61) if size != "tiny" else (2, 2, 16, 256, 13)  # trees committing M slots
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


def verify_cases(device, dtype, size):
    B, N, V = 8, 60, VOCAB["full" if size != "tiny" else "tiny"]
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="smaller CPU shapes, shorter timing")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, a few rounds: a dry run in seconds")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timing per measurement")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=RESULTS, help="folder for ops_<device>.json and .md")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not sparrow.ops.HAS_COMPILED_OPS:
        sys.exit("bench_ops: the compiled ops are not built (make build)")
    device = args.device
    size = "tiny" if args.tiny else "full" if device == "cuda" or not args.quick else "quick"
    min_time = args.min_time or (0.01 if args.tiny else 0.3 if args.quick else 1.0)
    bandwidth = copy_bandwidth(device, 2 << 30 if device == "cuda" else 64 << 20)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        cases = (fused_fc_cases(device, dtype, size) + text_attention_cases(device, dtype, size)
                 + gather_kv_cases(device, dtype, size) + verify_cases(device, dtype, size))
        for case in cases:
            rows.append(run_case(case, dtype, device, min_time, not args.no_compile, bandwidth))
    write_results(rows, device, size, bandwidth, args.out)


def run_case(case: Case, dtype, device: str, min_time: float, compile_ref: bool, bandwidth: float) -> dict:
    """Check the op against its reference, then time op, reference, compiled reference and SDPA."""
    a = case.make()
    # Correctness first (gather_kv_ mutates: give each side its own copy).
    fresh = lambda: tuple(x.clone() if torch.is_tensor(x) else x for x in a)  # noqa: E731
    case.check(case.run_op(*fresh()), case.run_ref(*fresh()))
    copies = lambda: [fresh() for _ in range(copies_past_l2(case, device))]  # noqa: E731
    names, fns, arg_sets = ["op", "reference"], [case.run_op, case.run_ref], [copies(), copies()]
    if case.run_sdpa is not None:
        case.check(case.run_op(*fresh()), case.run_sdpa(*fresh()))
        names.append("sdpa"), fns.append(case.run_sdpa), arg_sets.append(copies())
    if compile_ref and case.op != "verify":  # verify's reference is a data-dependent walk
        try:
            torch._dynamo.reset()
            compiled = torch.compile(case.run_ref)
            compiled(*fresh())
            names.append("compiled"), fns.append(compiled), arg_sets.append(copies())
        except Exception as err:  # noqa: BLE001 - report, don't die: a bench, not a test
            print(f"  torch.compile failed for {case.op} {case.shape}: {type(err).__name__}")
    t = dict(zip(names, time_interleaved(fns, arg_sets, device, min_time)))
    ms = lambda k: t[k] * 1e3 if k in t else None  # noqa: E731
    bps = case.bytes_moved / t["op"] if case.bytes_moved else None
    row = {
        "op": case.op, "regime": case.regime, "shape": case.shape, "dtype": str(dtype).split(".")[1],
        "op_ms": ms("op"), "reference_ms": ms("reference"), "compiled_reference_ms": ms("compiled"),
        "sdpa_ms": ms("sdpa"), "speedup_vs_reference": t["reference"] / t["op"],
        "speedup_vs_compiled": t["compiled"] / t["op"] if "compiled" in t else None,
        "GB_per_s": None if bps is None else bps / 1e9,
        "pct_copy_bw": None if bps is None else 100 * bps / bandwidth,
        "notes": case.notes,
    }
    extra = "".join(f"  {k} {v * 1e3:9.3f} ms" for k, v in t.items() if k != "op")
    print(f"{case.op:15s} {case.regime:8s} {row['dtype']:8s} {case.shape:45s} op {t['op'] * 1e3:9.3f} ms{extra}",
          flush=True)
    return row


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


def write_results(rows, device, size, bandwidth, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "size": size,
            "copy_GB_per_s": bandwidth / 1e9, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = os.path.join(out_dir, f"ops_{device}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    fmt = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; shapes: {size}. "
             f"Copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write, same run). Times are medians in ms; "
             "x ref = reference time / op time; % copy = the op's fewest bytes / time, over the copy bandwidth.", "",
             "| op | regime | dtype | shape | op ms | reference ms | compiled ref ms | SDPA ms | x ref | x compiled "
             "| GB/s | % copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['regime']} | {r['dtype']} | {r['shape']} | {fmt(r['op_ms'])} | "
                     f"{fmt(r['reference_ms'])} | {fmt(r['compiled_reference_ms'])} | {fmt(r['sdpa_ms'])} | "
                     f"{r['speedup_vs_reference']:.2f} | {fmt(r['speedup_vs_compiled'], 2)} | "
                     f"{fmt(r['GB_per_s'], 1)} | {fmt(r['pct_copy_bw'], 0)} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
