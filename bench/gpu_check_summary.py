"""The summary of a `make gpu-check` run (gpu_check.md): environment, stages, the ops' GPU targets
judged from the measured figures, and each benchmark's table, read from the files it wrote."""

from __future__ import annotations

import glob
import json
import os

# The ops' GPU targets (issue 15), judged only on a GPU.
FC_MIN_PCT_COPY, FC_MAX_ROWS = 70.0, 64
VERIFY_GREEDY_MAX_US = 20.0


def _load(out: str, pattern: str) -> dict | None:
    paths = sorted(glob.glob(os.path.join(out, pattern)))
    if not paths:
        return None
    with open(paths[0]) as f:
        return json.load(f)


def _table_of(out: str, pattern: str) -> list[str]:
    """The markdown table of a benchmark's .md file (its header line dropped)."""
    paths = sorted(glob.glob(os.path.join(out, pattern)))
    if not paths:
        return ["(no results)"]
    with open(paths[0]) as f:
        lines = f.read().strip().splitlines()
    return [line for line in lines if not line.startswith("# ")]


def targets(ops: dict) -> list[str]:
    """One line per GPU target: the figures and whether they meet it."""
    rows, lines = ops["rows"], []
    fc = [r for r in rows if r["op"] == "fused_fc" and int(r["shape"].split()[0][2:]) <= FC_MAX_ROWS]
    if fc:
        worst = min(r["pct_copy_bw"] for r in fc)
        shares = ", ".join(f"{r['shape'].split()[0]} {r['pct_copy_bw']:.0f}%" for r in fc)
        lines.append(f"- fused_fc >= {FC_MIN_PCT_COPY:.0f}% of copy bandwidth at N <= {FC_MAX_ROWS}: "
                     f"{'met' if worst >= FC_MIN_PCT_COPY else 'NOT met'} ({shares})")
    ta = [r for r in rows if r["op"] == "text_attention" and r.get("sdpa_ms")]
    if ta:
        slower = [r for r in ta if r["op_ms"] > r["sdpa_ms"]]
        ratios = ", ".join(f"{r['shape'].split(' hq')[0]}: {r['op_ms'] / r['sdpa_ms']:.2f}x" for r in ta)
        lines.append(f"- text_attention at or under SDPA time on equal work: "
                     f"{'met' if not slower else f'NOT met in {len(slower)} of {len(ta)}'} (op / SDPA: {ratios})")
    greedy = [r for r in rows if r["op"] == "verify" and r["regime"] == "greedy"]
    for r in greedy:
        us = r["op_ms"] * 1e3
        lines.append(f"- verify greedy {r['shape']} under {VERIFY_GREEDY_MAX_US:.0f} us: "
                     f"{'met' if us < VERIFY_GREEDY_MAX_US else 'NOT met'} ({us:.1f} us)")
    return lines or ["- (no op results)"]


def summary(env: dict, plan: list, out: str, gpu: bool) -> str:
    lines = [f"# gpu-check: {env['device']}", "",
             f"{env['date']}; commit {env['commit']}; python {env['python']}, torch {env['torch']} "
             f"(CUDA {env['cuda']}), transformers {env['transformers']}."]
    if gpu:
        lines.append(f"{env['sms']} SMs, {env['memory_gib']} GiB; nvidia-smi (driver, SM and memory clocks, "
                     f"power limit): {env['nvidia_smi']}; nvcc: {' '.join(env['nvcc'])}.")
    else:
        lines.append("No CUDA GPU: a dry run at tiny shapes on CPU. Its figures check that the script runs; "
                     "they say nothing about a GPU.")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in plan]
    ops = _load(out, "ops_*.json")
    if ops is not None:
        lines += ["", f"## The ops' GPU targets (copy bandwidth {ops['meta']['copy_GB_per_s']:.0f} GB/s, same run)", ""]
        lines += targets(ops) if gpu else ["(not judged in a dry run)"]
    for title, pattern in (("Ops (bench/bench_ops.py)", "ops_*.md"),
                           ("Decode step parts and projected DSR (bench/bench_target_step.py)", "target_step_*.md"),
                           ("Host work per decode step (bench/bench_step.py)", "step_*.md")):
        lines += ["", f"## {title}", ""] + _table_of(out, pattern)
    failed = [s for s in plan if not s.status.startswith(("ok", "skipped"))]
    for s in failed:
        lines += ["", f"## {s.name}: {s.status} (end of its output)", "", "```", s.tail[-1500:], "```"]
    return "\n".join(lines)
