"""`sparrow export-vllm`: a trained draft as a folder vLLM loads (the serving itself is tested
under vLLM: tests/in_vllm/)."""

import json

from safetensors.torch import load_file

from sparrow import cli
from sparrow.draft import SparrowDraft
from sparrow.targets import load_target
from tiny_models import tiny_target


def _draft(tmp_path, **overrides):
    target = load_target(tiny_target("qwen2_5_vl"))
    draft = SparrowDraft.from_target(target, **overrides)
    draft.save_pretrained(str(tmp_path / "draft"))
    return draft


def test_export_writes_what_vllm_reads(tmp_path, capsys):
    draft = _draft(tmp_path)
    assert cli.main(["export-vllm", str(tmp_path / "draft"), str(tmp_path / "served")]) == 0
    assert "disable_padded_drafter_batch" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "served" / "config.json").read_text())
    assert cfg["architectures"] == ["EagleSparrowDraft"] and cfg["model_type"] == "llama"
    assert cfg["sparrow"] == draft.config.to_dict() and cfg["head_dim"] == draft.config.head_dim
    weights = load_file(str(tmp_path / "served" / "model.safetensors"))
    assert weights.keys() == draft.state_dict().keys()
    # An existing folder is kept unless asked.
    assert cli.main(["export-vllm", str(tmp_path / "draft"), str(tmp_path / "served")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export-vllm", str(tmp_path / "draft"), str(tmp_path / "served"), "--overwrite"]) == 0


def test_export_refuses_what_vllm_cannot_serve(tmp_path, capsys):
    assert cli.main(["export-vllm", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "not a saved Sparrow draft" in capsys.readouterr().err
    _draft(tmp_path, visual_source="embed")
    assert cli.main(["export-vllm", str(tmp_path / "draft"), str(tmp_path / "out")]) == 2
    assert "visual_source='embed'" in capsys.readouterr().err
