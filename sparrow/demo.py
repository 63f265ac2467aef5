"""`make demo` (`python -m sparrow.demo`): Sparrow against its baselines on the synthetic video world.

    target   assets/world_target/     a small Qwen2.5-VL trained on the world (scripts/train_world_target.py)
    drafts   assets/drafts/<method>/  trained against it (scripts/build_demo_drafts.py)

For held-out clips (seeds no training ever used) shown at several visual lengths, every method
answers greedily the clip's question through `sparrow.generate`: autoregressive (the target alone,
through the same loop), Sparrow (dynamic tree), and the baselines: an MSD-style draft (attends to
the visual input embeddings), Sparrow without VATA (attends to the target's layer-L/2 visual
states), without IVSB, without MTP. Per method and visual length it reports (DESIGN.md's words):

    accepted_per_step   draft tokens accepted per verify step (the new token not counted)
    tokens_per_step     accepted_per_step + 1
    decode tokens/s     new tokens after the first / decode time (after prefill)
    DSR                 AR decode time / this method's decode time (after prefill), same requests
    ESR                 the same for the whole request (vision encoding + prefill included)

Methods run interleaved clip by clip, so a load change on a shared machine hits them all alike.
Every speculative answer must equal the autoregressive one token for token (greedy is lossless):
the demo checks each and says so loudly when one differs. Results: results/demo.json, demo.md,
demo.png (accepted_per_step and DSR against visual length).

When the assets are missing (or the drafts were built for another target), the demo first runs
the build scripts and says how long that takes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_DIR = ROOT / "assets" / "world_target"
DRAFTS_DIR = ROOT / "assets" / "drafts"
RESULTS_DIR = ROOT / "results"
BUILD_INFO = "build_info.json"

# Method name -> draft folder under assets/drafts (None: the target alone).
METHODS = {
    "autoregressive": None,
    "sparrow": "sparrow",
    "msd": "msd",
    "no-vata": "no_vata",
    "no-ivsb": "no_ivsb",
    "no-mtp": "no_mtp",
}
METHOD_NOTES = {
    "autoregressive": "the target alone, one token per forward (same loop, no draft tokens)",
    "sparrow": "HSR + VATA draft trained with IVSB + MTP (visual_source none)",
    "msd": "MSD-style draft: attends to the visual input embeddings (visual_source embed)",
    "no-vata": "Sparrow without VATA: attends to the layer-L/2 visual states (visual_source mid)",
    "no-ivsb": "Sparrow trained without the IVSB visual prefix",
    "no-mtp": "Sparrow trained without MTP (one pass on the target's features)",
}
# Visual lengths of the sweep: (frames, height = width). One visual token per 28x28 pixels per
# frame pair, 64 per pair at 224x224: 4 -> 128, 16 -> 512, 48 -> 1536, 96 -> 3072, 192 -> 6144
# visual tokens. Longer clips are denser in time (a clip always spans the same story), as a real
# video sampled at a higher frame rate. The target trained on at most 768 visual tokens (<= 96
# frames), the drafts on at most 4096.
LENGTHS = ((4, 224), (16, 224), (48, 224), (96, 224), (192, 224))
CLIPS = 6  # per visual length: with 3, per-length acceptance moved by ~0.8 between clip sets
DEMO_SEED0 = 30_000_000  # held-out clips: the target trains below 10M, its eval uses 10M+, drafts 5M+
# Small tree: on a CPU every tree node costs verify time (compute grows with nodes x context).
# Of (4,3,10), (5,2,8), (6,2,10), (3,2,5), (6,3,14) this gave the best DSR at 512 and 6144 tokens.
TREE = dict(depth=5, top_k=2, total_nodes=8)


# -- the world's processor, with the tokenizer of the target being used ------------------------
_TOKENIZERS: dict = {}


def world_inputs(record: dict, model=None) -> dict:
    """The CLI's --processor for the world (`sparrow.demo:world_inputs`): sparrow.world's
    make_inputs, with the tokenizer.json saved beside the target `model` when there is one (so a
    target trained elsewhere, e.g. in /tmp, gets its own vocabulary), else the shipped one."""
    from sparrow.world.processor import make_inputs
    from sparrow.world.tokenizer import WordTokenizer

    folder = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    tok = None
    if folder and os.path.exists(os.path.join(folder, "tokenizer.json")):
        if folder not in _TOKENIZERS:
            _TOKENIZERS[folder] = WordTokenizer.load(os.path.join(folder, "tokenizer.json"))
        tok = _TOKENIZERS[folder]
    return make_inputs(record, tokenizer=tok)


def target_fingerprint(target_dir) -> str:
    """sha256 (first 16 hex digits) of the target's weights: drafts record which target they were
    trained against, the demo rebuilds them when the target changed."""
    h = hashlib.sha256()
    with open(Path(target_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def visual_tokens(frames: int, height: int) -> int:
    from sparrow.world.render import visual_tokens as count

    return int(count(frames, height, height))


def trained_max_visual_tokens(target_dir) -> int | None:
    """Largest visual length the target saw in training (its train_info.json), or None."""
    try:
        info = json.loads((Path(target_dir) / "train_info.json").read_text())
        return max(visual_tokens(f, h) for f, h in info["train_config"]["lengths"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


# -- assets ----------------------------------------------------------------------------------
def _run(cmd: list[str], what: str) -> None:
    print(f"demo: {what}:\n  {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"demo: {what} took {time.time() - t0:.0f}s", flush=True)


def ensure_assets(target_dir: Path, drafts_dir: Path) -> None:
    """Build what is missing: the target (scripts/train_world_target.py, ~1 hour on one
    thread) and the drafts (scripts/build_demo_drafts.py, ~20 minutes on one thread)."""
    if not (target_dir / "config.json").exists():
        print(f"demo: no trained world target in {target_dir}; training it now with "
              "scripts/train_world_target.py (about an hour on one CPU thread; measured 62 min)", flush=True)
        _run([sys.executable, "scripts/train_world_target.py", "--out", str(target_dir)], "training the target")
    info_path = drafts_dir / BUILD_INFO
    reason = None
    if not info_path.exists():
        reason = f"no drafts in {drafts_dir}"
    else:
        info = json.loads(info_path.read_text())
        missing = [m for m, d in METHODS.items() if d and not (drafts_dir / d / "model.safetensors").exists()]
        if missing:
            reason = f"drafts missing for {missing}"
        elif info.get("target_sha256") != target_fingerprint(target_dir):
            reason = "the drafts were trained against another target"
    if reason:
        print(f"demo: {reason}; building them with scripts/build_demo_drafts.py "
              "(about 20 minutes on one CPU thread; measured 18-22 min)", flush=True)
        _run([sys.executable, "scripts/build_demo_drafts.py", "--target", str(target_dir), "--out", str(drafts_dir)],
             "building the drafts")


def load_models(target_dir: Path, drafts_dir: Path, methods=None):
    """(target adapter, {method: SparrowDraft or None}) on CPU in float32."""
    from sparrow.cli import load_target
    from sparrow.draft import SparrowDraft

    methods = list(methods or METHODS)
    target = load_target(str(target_dir), device="cpu", dtype="float32")
    drafts = {}
    for m in methods:
        if METHODS[m] is None:
            drafts[m] = None
        else:
            drafts[m] = SparrowDraft.from_pretrained(str(drafts_dir / METHODS[m]), target).float().eval()
    return target, drafts


# -- the measurement ---------------------------------------------------------------------------
def clip_records(lengths, clips: int, seed0: int = DEMO_SEED0) -> list[dict]:
    """Held-out clips: `clips` scenes per visual length (different scenes for every length)."""
    recs = []
    for li, (frames, height) in enumerate(lengths):
        for c in range(clips):
            seed = seed0 + 1000 * li + c
            recs.append({"id": f"v{visual_tokens(frames, height)}-s{seed}", "seed": seed, "frames": frames,
                         "height": height, "visual_tokens": visual_tokens(frames, height)})
    return recs


def aggregate(rows: list[dict], methods: list[str]) -> dict:
    """The eval figures per method (sparrow.train.evaluate.aggregate: times summed over requests)
    plus `identical`: every answer of the method equal to the autoregressive one."""
    from sparrow.train.evaluate import aggregate as eval_figures

    out = eval_figures(rows, methods)
    for m, figures in out.items():
        figures["identical"] = all(r["identical"] for r in rows if r["method"] == m)
    return out


def run_demo(target, drafts: dict, lengths=LENGTHS, clips: int = CLIPS, max_new_tokens: int = 160, tree=None,
             repeats: int = 2, progress: bool = True) -> dict:
    """Greedy generation of every clip by every method (interleaved); each request runs `repeats`
    times and the fastest run's timings are kept (other jobs on a shared machine only ever add
    time). Returns the results dict (methods, lengths, per-length figures, requests, sample,
    settings, environment)."""
    import torch
    from tqdm.auto import tqdm

    from sparrow.generation import generate
    from sparrow.drafting import TreeConfig
    from sparrow.train.records import prepare_inputs

    tree = tree or TreeConfig(**TREE)
    methods = list(drafts)
    if methods[0] != "autoregressive":
        raise ValueError("run_demo: the first method must be 'autoregressive' (the reference)")
    records = clip_records(lengths, clips)

    def run(method, inputs):
        d = drafts[method]
        return generate(target, d, inputs, max_new_tokens, temperature=0.0, seed=0, time_stages=True,
                        **({} if d is None else {"tree": tree}))

    def fastest(method, inputs):
        outs = [run(method, inputs) for _ in range(max(1, repeats))]
        if any(o.tokens != outs[0].tokens for o in outs):
            raise RuntimeError(f"{method}: repeated greedy runs gave different tokens (nondeterminism)")
        return min(outs, key=lambda o: o.stats.total_s)

    # Warm-up (untimed): first calls pay for lazy init, allocator growth, kernel caches.
    warm, _ = prepare_inputs(records[0], world_inputs, target.model)
    for m in tqdm(methods, desc="warm-up", unit="method", disable=not progress):
        run(m, warm)

    rows, mismatches = [], []
    bar = tqdm(total=len(records) * len(methods), desc="demo", unit="request", disable=not progress)
    for rec in records:
        inputs, _ = prepare_inputs(rec, world_inputs, target.model)
        ref = None
        for m in methods:
            bar.set_postfix_str(f"{rec['visual_tokens']} visual, {m}")
            out = fastest(m, inputs)
            tokens = list(out.tokens[0])
            if m == "autoregressive":
                ref = tokens
            identical = tokens == ref
            if not identical:
                mismatches.append((rec["id"], m))
                first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
                bar.write(f"!!! LOSSLESS CHECK FAILED: {m} on clip {rec['id']} differs from autoregressive "
                          f"(first difference at token {first}) !!!")
            s = out.stats
            rows.append({"id": rec["id"], "seed": rec["seed"], "visual_tokens": rec["visual_tokens"], "method": m,
                         "tokens": tokens, "identical": identical, "new_tokens": s.new_tokens,
                         "row_steps": s.row_steps, "accepted_per_step": s.accepted_per_step,
                         "prefill_s": s.prefill_s, "decode_s": s.decode_s, "total_s": s.total_s,
                         "draft_s": s.draft_s, "verify_s": s.verify_s})
            bar.update(1)
    bar.close()
    vts = sorted({r["visual_tokens"] for r in rows})
    per_length = {str(v): aggregate([r for r in rows if r["visual_tokens"] == v], methods) for v in vts}
    answer_tokens = {str(v): sum(len(r["tokens"]) for r in rows if r["visual_tokens"] == v and r["method"] == methods[0])
                     / max(1, sum(1 for r in rows if r["visual_tokens"] == v and r["method"] == methods[0])) for v in vts}
    tok = _tokenizer(target)
    answer_accuracy = {str(v): _answer_accuracy([r for r in rows if r["visual_tokens"] == v
                                                 and r["method"] == methods[0]], tok) for v in vts}
    first = records[0]
    return {
        "methods": methods,
        "method_notes": {m: METHOD_NOTES.get(m, "") for m in methods},
        "visual_tokens": vts,
        "lengths": [{"frames": f, "height": h, "width": h, "visual_tokens": visual_tokens(f, h)} for f, h in lengths],
        "per_length": per_length,
        "answer_tokens": answer_tokens,  # mean length of the target's answers per visual length
        "answer_accuracy": answer_accuracy,  # the target's answers scored against the clips' ground truth
        "overall": aggregate(rows, methods),
        "lossless": not mismatches,
        "mismatches": mismatches,
        "requests": rows,
        "sample": _sample(first, [r for r in rows if r["id"] == first["id"]], tok),
        "settings": {"clips_per_length": clips, "max_new_tokens": max_new_tokens, "temperature": 0.0,
                     "tree": dict(depth=tree.depth, top_k=tree.top_k, total_nodes=tree.total_nodes),
                     "seed0": DEMO_SEED0, "threads": torch.get_num_threads(), "repeats": repeats},
        "environment": _environment(),
    }


def _tokenizer(target):
    """The world tokenizer saved beside the target (else the shipped one)."""
    from sparrow.world.tokenizer import WordTokenizer

    folder = getattr(target.model.config, "_name_or_path", None)
    tok_path = Path(folder or TARGET_DIR) / "tokenizer.json"
    return WordTokenizer.load(tok_path if tok_path.exists() else TARGET_DIR / "tokenizer.json")


def _answer_accuracy(rows: list[dict], tok) -> dict:
    """Attribute accuracy (world.target.accuracy) of the target's answers in `rows`."""
    from sparrow.world.scene import make_scene
    from sparrow.world.target import accuracy

    answers = [tok.decode([t for t in r["tokens"] if t != tok.eos_token_id]) for r in rows]
    return accuracy(answers, [make_scene(r["seed"]).attributes() for r in rows])


