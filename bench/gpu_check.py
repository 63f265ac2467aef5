"""`make gpu-check`: what the first minutes on a GPU must answer, in one command.

On a machine with a CUDA GPU, in order, each stage in its own process (a crash or a hang ends
that stage, not the check) under one overall deadline:
  build        the extension for this GPU (setup.py; torch's JIT build if CMake fails)
  tests        the CUDA tests (pytest -m cuda)
  ops          bench_ops at 7B shapes, bf16, with the copy bandwidth measured in the same run
  target_step  bench_target_step: prefill, AR step, verify 8 / 60, draft steps, whole generate
               steps and the projected DSR at Qwen2.5-VL-7B shapes (random weights) for 0.5k, 1.5k,
               17k and 25k visual tokens
  host_step    bench_step: dispatches, host reads and ms per decode step on CUDA, eager and compiled
Without a GPU it says so and runs the same stages at tiny shapes on CPU (a dry run, in seconds;
tests/test_gpu_check.py runs it, so the script cannot rot between GPU runs); build and tests
are skipped there (`make test` covers them).

Writes at most 8 files into --out: gpu_check.md (the summary, printed last), gpu_check.log
(every stage's output), and each benchmark's JSON and markdown.

    make gpu-check [GPU_CHECK_OUT=DIR]        python bench/gpu_check.py [--out DIR] [--deadline S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

from gpu_check_summary import summary  # noqa: E402


@dataclass
class Stage:
    name: str
    gpu: list | None  # argv on a GPU (None: not run there)
    dry: list | None  # argv of the CPU dry run (None: skipped there)
    cap_s: float  # the most this stage may take
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def stages(out: str) -> list[Stage]:
    py = sys.executable
    return [
        Stage("build", [py, os.path.join(BENCH, "gpu_build.py")], None, 300),
        Stage("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-rfE", "-p", "no:cacheprovider",
                        os.path.join(ROOT, "tests")], None, 150),
        Stage("ops", [py, os.path.join(BENCH, "bench_ops.py"), "--device", "cuda", "--dtypes", "bfloat16",
                      "--no-compile", "--min-time", "0.2", "--out", out],
              [py, os.path.join(BENCH, "bench_ops.py"), "--device", "cpu", "--tiny", "--dtypes", "float32",
               "--no-compile", "--out", out], 120),
        Stage("target_step", [py, os.path.join(BENCH, "bench_target_step.py"), "--size", "7b", "--device", "cuda",
                              "--reps", "10", "--whole-steps", "--out", out],
              [py, os.path.join(BENCH, "bench_target_step.py"), "--size", "tiny", "--device", "cpu",
               "--reps", "2", "--whole-steps", "--out", out], 210),
        Stage("host_step", [py, os.path.join(BENCH, "bench_step.py"), "--device", "cuda", "--batch", "1", "4",
                            "--reps", "3", "--compile", "--out", out],
              [py, os.path.join(BENCH, "bench_step.py"), "--device", "cpu", "--layers", "2", "--batch", "1",
               "--reps", "1", "--out", out], 200),
    ]


def run_stage(stage: Stage, argv: list, log, deadline: float) -> None:
    """Run one stage with its output appended to the log; its status and the tail of its output."""
    budget = min(stage.cap_s, deadline - time.monotonic())
    if budget < 10:
        stage.status = "skipped: out of time"
        return
    log.write(f"\n===== {stage.name}: {' '.join(argv)}\n")
    log.flush()
    start_at = log.tell()
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        rc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=budget).returncode
        stage.status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        stage.status = f"timed out after {budget:.0f} s"
    stage.seconds = time.monotonic() - t0
    log.flush()
    with open(log.name) as f:
        f.seek(start_at)
        stage.tail = f.read()[-3000:]


def environment(gpu: bool) -> dict:
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "commit": _git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), nvidia_smi=_run(
                       ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit", "--format=csv,noheader"]),
                   nvcc=_run(["nvcc", "--version"]).splitlines()[-1:])
    else:
        env["device"] = "none (CPU dry run)"
    return env


def _run(argv: list) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def _git_commit() -> str:
    out = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    return out + (" (with local changes)" if dirty and dirty != "unavailable" else "")


def default_out(env: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"].split("(")[0]).strip("-").lower() or "cpu"
    return os.path.join(ROOT, "bench", "results", f"gpu_check_{slug}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for the (at most 8) result files")
    ap.add_argument("--deadline", type=float, default=470, help="seconds for every stage together")
    ap.add_argument("--dry-run", action="store_true", help="the CPU dry run even where a GPU is visible")
    args = ap.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    env = environment(gpu)
    print("gpu-check: " + (f"{env['device']} (sm {env['capability']}), torch {env['torch']}" if gpu else
          "no CUDA GPU visible: a dry run of the same stages at tiny shapes on CPU"), flush=True)
    out = os.path.abspath(args.out or default_out(env))
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + args.deadline
    plan = stages(out)
    with open(os.path.join(out, "gpu_check.log"), "w") as log:
        log.write(json.dumps(env, indent=1) + "\n")
        for stage in plan:
            argv_ = stage.gpu if gpu else stage.dry
            if argv_ is None:
                stage.status = "skipped: dry run (make test covers it)"
            elif stage.name == "tests" and plan[0].status not in ("ok", "not run"):
                stage.status = "skipped: the build failed"
            else:
                run_stage(stage, argv_, log, deadline)
            print(f"  {stage.name:12s} {stage.status} ({stage.seconds:.0f} s)", flush=True)
            if not stage.status.startswith(("ok", "skipped")):
                print(stage.tail, flush=True)
    text = summary(env, plan, out, gpu)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    _check_file_budget(out)
    print(text)
    print(f"gpu-check: results in {out}")
    return 0 if all(s.status.startswith(("ok", "skipped: dry")) for s in plan) else 1


def _check_file_budget(out: str, limit: int = 8) -> None:
    files = sorted(os.listdir(out))
    if len(files) > limit:  # a stage wrote more than it should: say so rather than lose results later
        print(f"gpu-check: warning: {len(files)} files in {out} (at most {limit} come back from a device run): {files}")


if __name__ == "__main__":
    sys.exit(main())
