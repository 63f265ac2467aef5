"""The `sparrow` command: --help of every subcommand, and a tiny gen-data -> train -> eval run
through `sparrow.cli.main([...])` with a tiny target saved as a Hugging Face model folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparrow import cli

from test_train_data import make_inputs as _make_inputs
from test_train_data import tiny_adapter


def make_inputs(record, model):
    """The processor the CLI test names as --processor test_cli:make_inputs."""
    return _make_inputs(record, model)


@pytest.mark.parametrize("sub", [[], ["gen-data"], ["train"], ["eval"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(sub + ["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: sparrow" in text
    if sub == ["train"]:
        assert "--no-ivsb" in text and "--no-mtp" in text and "--visual-source" in text and "--resume" in text
    if sub == ["gen-data"]:
        assert "--processor" in text and "--mid-pool" in text


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "sparrow.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "gen-data" in out.stdout


def _records(path, ids, start):
    lines = []
    for i, sid in enumerate(ids):
        np.save(path / f"{sid}.npy", np.zeros((2 + 2 * (i % 2), 8, 8, 3), np.uint8))
        lines.append(json.dumps({"id": sid, "video": f"{sid}.npy", "prompt": "what moves?", "seed": start + i,
                                 "plen": 4 + i % 3}))
    (path / "records.jsonl").write_text("\n".join(lines) + "\n")
    return str(path / "records.jsonl")


def test_tiny_run_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    target = tiny_adapter()
    model_dir = tmp_path / "target"
    target.model.save_pretrained(model_dir)
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    train_jsonl = _records(tmp_path / "train", [f"t{i}" for i in range(4)], 1000)
    held_jsonl = _records(tmp_path / "held", ["h0", "h1"], 2000)
    base = ["--target", str(model_dir), "--device", "cpu", "--no-progress"]
    proc = ["--processor", "test_cli:make_inputs"]

    rc = cli.main(["gen-data", *base, *proc, "--data", train_jsonl, "--out", str(tmp_path / "data"),
                   "--max-new-tokens", "5", "--shard-size", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 4 new samples" in out and "in 2 shards" in out
    # Again: nothing to do, nothing rewritten.
    rc = cli.main(["gen-data", *base, *proc, "--data", train_jsonl, "--out", str(tmp_path / "data"),
                   "--max-new-tokens", "5", "--shard-size", "3"])
    assert rc == 0 and "wrote 0 new samples" in capsys.readouterr().out

    rc = cli.main(["train", *base, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "draft"),
                   "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--unroll", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "finished at step 3/3" in out
    cfg = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert cfg["visual_source"] == "none" and cfg["target"] == target.identity()

    rc = cli.main(["train", *base, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "msd"),
                   "--max-steps", "1", "--visual-source", "embed"])
    err = capsys.readouterr().err
    assert rc == 2 and "visual_embeds" in err and "--store-embeds" in err  # data lacks the embeddings

    rc = cli.main(["eval", *base, *proc, "--data", held_jsonl, "--draft", f"sparrow={tmp_path / 'draft'}",
                   "--max-new-tokens", "5", "--chain", "2", "--warmup", "0", "--out", str(tmp_path / "res" / "eval")])
    out = capsys.readouterr().out
    assert rc == 0 and "| sparrow |" in out and "| autoregressive |" in out
    res = json.loads((tmp_path / "res" / "eval.json").read_text())
    assert res["overall"]["sparrow"]["lossless"] == 1.0 and res["overall"]["sparrow"]["requests"] == 2
    assert set(res["groups"]) == {"4 visual", "8 visual"}  # two visual lengths: reported per group
    assert (tmp_path / "res" / "eval.md").exists()


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = cli.main(["train", "--target", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no index.json" in capsys.readouterr().err
    (tmp_path / "r.jsonl").write_text('{"id": "a", "video": "x.npy", "prompt": "p"}\n')
    rc = cli.main(["gen-data", "--target", str(tmp_path), "--data", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "d"),
                   "--processor", "no_such_module:f"])
    assert rc == 2 and "cannot import 'no_such_module'" in capsys.readouterr().err
    rc = cli.main(["gen-data", "--target", str(tmp_path), "--data", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "d"),
                   "--processor", "test_cli:make_inputs"])
    assert rc == 2 and "not a Hugging Face model folder" in capsys.readouterr().err
    assert torch.is_grad_enabled()
