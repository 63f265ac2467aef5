"""What the plugin refuses, and how it says so: another vLLM version, a folder that is not an
exported Sparrow draft, a draft of another target, an engine set up against its cache."""

from __future__ import annotations

import json
import shutil

import pytest

from test_plugin import exported_draft, spec_config
from vllm_fixtures import tiny_vllm_checkpoint, vllm_engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_vllm_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_another_vllm_version_is_refused():
    from sparrow.integrations.vllm import UnsupportedVLLM, check_version

    check_version("0.32.0")
    with pytest.raises(UnsupportedVLLM, match="supports vLLM 0.32.x, not 0.33.1"):
        check_version("0.33.1")


def _engine_error(checkpoint, capfd, **engine_kw) -> str:
    """Start an engine that must fail; what its processes printed."""
    with pytest.raises(Exception):
        with vllm_engine(checkpoint, **engine_kw):
            pass
    out = capfd.readouterr()
    return out.out + out.err


def test_a_draft_of_another_target_and_a_bad_folder(checkpoint, tmp_path, capfd):
    draft = exported_draft(checkpoint, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(draft, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["sparrow"]["target"]["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    log = _engine_error(checkpoint, capfd, speculative_config=spec_config(str(other)))
    assert "was trained against another target: hidden_size 128 (draft's target) != 64 (served)" in log
    bad = tmp_path / "bad"
    shutil.copytree(draft, bad)
    cfg.pop("sparrow")
    (bad / "config.json").write_text(json.dumps(cfg))
    log = _engine_error(checkpoint, capfd, speculative_config=spec_config(str(bad)))
    assert "has no 'sparrow' entry; write the folder with `sparrow export-vllm`" in log


def test_engine_settings_the_draft_cache_needs(checkpoint, tmp_path, capfd):
    draft = exported_draft(checkpoint, tmp_path)
    padded = dict(spec_config(draft), disable_padded_drafter_batch=False)
    log = _engine_error(checkpoint, capfd, speculative_config=padded)
    assert '"disable_padded_drafter_batch": true' in log

