"""`make gpu-check` without a GPU: the same script a GPU run uses, at tiny shapes on CPU, so that it
cannot rot between the rare GPU runs; and the judging of the ops' GPU targets."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from gpu_check_summary import summary, targets  # noqa: E402

from sparrow import ops  # noqa: E402

EXPECTED = {"gpu_check.md", "gpu_check.log", "ops_cpu.json", "ops_cpu.md", "target_step_cpu.json",
            "target_step_cpu.md", "step_cpu.json", "step_cpu.md"}


@pytest.mark.skipif(not ops.HAS_COMPILED_OPS, reason="needs the compiled ops (make build)")
def test_dry_run_writes_every_stage_into_at_most_8_files(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert set(os.listdir(tmp_path)) == EXPECTED  # 8: what a device run can bring back
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in md
    for stage in ("ops", "target_step", "host_step"):
        assert f"| {stage} | ok |" in md
    assert "| build | skipped" in md and "| tests | skipped" in md
    got = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert {r["op"] for r in got["rows"]} == {"fused_fc", "text_attention", "gather_kv_", "verify"}
    assert got["meta"]["copy_GB_per_s"] > 0
    assert all(r["sdpa_ms"] > 0 for r in got["rows"] if r["op"] == "text_attention")
    step = json.loads((tmp_path / "target_step_cpu.json").read_text())
    for row in step["rows"]:
        for key in ("prefill", "ar_step", "verify_8", "verify_60", "verify_60_sdpa", "accept_60", "commit_4"):
            assert row[key] > 0, key
        for draft in ("sparrow", "msd"):
            assert math.isfinite(row[draft]["break_even_tau"]) and row[draft]["break_even_tau"] > 0
    # the paper's tau at the shortest and longest length only; Sparrow's draft keeps text entries only
    assert [r["sparrow"]["paper_tau"] is not None for r in step["rows"]] == [True, True]
    assert all(r["msd"]["draft_cache_len"] > r["sparrow"]["draft_cache_len"] for r in step["rows"])


def _ops(fc_pct, ta_ms, sdpa_ms, verify_ms):
    rows = [{"op": "fused_fc", "regime": "decode", "shape": f"N={n} D=H=Dout=3584", "pct_copy_bw": p}
            for n, p in fc_pct.items()]
    rows.append({"op": "text_attention", "regime": "tree", "shape": "B=1 Lq=61 L=4096 hq=28", "op_ms": ta_ms,
                 "sdpa_ms": sdpa_ms})
    rows.append({"op": "verify", "regime": "greedy", "shape": "B=8 N=60 V=152064", "op_ms": verify_ms})
    return {"rows": rows, "meta": {"copy_GB_per_s": 4300.0}}


def test_targets_are_judged_from_the_figures():
    good = "\n".join(targets(_ops({1: 80.0, 64: 71.0, 80: 10.0}, 0.09, 0.1, 0.015)))
    assert good.count("met") == 3 and "NOT" not in good  # N=80 is beyond the N <= 64 target
    bad = "\n".join(targets(_ops({1: 80.0, 16: 50.0}, 0.2, 0.1, 0.025)))
    assert bad.count("NOT met") == 3
    assert "N=16 50%" in bad and "25.0 us" in bad


def test_summary_shows_failed_stages_with_their_output(tmp_path):
    env = {"device": "none (CPU dry run)", "date": "now", "commit": "abc", "python": "3", "torch": "t",
           "cuda": None, "transformers": "x"}
    plan = [SimpleNamespace(name="ops", status="failed (exit 1)", seconds=3.0, tail="Traceback: boom")]
    md = summary(env, plan, str(tmp_path), gpu=False)
    assert "| ops | failed (exit 1) | 3 |" in md and "Traceback: boom" in md
