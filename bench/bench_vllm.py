"""Sparrow inside vLLM against vLLM alone and vLLM's EAGLE path, at growing visual lengths.

    build/vllm-env/bin/python bench/bench_vllm.py --out bench/results/vllm_cpu   # make vllm-env first

On the shipped world target (assets/world_target written as a Hugging Face folder,
tests/in_vllm/vllm_fixtures.py) with its demo Sparrow draft, on rendered clips of three lengths
(`--target tiny`: a tiny random Qwen2.5-VL whose draft is trained in the run), three engines on
the same prompts:
  none     vLLM without speculation;
  eagle    the same draft behind vLLM's own EAGLE proposer: it attends over every position,
           visual ones included (MSD-style; SPARROW_VLLM_TEXT_ONLY=0);
  sparrow  the Sparrow plugin: text positions only.
Per engine and length: output tokens/s (generation wall time), draft tokens accepted per step
(vLLM's counters) and the draft's time per propose call (the plugin times it). Writes
<out>.json and <out>.md; the machine is named in both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "in_vllm")]

K = 3
# frames per clip, and visual tokens per frame pair: world 224x224 -> 64 (512, 2048, 6144 tokens);
# tiny 24x32 -> 12 (48, 384, 1536)
SETUPS = {"world": ((16, 64, 192), 64), "tiny": ((8, 64, 256), 12)}


NAMES = {"world": "The world target (3M-parameter Qwen2.5-VL) and its demo Sparrow draft",
         "tiny": "A tiny random Qwen2.5-VL and a draft trained on its answers to short clips"}
READING = {
    "world": "The demo draft was trained on clips of 4 to 192 frames, on text positions only. Served that way "
             "(Sparrow) its time per propose call stays flat as the video grows, while behind vLLM's EAGLE feed "
             "it grows with the video (its first pass and its attention cover every visual position), and it "
             "accepts more. Output tokens/s count each request's prefill and follow the target's cost; on a "
             "CPU a verify of k+1 tokens costs close to k+1 one-token steps, so speculation does not pay here "
             "for either feed (on a GPU a verify costs about one step: make gpu-check measures it).",
    "tiny": "The draft was trained on clips of 8-18 frames (48-108 visual tokens): longer videos are outside "
            "its data, so its acceptance falls with the length for both feeds; the draft, trained on text "
            "positions only, accepts more when served as it was trained (Sparrow) than when vLLM's EAGLE feed "
            "adds the visual positions.",
}


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def engine_run(target: str, served: str | None, text_only: bool, prompts: dict, max_tokens: int, folder: str) -> dict:
    """One engine, the prompts of each length in turn: tokens/s, acceptance, draft ms/step."""
    from vllm import SamplingParams
    from vllm_fixtures import vllm_engine

    spec = None if served is None else {"method": "eagle", "model": served, "num_speculative_tokens": K,
                                        "disable_padded_drafter_batch": True}
    os.environ["SPARROW_VLLM_TEXT_ONLY"] = "1" if text_only else "0"
    times = os.path.join(folder, f"draft-times-{text_only}-{served is not None}.txt")
    os.environ["SPARROW_VLLM_RECORD_DRAFT_TIME"] = times  # read by the engine's processes when they start
    kw = {"speculative_config": spec} if spec else {}
    rows = {}
    with vllm_engine(target, disable_log_stats=False, max_model_len=8192, max_num_batched_tokens=8192, **kw) as llm:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(next(iter(prompts.values()))[:1], params)  # warm-up
        for frames, batch in prompts.items():
            before, calls_before = _counters(llm), len(_draft_times(times))
            start = time.perf_counter()
            outs = llm.generate(batch, params)
            seconds = time.perf_counter() - start
            after, calls = _counters(llm), _draft_times(times)[calls_before:]
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            drafts = after.get("drafts", 0) - before.get("drafts", 0)
            accepted = after.get("accepted", 0) - before.get("accepted", 0)
            rows[frames] = {"tokens_per_s": tokens / seconds, "accepted_per_step": accepted / drafts if drafts else None,
                            "draft_ms_per_step": 1e3 * sum(calls) / len(calls) if calls else None,
                            "prompt_tokens": len(outs[0].prompt_token_ids)}
    os.environ.pop("SPARROW_VLLM_RECORD_DRAFT_TIME", None)
    return rows


def _draft_times(path: str) -> list[float]:
    """Seconds of each propose call so far (the plugin appends one line per call)."""
    return [float(x) for x in open(path).read().split()] if os.path.exists(path) else []


def _counters(llm) -> dict:
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def markdown(result: dict) -> str:
    lines = [f"# Sparrow in vLLM (CPU build) — {result['machine']}", "",
             f"{result['target_name']}, chain of {K}, {result['max_tokens']} greedy tokens per request, "
             f"{result['requests']} requests per length; `{result['command']}`.", "",
             "| engine | visual tokens | prompt tokens | output tokens/s | accepted/step | draft ms/propose |",
             "|---|---|---|---|---|---|"]
    for name, rows in result["engines"].items():
        for frames, r in rows.items():
            acc = "-" if r["accepted_per_step"] is None else f"{r['accepted_per_step']:.2f}"
            ms = "-" if r["draft_ms_per_step"] is None else f"{r['draft_ms_per_step']:.2f}"
            lines.append(f"| {name} | {int(frames) // 2 * result['tokens_per_pair']} | {r['prompt_tokens']} | "
                         f"{r['tokens_per_s']:.1f} | "
                         f"{acc} | {ms} |")
    lines += ["", "accepted/step: draft tokens accepted per verify step (vLLM's counters). draft ms/propose: one "
              "call of the proposer, its first pass over the new tokens (a whole prompt at prefill) and the "
              f"{K - 1} chain steps, averaged over the run. " + result["reading"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="world", choices=sorted(SETUPS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vllm_cpu"))
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    from tiny_checkpoints import random_video, write_video
    from vllm_fixtures import trained_draft, video_prompt, world_checkpoint

    from sparrow.inputs.auto import CheckpointProcessor
    from sparrow.integrations.vllm.export import export_vllm
    from sparrow.world import make_scene, render
    from sparrow.world.language import make_question

    folder = tempfile.mkdtemp(prefix="bench_vllm_")
    if a.target == "world":
        target, draft = world_checkpoint(folder), os.path.join(ROOT, "assets", "drafts", "sparrow")
        clip = lambda frames, i: render(make_scene(1000 + i), frames, 224)  # noqa: E731
        question = lambda i: make_question(1000 + i)  # noqa: E731
    else:
        target, draft, _ = trained_draft(folder)
        clip = lambda frames, i: random_video(frames, 24, 32, seed=100 + i)  # noqa: E731
        question = lambda i: "what is moving in the video"  # noqa: E731
    served = export_vllm(draft, os.path.join(folder, "served"))
    proc = CheckpointProcessor(target, use_hf=False)
    frames_list, per_pair = SETUPS[a.target]
    prompts = {}
    for frames in frames_list:
        paths = [write_video(os.path.join(folder, f"b{frames}-{i}.mp4"), clip(frames, i), fps=2)
                 for i in range(a.requests)]
        prompts[frames] = [video_prompt(proc, p, question(i), num_frames=frames) for i, p in enumerate(paths)]
    engines = {"none": engine_run(target, None, True, prompts, a.max_tokens, folder),
               "eagle (every position)": engine_run(target, served, False, prompts, a.max_tokens, folder),
               "sparrow (text only)": engine_run(target, served, True, prompts, a.max_tokens, folder)}
    result = {"machine": machine(), "max_tokens": a.max_tokens, "requests": a.requests, "k": K,
              "target": a.target, "tokens_per_pair": per_pair, "target_name": NAMES[a.target], "reading": READING[a.target],
              "command": f"build/vllm-env/bin/python bench/bench_vllm.py --target {a.target}", "engines": engines}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
