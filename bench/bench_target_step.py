"""The decode step's parts at Qwen2.5-VL-7B shapes, and the DSR they project.

A Qwen2.5-VL with the 7B model's config and random weights (nothing downloaded) runs one video
prompt per visual length (0.5k, 1.5k, 17k, 25k merged visual tokens, 128 text tokens). Timed per
length, batch 1: the target's prefill, one autoregressive step (verify of the root alone, the
acceptance op, commit), a verify of 8 and of 60 tree nodes (60 also with the "sdpa" attention
backend, for the choice in sparrow/targets/verify_attention.py), the commit of 4 tokens, and for two
drafts (Sparrow's, which keeps text entries only, and an MSD-style one that keeps the visual
entries too) one draft step (a chain of 1), the EAGLE-2 tree proposal (depth 6, top 10, 60 nodes)
and the draft's commit. With --whole-steps, whole steps of sparrow.generate too (autoregressive and
the default tree, eager and, with --compile, compiled).

Projected DSR. A speculative step costs t_spec = propose(tree) + verify(60) + accept + commit +
draft commit and emits tau tokens on average (accepted + the new one); an autoregressive token
costs t_ar = verify(root) + accept + commit. So DSR = tau * t_ar / t_spec, and tau* = t_spec /
t_ar is the accepted length at which speculation breaks even. tau comes from the paper's Table 6
(Qwen2.5-VL-7B): Sparrow (MTP + IVSB + VATA) 4.51 at 0.5k and 4.37 at 25k visual tokens; the
draft that keeps visual KV (MTP + IVSB, no VATA) 4.53 and 1.21. The paper gives no tau at 1.5k
and 17k, so only tau* is shown there. Random weights accept nothing: these are times, and the
acceptance is the paper's.

    python bench/bench_target_step.py [--size 7b|tiny] [--device cuda] [--lengths ...] [--out DIR]

Writes target_step_<device>.json and .md into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # tiny_models
sys.path.insert(0, os.path.join(_ROOT, "bench"))
sys.path.insert(0, _ROOT)  # sparrow, when not installed

from timing import median_seconds, synchronize  # noqa: E402

# Qwen2.5-VL-7B-Instruct's published config (the parts that set shapes and costs).
QWEN25_VL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
              rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                tokens_per_second=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
             vision_end_token_id=151653),
)
LENGTHS = {"7b": [512, 1536, 17408, 25088], "tiny": [16, 64]}
GRID = {"7b": 32, "tiny": 4}  # patches per side of a frame (32: 448 px, 256 merged tokens a frame pair)
PAPER_TAU = {"sparrow": (4.51, 4.37), "msd": (4.53, 1.21)}  # Table 6 at (0.5k, 25k) visual tokens
TREE_NODES = 60


def build_target(size: str, device, dtype, layers: int | None):
    import transformers

    if size == "tiny":
        from tiny_models import tiny_target

        return tiny_target("qwen2_5_vl", dtype=dtype, num_hidden_layers=layers or 2).to(device)
    spec = QWEN25_VL_7B
    text = dict(spec["text"], num_hidden_layers=layers or spec["text"]["num_hidden_layers"])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=spec["vision"],
                                           tie_word_embeddings=False, **spec["ids"])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        try:
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, torch_dtype=dtype)
    return model.eval()


def video_prompt(model, n_visual: int, n_text: int, grid: int, device) -> dict:
    """input_ids, attention mask and random pixels of one prompt: half the text, a video of
    n_visual merged tokens (frame pairs of grid x grid patches), the other half."""
    from tiny_models import _wants_mm_token_type_ids

    cfg, vc = model.config, model.config.vision_config
    per_pair = grid * grid // vc.spatial_merge_size**2
    if n_visual % per_pair:
        raise ValueError(f"visual length {n_visual} is not a multiple of {per_pair} (merged tokens per frame pair)")
    t = n_visual // per_pair
    g = torch.Generator().manual_seed(n_visual)
    special = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    text = torch.randint(3, min(1000, special), (n_text,), generator=g).tolist()
    ids = text[: n_text // 2] + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_visual
    ids += [cfg.vision_end_token_id] + text[n_text // 2 :]
    input_ids = torch.tensor([ids], device=device)
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    dtype = next(model.parameters()).dtype
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(t * grid * grid, patch, generator=g).to(device, dtype),
        "video_grid_thw": torch.tensor([[t, grid, grid]], device=device),
        "second_per_grid_ts": torch.tensor([1.0], device=device),
    }
    if _wants_mm_token_type_ids(model):
        inputs["mm_token_type_ids"] = (input_ids == cfg.video_token_id).long() * 2
    return inputs


def random_tree(n: int, vocab: int, device):
    from sparrow.tree import Tree

    g = torch.Generator().manual_seed(n)
    parents = torch.stack([torch.randint(0, i + 1, (1,), generator=g) for i in range(n)], 1)
    tokens = torch.randint(0, vocab, (1, n), generator=g)
    return Tree.from_parents(tokens.to(device), parents.to(device))


def time_target(target, inputs, device, reps: int) -> tuple[dict, object]:
    """Prefill, the autoregressive step and tree verifies; returns (ms per part, the prefill)."""
    from sparrow import ops
    from sparrow.tree import Tree

    held = {}

    def prefill():
        held["pre"] = target.prefill(inputs, want_visual_embeds=True, decode_slots=2048)

    ms = {"prefill": median_seconds(prefill, device, reps=2, warmup=1) * 1e3}
    pre = held["pre"]
    state, vocab = pre.state, pre.logits.shape[-1]
    root = pre.logits.argmax(-1)
    temp, u = torch.zeros(1, device=device), torch.zeros(1, TREE_NODES + 1, device=device)

    def ar_step():
        tree = Tree.empty(1, device)
        out = target.verify(state, root, tree)
        count, nodes, _ = ops.verify(tree.tokens, tree.parents, out.logits, None, temp, u[:, :1])
        target.commit(state, nodes, count)

    ms["ar_step"] = median_seconds(ar_step, device, reps=reps) * 1e3
    for n in (8, TREE_NODES):
        tree = random_tree(n, vocab, device)
        ms[f"verify_{n}"] = median_seconds(lambda: target.verify(state, root, tree), device, reps=reps) * 1e3
    backend, target.verify_attention = target.verify_attention, "sdpa"  # the same verify through SDPA
    ms[f"verify_{TREE_NODES}_sdpa"] = median_seconds(lambda: target.verify(state, root, tree), device, reps=reps) * 1e3
    target.verify_attention = backend
    out = target.verify(state, root, tree)
    ms["accept_60"] = median_seconds(
        lambda: ops.verify(tree.tokens, tree.parents, out.logits, None, temp, u), device, reps=reps) * 1e3
    path = torch.full((1, TREE_NODES), -1, dtype=torch.long, device=device)
    path[0, :3] = torch.tensor([1, 2, 3])

    count = torch.tensor([3], device=device)

    def commit4():  # commit after the verify above (its one precondition: a verified tree's size)
        state.extra["tree_size"] = TREE_NODES + 1
        target.commit(state, path, count)

    ms["commit_4"] = median_seconds(commit4, device, reps=reps) * 1e3
    return ms, pre


def time_draft(target, pre, source: str, device, reps: int) -> dict:
    """One draft step, a chain of 5, the tree proposal and the commit of 4 tokens, from the
    prefilled cache."""
    from sparrow.draft import SparrowDraft
    from sparrow.drafting import TreeConfig, propose_chain, propose_tree
    from sparrow.sampling import SamplingConfig

    draft = SparrowDraft.from_target(target, visual_source=source).eval()
    root = pre.logits.argmax(-1)
    with torch.no_grad():
        cache, hidden = draft.prefill(pre, root, decode_slots=1024)
        x = draft.input_states(root[:, None], hidden[:, None])

        def draft_step():  # one forward of the draft over one new token, then its LM head
            draft.logits(draft.chain_step(cache, x, 0)[:, 0]).argmax(-1)

        ms = {
            "draft_step": median_seconds(draft_step, device, reps=reps) * 1e3,
            "propose_chain_5": median_seconds(lambda: propose_chain(draft, cache, hidden, 5, SamplingConfig()),
                                              device, reps=reps) * 1e3,
            "propose_tree": median_seconds(lambda: propose_tree(draft, cache, hidden, TreeConfig()),
                                           device, reps=reps) * 1e3,
        }
        tokens = root[:, None].expand(1, 7).contiguous()
        feats = pre.features[:, -7:]
        counts = torch.tensor([4], device=device)
        ms["draft_commit_4"] = median_seconds(lambda: draft.commit(cache, tokens, feats, counts), device,
                                              reps=min(reps, 20)) * 1e3
        ms["draft_cache_len"] = int(cache.lens[0])
    return ms


def time_whole_steps(target, draft, inputs, device, compile_on: bool, reps: int = 2) -> dict:
    """ms per decode step of sparrow.generate, autoregressive and with the default tree: (a
    generation of 24 tokens - one of 8) / (its extra steps), so prefill cancels out. An untrained
    draft has nearly nothing accepted, so every step does a whole step's work. Each length's fastest
    of reps."""
    import sparrow
    from sparrow.drafting import TreeConfig

    out = {}
    for name, d, extra in (("ar", None, {}), ("tree", draft, {"tree": TreeConfig()})):
        def run(n):
            synchronize(device)
            t0 = time.perf_counter()
            g = sparrow.generate(target, d, inputs, n, eos_token_id=[], compile=compile_on, **extra)
            synchronize(device)
            return time.perf_counter() - t0, g.stats.steps

        run(8)  # warm-up (and compilation)
        (t2, s2), (t1, s1) = min(run(24) for _ in range(reps)), min(run(8) for _ in range(reps))
        out[name] = 1e3 * (t2 - t1) / max(1, s2 - s1)
    return out


def _paper_tau(method: str, shortest: bool, longest: bool) -> float | None:
    """The paper's tau for a method at this length: its 0.5k figure at the shortest length
    measured, its 25k figure at the longest, none in between."""
    return PAPER_TAU[method][0] if shortest else PAPER_TAU[method][1] if longest else None


def _speedup(tau: float | None, t_ar: float, t_spec: float) -> dict:
    """Break-even tau and, where the paper gives tau, the projected DSR (module docstring)."""
    return {"break_even_tau": t_spec / t_ar, "paper_tau": tau,
            "projected_dsr": None if tau is None else tau * t_ar / t_spec}


def project(row: dict, shortest: bool, longest: bool) -> None:
    """The speedups the measured parts (and whole steps, when timed) project, into row."""
    for m in ("sparrow", "msd"):
        d = row[m]
        d["spec_step"] = d["propose_tree"] + row[f"verify_{TREE_NODES}"] + row["accept_60"] + row["commit_4"] \
            + d["draft_commit_4"]
        d.update(_speedup(_paper_tau(m, shortest, longest), row["ar_step"], d["spec_step"]))
    for key in ("whole_eager", "whole_compiled"):
        if key in row:
            w = row[key]
            w.update(_speedup(_paper_tau("sparrow", shortest, longest), w["ar"], w["tree"]))


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def write(rows: list, meta: dict, out_dir: str, device) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"target_step_{torch.device(device).type}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, meta) + "\n")
    return stem


def markdown(rows: list, meta: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"# Decode step parts at {meta['model']} ({meta['device']}, {meta['dtype']})", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['date']}. ms, medians, batch 1. "
             "DSR = tau x AR step / speculative step, tau from the paper (Table 6); tau*: break-even.", "",
             "| visual | prefill | AR step | verify 8 | verify 60 | verify 60 SDPA | accept 60 | commit 4 "
             "| draft step S / M | tree propose S / M | spec step S / M | tau* S / M | DSR S / M |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["sparrow"], r["msd"]
        lines.append(
            f"| {r['visual_tokens']} | {f(r['prefill'])} | {f(r['ar_step'])} | {f(r['verify_8'])} | "
            f"{f(r['verify_60'])} | {f(r['verify_60_sdpa'])} | {f(r['accept_60'])} | {f(r['commit_4'])} | {f(s['draft_step'])} / "
            f"{f(m['draft_step'])} | {f(s['propose_tree'])} / {f(m['propose_tree'])} | {f(s['spec_step'])} / "
            f"{f(m['spec_step'])} | {f(s['break_even_tau'])} / {f(m['break_even_tau'])} | "
            f"{f(s['projected_dsr'])} / {f(m['projected_dsr'])} |")
    lines += ["", "S: Sparrow's draft (text entries only); M: MSD-style draft (keeps the visual entries)."]
    if any("whole_eager" in r for r in rows):
        lines += ["", "Whole decode steps of sparrow.generate (Sparrow's draft, default tree; ms per step):", "",
                  "| visual | AR eager | tree eager | tau* eager | DSR eager | AR compiled | tree compiled "
                  "| tau* compiled | DSR compiled |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            e, c = r.get("whole_eager", {}), r.get("whole_compiled", {})
            lines.append(f"| {r['visual_tokens']} | {f(e.get('ar'))} | {f(e.get('tree'))} | "
                         f"{f(e.get('break_even_tau'))} | {f(e.get('projected_dsr'))} | {f(c.get('ar'))} | "
                         f"{f(c.get('tree'))} | {f(c.get('break_even_tau'))} | {f(c.get('projected_dsr'))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--text", type=int, default=128, help="prompt text tokens")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--whole-steps", action="store_true", help="also time whole steps of sparrow.generate")
    ap.add_argument("--compile", action="store_true", help="with --whole-steps: also with compile=True")
    ap.add_argument("--out", default=os.path.join(_ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    import transformers

    from sparrow.draft import SparrowDraft
    from sparrow.targets import load_target

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    lengths = args.lengths or LENGTHS[args.size]
    t0 = time.perf_counter()
    model = build_target(args.size, args.device, dtype, args.layers)
    target = load_target(model)
    print(f"built the {args.size} target in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for i, n_visual in enumerate(lengths):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        inputs = video_prompt(model, n_visual, args.text, GRID[args.size], args.device)
        ms, pre = time_target(target, inputs, args.device, args.reps)
        row = {"visual_tokens": n_visual, "text_tokens": args.text, **ms}
        row["sparrow"] = time_draft(target, pre, "none", args.device, args.reps)
        row["msd"] = time_draft(target, pre, "embed", args.device, args.reps)
        if args.whole_steps:
            del pre
            draft = SparrowDraft.from_target(target).eval()
            row["whole_eager"] = time_whole_steps(target, draft, inputs, args.device, False)
            if args.compile:
                row["whole_compiled"] = time_whole_steps(target, draft, inputs, args.device, True)
        if args.device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        project(row, shortest=i == 0, longest=i == len(lengths) - 1 and len(lengths) > 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": f"Qwen2.5-VL-{args.size} shapes, random weights", "device": device_name(args.device),
            "dtype": str(dtype).split(".")[1], "torch": torch.__version__, "transformers": transformers.__version__,
            "layers": model.config.text_config.num_hidden_layers, "reps": args.reps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = write(rows, meta, args.out, args.device)
    print(markdown(rows, meta))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