def _sample(record: dict, rows: list[dict], tok) -> dict:
    """Ground truth, the target's (AR) answer in words, whether Sparrow's is identical."""
    from sparrow.world.language import describe, make_question
    from sparrow.world.scene import make_scene

    ar = next(r for r in rows if r["method"] == "autoregressive")
    sp = next((r for r in rows if r["method"] == "sparrow"), None)
    scene = make_scene(record["seed"])
    return {
        "id": record["id"], "seed": record["seed"], "frames": record["frames"], "height": record["height"],
        "visual_tokens": record["visual_tokens"], "question": make_question(record["seed"]),
        "ground_truth": describe(scene), "target_answer": tok.decode([t for t in ar["tokens"] if t != tok.eos_token_id]),
        "sparrow_identical": None if sp is None else sp["tokens"] == ar["tokens"],
        "tokens": len(ar["tokens"]),
    }


def _environment() -> dict:
    import torch
    import transformers

    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- writers -----------------------------------------------------------------------------------
def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _f(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(result: dict) -> str:
    """The demo's tables as markdown: one table per visual length, then the sample."""
    s, env = result["settings"], result["environment"]
    t = s["tree"]
    lines = [
        "# Sparrow demo: synthetic video world",
        "",
        f"{s['clips_per_length']} held-out clip(s) per visual length, greedy, at most {s['max_new_tokens']} new "
        f"tokens, fastest of {s.get('repeats', 1)} runs per request; dynamic tree depth {t['depth']}, "
        f"top-k {t['top_k']}, {t['total_nodes']} nodes. "
        f"{env['device']} ({env['cpu']}, {_threads(env['threads'])}), torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['time']}.",
        "",
        "accepted/step: draft tokens accepted per verify step (the new token not counted); tokens/step = "
        "accepted/step + 1. DSR: autoregressive decode time / this method's (after prefill); ESR: the same "
        "for the whole request (vision encoding + prefill included). draft / verify ms/step: where a "
        "step's time goes (drafting the tree and updating the draft's cache; the target's forward over the "
        "tree + acceptance + cache commit). identical: every answer equals the autoregressive one token for token.",
        "",
    ]
    trained = result.get("target_trained_max_visual_tokens")
    if trained:
        lines += [f"The target was trained on clips of at most {trained} visual tokens; longer clips are an "
                  "extrapolation for it. Under each heading: the mean length of its answers and their core "
                  "attribute accuracy (colour, shape, motion of each object, scored against the clip's ground "
                  "truth; chance is about 0.25), which show whether its answers hold up.", ""]
    for v in result["visual_tokens"]:
        figs = result["per_length"][str(v)]
        n = result.get("answer_tokens", {}).get(str(v))
        acc = result.get("answer_accuracy", {}).get(str(v))
        about = ([f"{n:.0f} tokens on average"] if n else []) + ([f"core accuracy {acc['core']:.2f}"] if acc else [])
        lines += [f"## {v} visual tokens" + (f" (target's answers: {', '.join(about)})" if about else ""), "",
                  "| method | accepted/step | tokens/step | decode tokens/s | DSR | ESR | draft ms/step | "
                  "verify ms/step | identical |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, f in figs.items():
            lines.append(f"| {m} | {_f(f['accepted_per_step'])} | {_f(f['tokens_per_step'])} | "
                         f"{_f(f['decode_tokens_per_s'], '.1f')} | {_f(f['DSR'], '.2f', 'x')} | "
                         f"{_f(f['ESR'], '.2f', 'x')} | {_f(f.get('draft_ms_per_step'), '.1f')} | "
                         f"{_f(f.get('verify_ms_per_step'), '.1f')} | {'yes' if f['identical'] else '**NO**'} |")
        lines.append("")
    sm = result.get("sample")
    if sm:
        lines += ["## One sample", "",
                  f"Clip seed {sm['seed']} ({sm['frames']} frames at {sm['height']}x{sm['height']}, "
                  f"{sm['visual_tokens']} visual tokens). Question: *{sm['question']}*", "",
                  f"- ground truth: {sm['ground_truth']}",
                  f"- target's answer: {sm['target_answer']}",
                  f"- Sparrow's speculative answer identical token for token: "
                  f"{'yes' if sm['sparrow_identical'] else 'NO'}", ""]
    lines += ["Methods: " + "; ".join(f"**{m}**: {n}" for m, n in result["method_notes"].items()), ""]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """accepted_per_step and DSR against visual length, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vts = result["visual_tokens"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in result["methods"]:
        aps = [result["per_length"][str(v)].get(m, {}).get("accepted_per_step") for v in vts]
        dsr = [result["per_length"][str(v)].get(m, {}).get("DSR") for v in vts]
        style = dict(marker="o", linewidth=2.5 if m == "sparrow" else 1.5,
                     linestyle="--" if m == "autoregressive" else "-", label=m)
        axes[0].plot(vts, [a if a is not None else float("nan") for a in aps], **style)
        axes[1].plot(vts, [d if d is not None else float("nan") for d in dsr], **style)
    axes[0].set_title("draft tokens accepted per verify step")
    axes[0].set_ylabel("accepted / step")
    axes[1].set_title("decode speedup over autoregressive (DSR)")
    axes[1].set_ylabel("DSR (x)")
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis' own minor labels would overprint the lengths
        ax.set_xlabel("visual tokens")
        ax.set_xticks(vts)
        ax.set_xticklabels([str(v) for v in vts])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Sparrow demo, synthetic video world ({result['environment']['device']}, "
                 f"{_threads(result['environment']['threads'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out_dir) -> dict:
    """results/demo.json, demo.md, demo.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "demo.json", "md": out / "demo.md", "png": out / "demo.png"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def console_table(result: dict) -> str:
    head = f"{'visual':>7} {'method':<15} {'acc/step':>8} {'tok/step':>8} {'dec tok/s':>9} {'DSR':>7} {'ESR':>7} same"
    lines = [head, "-" * len(head)]
    for v in result["visual_tokens"]:
        for m, f in result["per_length"][str(v)].items():
            lines.append(f"{v:>7} {m:<15} {_f(f['accepted_per_step']):>8} {_f(f['tokens_per_step']):>8} "
                         f"{_f(f['decode_tokens_per_s'], '.1f'):>9} {_f(f['DSR'], '.2f', 'x'):>7} "
                         f"{_f(f['ESR'], '.2f', 'x'):>7} {'yes' if f['identical'] else 'NO'}")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparrow.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(TARGET_DIR), help="world target folder (default: the shipped one)")
    ap.add_argument("--drafts", default=str(DRAFTS_DIR), help="drafts folder (default: the shipped ones)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder (demo.json, demo.md, demo.png)")
    ap.add_argument("--clips", type=int, default=CLIPS, help=f"held-out clips per visual length (default {CLIPS})")
    ap.add_argument("--lengths", default=",".join(f"{f}x{h}" for f, h in LENGTHS),
                    help="FRAMESxSIZE,... visual lengths (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2, help="runs per request; the fastest is kept (default 2)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list; autoregressive always runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the models are tiny, and on a small machine shared with "
                         "other jobs two threads spin against each other and make every timing noisy; "
                         "0: torch's default)")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building missing assets")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    target_dir, drafts_dir = Path(a.target), Path(a.drafts)
    if not a.no_build:
        ensure_assets(target_dir, drafts_dir)
    lengths = []
    for spec in a.lengths.split(","):
        try:
            f, h = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            ap.error(f"--lengths {spec!r}: expected FRAMESxSIZE, e.g. 16x224")
        if h % 28:
            ap.error(f"--lengths {spec!r}: the size must be a multiple of 28")
        lengths.append((f, h))
    methods = ["autoregressive"] + [m for m in a.methods.split(",") if m and m != "autoregressive"]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")

    print(f"demo: loading the target ({target_dir}) and {len(methods) - 1} drafts ({drafts_dir})", flush=True)
    target, drafts = load_models(target_dir, drafts_dir, methods)
    print(f"demo: {a.clips} held-out clip(s) at each of "
          + ", ".join(f"{visual_tokens(f, h)} ({f} frames {h}x{h})" for f, h in lengths)
          + f" visual tokens; {len(methods)} methods; {_threads(torch.get_num_threads())}", flush=True)
    result = run_demo(target, drafts, lengths, a.clips, a.max_new_tokens, repeats=a.repeats,
                      progress=not a.no_progress)
    result["demo_seconds"] = round(time.time() - t_start, 1)
    result["target_trained_max_visual_tokens"] = trained_max_visual_tokens(target_dir)
    paths = write_results(result, a.out)

    print()
    print(console_table(result))
    sm = result["sample"]
    print(f"\nsample: clip seed {sm['seed']}, {sm['visual_tokens']} visual tokens. Q: {sm['question']}")
    print(f"  ground truth   : {sm['ground_truth']}")
    print(f"  target's answer: {sm['target_answer']}")
    if result["lossless"]:
        print(f"  speculative answers identical to the target's, token for token: yes "
              f"(all {len(result['requests'])} requests checked)")
    else:
        print("!" * 80)
        print(f"!!! LOSSLESS CHECK FAILED: {len(result['mismatches'])} speculative answers differ from "
              f"autoregressive: {result['mismatches']}")
        print("!" * 80)
    print(f"\ndemo: wrote {paths['json']}, {paths['md']}, {paths['png']} in {result['demo_seconds']:.0f}s")
    return 0 if result["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
