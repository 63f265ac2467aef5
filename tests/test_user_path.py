"""The user's whole path, offline, from the command line: a Hugging Face checkpoint folder (tiny,
random, with its tokenizer and processor configs) and a folder of video files ->
`sparrow records` -> `sparrow gen-data` -> `sparrow train` -> `sparrow eval` -> `sparrow generate`,
with `--processor auto` (the default) throughout."""

from __future__ import annotations

import json

import pytest

from sparrow import cli
from tiny_checkpoints import random_video, save_tiny_checkpoint, write_video

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


def _run(argv: list[str], capsys) -> str:
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, f"sparrow {' '.join(argv)} -> {rc}\n{out.err[-2000:]}"
    return out.out


def _videos(folder) -> None:
    folder.mkdir()
    for i, (frames, fps) in enumerate([(8, 4), (12, 3), (10, 5)]):
        write_video(folder / f"clip{i}.mp4", random_video(frames, 24, 32, seed=i), fps=fps)


def test_whole_path_from_a_folder_of_videos(tmp_path, capsys):
    """Every family, each command once; the answers of gen-data are the target's greedy ones and
    generate --compare says the speculative answer is the autoregressive one."""
    videos = tmp_path / "videos"
    _videos(videos)
    (tmp_path / "questions.txt").write_text("what is moving in the video\nhow many objects are there\n")
    records = tmp_path / "records.jsonl"
    _run(["records", "--videos", str(videos), "--questions", str(tmp_path / "questions.txt"),
          "--num-frames", "4", "--out", str(records)], capsys)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["id"] == "clip0#0" and lines[0]["num_frames"] == 4

    for family in FAMILIES:
        root = tmp_path / family
        target = save_tiny_checkpoint(family, root / "target", eos_token_id=None)
        common = ["--target", target, "--device", "cpu", "--no-progress"]
        out = _run(["gen-data", *common, "--data", str(records), "--out", str(root / "data"),
                    "--max-new-tokens", "6", "--batch-size", "3"], capsys)
        assert "6 samples" in out or "6 new" in out, out
        _run(["train", *common, "--data", str(root / "data"), "--out", str(root / "draft"), "--max-steps", "4",
              "--lr", "1e-3"], capsys)
        out = _run(["eval", *common, "--data", str(records), "--draft", f"sparrow={root / 'draft'}",
                    "--max-new-tokens", "6", "--warmup", "0", "--limit", "2", "--out", str(root / "eval")], capsys)
        assert "sparrow" in out and (root / "eval.json").exists()
        out = _run(["generate", *common, "--draft", str(root / "draft"), "--video", str(videos / "clip1.mp4"),
                    "--num-frames", "4", "--prompt", "what is moving in the video", "--max-new-tokens", "6",
                    "--compare"], capsys)
        assert "identical: yes" in out, (family, out)
        assert out.splitlines()[0].startswith("answer: '"), out  # decoded with the checkpoint's tokenizer


def test_records_from_a_folder(tmp_path, capsys):
    videos = tmp_path / "videos"
    _videos(videos)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"video": "clip1", "prompt": "what is moving", "answer": "a red square"}) + "\n"
                 + json.dumps({"prompt": "how many objects are there"}) + "\n")
    out = _run(["records", "--videos", str(videos), "--questions", str(q), "--fps", "1.5"], capsys)
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in recs] == ["clip0", "clip1#0", "clip1#1", "clip2"]
    assert recs[1]["answer"] == "a red square" and all(r["fps"] == 1.5 for r in recs)
    assert all(r["video"].endswith(".mp4") and r["video"].startswith("/") for r in recs)
    q.write_text(json.dumps({"video": "missing", "prompt": "p"}) + "\n")
    assert cli.main(["records", "--videos", str(videos), "--questions", str(q)]) == 2
    assert "no file in" in capsys.readouterr().err
    assert cli.main(["records", "--videos", str(tmp_path / "none"), "--questions", str(q)]) == 2
    assert "not a folder" in capsys.readouterr().err
    q.write_text(json.dumps({"video": ["clip1"], "prompt": "p"}) + "\n")
    assert cli.main(["records", "--videos", str(videos), "--questions", str(q)]) == 2
    assert "must be a file name" in capsys.readouterr().err
    q.write_text("what is moving\n")
    assert cli.main(["records", "--videos", str(videos), "--questions", str(q), "--num-frames", "-3"]) == 2
    assert "'num_frames' must be a positive integer" in capsys.readouterr().err
    write_video(videos / "clip1.mkv", random_video(8, 24, 32, seed=9), fps=4)  # the same stem as clip1.mp4
    out = _run(["records", "--videos", str(videos), "--questions", str(q)], capsys)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["clip0", "clip1.mkv", "clip1.mp4", "clip2"]


@pytest.mark.parametrize("bad, message", [({"fps": 0}, "'fps' must be a positive number"),
                                          ({"num_frames": 2.5}, "'num_frames' must be a positive integer"),
                                          ({"fps": 1.0, "num_frames": 4}, "not both")])
def test_records_refuse_bad_sampling(tmp_path, bad, message):
    from sparrow.train.records import RecordError, load_records

    with pytest.raises(RecordError, match=message):
        load_records([{"id": "a", "video": str(tmp_path / "a.mp4"), "prompt": "p", **bad}])


def test_load_target_from_a_folder(tmp_path):
    """sparrow.load_target(path, device=, dtype=, attn_implementation= per part, positions=)."""
    import torch

    import sparrow

    path = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "target")
    target = sparrow.load_target(path, device="cpu", dtype="float64", positions="generate",
                                 attn_implementation={"vision": "eager", "text": "sdpa"})
    cfg = target.model.config
    assert target.model.dtype == torch.float64 and target.positions == "generate"
    assert cfg.vision_config._attn_implementation == "eager" and cfg.text_config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in target.model.parameters()) and not target.model.training
    assert sparrow.load_target(target.model, dtype=torch.float32).model.dtype == torch.float32  # a loaded model
    with pytest.raises(ValueError, match="not a torch dtype"):
        sparrow.load_target(path, dtype="float65")
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        sparrow.load_target(tmp_path)
    with pytest.raises(ValueError, match="one of vision, text"):
        sparrow.load_target(path, attn_implementation={"audio": "sdpa"})
