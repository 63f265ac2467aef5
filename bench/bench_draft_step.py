"""Draft propose time vs visual length: VATA keeps it flat.

For 0.5k .. 17k visual tokens at a fixed text length, builds the target-prefill view the draft
reads (input ids, visual / text masks, features, visual states) around a tiny target's embed and
lm_head, prefills the draft, and times one proposal (a chain and an EAGLE-2 tree) from that cache.
Sparrow (visual_source="none") keeps text entries only, so its cache length and its time stay
constant; the MSD-style baseline (visual_source="embed") keeps the visual entries and grows.

    python bench/bench_draft_step.py [--device cuda] [--reps 50] [--hidden 64]

Writes bench/results/draft_step.json and .md (device, versions, shapes beside the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # tiny_models
sys.path.insert(0, _ROOT)  # sparrow, when not installed

VISUAL_LENGTHS = [512, 1536, 4096, 8192, 17408]


def fake_prefill(target, n_visual: int, n_text: int, want: str | None):
    """A PrefillOutput-like view: n_text//2 text, n_visual visual, the rest text; random features."""
    from sparrow.targets.base import PrefillOutput

    H = target.text_config.hidden_size
    emb = target.embed_tokens().weight
    S = n_text + n_visual
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (1, S), generator=g)
    vis = torch.zeros(1, S, dtype=torch.bool)
    vis[0, n_text // 2 : n_text // 2 + n_visual] = True
    ids[vis] = 291
    feats = torch.randn(1, S, H, generator=g, dtype=torch.float32).to(emb)
    states = torch.randn(1, S, H, generator=g, dtype=torch.float32).to(emb) if want else None
    return PrefillOutput(
        state=None,
        logits=torch.zeros(1, emb.shape[0], dtype=emb.dtype, device=emb.device),
        input_ids=ids.to(emb.device),
        visual_mask=vis.to(emb.device),
        text_mask=(~vis).to(emb.device),
        features=feats,
        visual_embeds=states if want == "embed" else None,
        visual_mid=states if want == "mid" else None,
    )


def time_it(fn, reps: int, device) -> float:
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts) if os.environ.get("SPARROW_BENCH_MIN") else statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--text", type=int, default=128, help="prompt text tokens")
    ap.add_argument("--lengths", type=int, nargs="*", default=VISUAL_LENGTHS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    from sparrow import ops
    from sparrow.draft import SparrowDraft
    from sparrow.drafting import TreeConfig, propose_chain, propose_tree
    from sparrow.sampling import SamplingConfig
    from sparrow.targets import load_target
    from tiny_models import tiny_target

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    model = tiny_target("qwen2_5_vl", dtype=dtype).to(args.device)
    target = load_target(model)
    tree = TreeConfig(depth=6, top_k=10, total_nodes=60)
    rows = []
    for source in ("none", "embed"):
        draft = SparrowDraft.from_target(target, visual_source=source).eval()
        for n_vis in args.lengths:
            pre = fake_prefill(target, n_vis, args.text, None if source == "none" else source)
            with torch.no_grad():
                root = torch.tensor([5], device=args.device)
                cache, root_hidden = draft.prefill(pre, root)
                t_chain = time_it(lambda: propose_chain(draft, cache, root_hidden, 5, SamplingConfig()), args.reps, args.device)
                t_tree = time_it(lambda: propose_tree(draft, cache, root_hidden, tree), args.reps, args.device)
            rows.append(
                dict(
                    visual_source=source,
                    visual_tokens=n_vis,
                    text_tokens=args.text,
                    draft_cache_len=int(cache.lens[0]),
                    chain5_ms=t_chain * 1e3,
                    tree_6x10_60_ms=t_tree * 1e3,
                )
            )
            print(rows[-1], flush=True)
    base = {r["visual_source"]: r for r in rows if r["visual_tokens"] == args.lengths[0]}
    for r in rows:
        r["tree_vs_shortest"] = r["tree_6x10_60_ms"] / base[r["visual_source"]]["tree_6x10_60_ms"]
    meta = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        compiled_ops=ops.HAS_COMPILED_OPS,
        dtype=str(dtype),
        model="tiny qwen2_5_vl (hidden 64, 4 heads / 2 kv heads)",
        reps=args.reps,
        note=("min" if os.environ.get("SPARROW_BENCH_MIN") else "median")
        + " wall time of one proposal from a prefilled draft cache (batch 1); SPARROW_BENCH_MIN=1 takes the "
        "min over reps (robust on a shared CPU)",
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "draft_step.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = [
        f"# Draft propose time vs visual length ({meta['device']}, {meta['dtype']}, torch {meta['torch']})",
        "",
        "| visual_source | visual tokens | draft cache len | chain k=5 (ms) | tree 6x10->60 (ms) | tree vs 0.5k |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['visual_source']} | {r['visual_tokens']} | {r['draft_cache_len']} | {r['chain5_ms']:.2f} | "
            f"{r['tree_6x10_60_ms']:.2f} | {r['tree_vs_shortest']:.2f}x |"
        )
    with open(os.path.join(args.out, "draft_step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
