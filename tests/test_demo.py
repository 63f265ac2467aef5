"""The demo's shipped assets and its writers (fast: one tiny clip, a few dozen tokens).

- the shipped drafts load against the shipped target (identity and feature checks pass) and were
  built for exactly these target weights (build_info.json's hash);
- Sparrow's shipped draft, speculating, gives the autoregressive answer token for token;
- the table and plot writers work on a small fake result (the plot is a real PNG).
"""

import json

import pytest
import torch

from sparrow import demo

SHIPPED = (demo.TARGET_DIR / "config.json").exists() and (demo.DRAFTS_DIR / demo.BUILD_INFO).exists()
needs_assets = pytest.mark.skipif(not SHIPPED, reason="assets/world_target or assets/drafts not built")


@pytest.fixture(scope="module")
def shipped():
    return demo.load_models(demo.TARGET_DIR, demo.DRAFTS_DIR)


@needs_assets
def test_shipped_drafts_match_the_shipped_target(shipped):
    target, drafts = shipped
    info = json.loads((demo.DRAFTS_DIR / demo.BUILD_INFO).read_text())
    assert info["target_sha256"] == demo.target_fingerprint(demo.TARGET_DIR), "drafts built for another target"
    assert set(drafts) == set(demo.METHODS)
    for name, d in drafts.items():
        if d is None:
            continue
        d.check_target(target)  # raises on an identity mismatch
        assert d.fc.weight.dtype == torch.float32
    assert drafts["msd"].config.visual_source == "embed"
    assert drafts["no-vata"].config.visual_source == "mid"
    assert drafts["sparrow"].config.visual_source == "none"


@needs_assets
def test_shipped_sparrow_draft_is_lossless_on_a_small_clip(shipped):
    import sparrow
    from sparrow.drafting import TreeConfig
    from sparrow.train.records import prepare_inputs

    target, drafts = shipped
    rec = {"id": "t", "seed": demo.DEMO_SEED0 + 999, "frames": 4, "height": 112}
    inputs, _ = prepare_inputs(rec, demo.world_inputs, target.model)
    ar = sparrow.generate(target, None, inputs, max_new_tokens=24)
    sp = sparrow.generate(target, drafts["sparrow"], inputs, max_new_tokens=24, tree=TreeConfig(**demo.TREE))
    assert sp.tokens == ar.tokens
    assert len(ar.tokens[0]) >= 2
    assert sp.stats.steps < ar.stats.steps  # the trained draft gets some tokens accepted


def _fake_result():
    methods = ["autoregressive", "sparrow", "msd"]
    per_length = {}
    for v, acc in ((96, 1.5), (490, 1.4)):
        per_length[str(v)] = {
            m: {"accepted_per_step": 0.0 if m == "autoregressive" else acc, "tokens_per_step": 1.0 + acc,
                "decode_tokens_per_s": 20.0, "draft_ms_per_step": 4.0, "verify_ms_per_step": 6.0,
                "DSR": 1.0 if m == "autoregressive" else 1.3, "ESR": 1.1,
                "identical": True, "requests": 1}
            for m in methods
        }
    return {
        "methods": methods, "method_notes": {m: demo.METHOD_NOTES[m] for m in methods}, "visual_tokens": [96, 490],
        "per_length": per_length, "lossless": True, "mismatches": [], "requests": [],
        "sample": {"seed": 1, "frames": 4, "height": 112, "visual_tokens": 32, "question": "q ?",
                   "ground_truth": "a red circle .", "target_answer": "a red circle.", "sparrow_identical": True},
        "settings": {"clips_per_length": 1, "max_new_tokens": 8, "tree": dict(demo.TREE)},
        "environment": {"device": "cpu", "cpu": "x86_64", "threads": 2, "torch": "t", "transformers": "t",
                        "time": "now"},
    }


def test_writers_on_a_fake_result(tmp_path):
    result = _fake_result()
    paths = demo.write_results(result, tmp_path)
    md = paths["md"].read_text()
    assert "## 96 visual tokens" in md and "## 490 visual tokens" in md
    assert "| sparrow | 1.50 | 2.50 | 20.0 | 1.30x | 1.10x | 4.0 | 6.0 | yes |" in md
    assert json.loads(paths["json"].read_text())["visual_tokens"] == [96, 490]
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = demo.console_table(result)
    assert len(table.splitlines()) == 2 + 2 * 3


def test_aggregate_sums_times_over_requests():
    rows = [
        {"method": "autoregressive", "row_steps": 10, "accepted_per_step": 0.0, "decode_s": 2.0, "total_s": 3.0,
         "prefill_s": 1.0, "new_tokens": 11, "identical": True},
        {"method": "sparrow", "row_steps": 4, "accepted_per_step": 1.5, "decode_s": 1.0, "total_s": 2.0,
         "prefill_s": 1.0, "new_tokens": 11, "identical": True},
    ]
    f = demo.aggregate(rows, ["autoregressive", "sparrow"])
    assert f["sparrow"]["DSR"] == pytest.approx(2.0) and f["sparrow"]["ESR"] == pytest.approx(1.5)
    assert f["sparrow"]["accepted_per_step"] == pytest.approx(1.5)
    assert f["sparrow"]["decode_tokens_per_s"] == pytest.approx(10.0)
