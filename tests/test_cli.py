"""The `sparrow` command: --help of every subcommand, and a tiny gen-data -> train -> eval run
through `sparrow.cli.main([...])` with a tiny target saved as a Hugging Face model folder."""

import json
import re
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


@pytest.mark.parametrize("sub", [[], ["gen-data"], ["train"], ["eval"], ["generate"]])
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
    if sub:  # every command that loads a target
        assert "--device" in text and "--dtype" in text and "--attn" in text
    if sub == ["generate"]:
        assert "--compare" in text and "--chain" in text and "--tree" in text and "--video" in text


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


# -- sparrow generate ---------------------------------------------------------------------------------
def video_inputs(record, model):
    """The --processor of `sparrow generate` on a tiny target: tiny_inputs for the video's frames."""
    from tiny_models import tiny_inputs

    return tiny_inputs(model, frames=int(record["frames"].shape[0]), prompt_lens=[len(record["prompt"].split()) + 2])


def _world_like_target(layers=3):
    """A tiny random Qwen2.5-VL that the world's processor fits: the world's word tokenizer (filled
    up to the vocabulary with made-up words, so every id decodes), its special ids, 14 px patches."""
    from sparrow.world.tokenizer import WordTokenizer
    from tiny_models import VOCAB, tiny_target

    words = ["what", "moves", "?"]
    tok = WordTokenizer(words + [f"w{i}" for i in range(VOCAB - 8 - len(words))])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56,
                  fullatt_block_indexes=[1], out_hidden_size=64, initializer_range=0.2)
    model = tiny_target("qwen2_5_vl", num_hidden_layers=layers, initializer_range=0.2, vision_config=vision,
                        image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                        vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    return model, tok


@pytest.fixture(scope="module")
def world_like(tmp_path_factory):
    """Folders: a target with its tokenizer, a draft for it, a draft of another target, a video."""
    from sparrow.draft import SparrowDraft
    from sparrow.targets import load_target

    root = tmp_path_factory.mktemp("generate")
    model, tok = _world_like_target()
    model.save_pretrained(root / "target")
    tok.save(root / "target")
    SparrowDraft.from_target(cli.load_target(str(root / "target"), "cpu")).save_pretrained(str(root / "draft"))
    other, _ = _world_like_target(layers=2)
    SparrowDraft.from_target(load_target(other)).save_pretrained(str(root / "other_draft"))
    rng = np.random.default_rng(0)
    np.save(root / "clip.npy", rng.integers(0, 255, size=(4, 56, 56, 3), dtype=np.uint8))  # 8 visual tokens
    return {k: str(root / k) for k in ("target", "draft", "other_draft", "clip.npy")} | {"tokenizer": tok}


SMALL_TREE = ("--tree", "--tree-depth", "2", "--tree-top-k", "2", "--tree-nodes", "4")  # fast on a float64 model


def _generate(world_like, *extra):
    return cli.main(["generate", "--target", world_like["target"], "--video", world_like["clip.npy"],
                     "--prompt", "what moves?", "--device", "cpu", "--max-new-tokens", "8", *extra])


def test_generate_prints_the_answer_and_its_stats(world_like, capsys):
    rc = _generate(world_like, "--draft", world_like["draft"], "--compare", *SMALL_TREE)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["answer"].startswith("'") and "token ids" not in lines["answer"]  # decoded with the folder's tokenizer
    assert re.fullmatch(r"\d+\.\d\d accepted tokens/step, [\d.]+ decode tokens/s, \d+ steps \(sparrow-tree, 8 new tokens.*",
                        lines["stats"])
    assert lines["autoregressive"] == lines["answer"] and lines["identical"] == "yes"
    assert re.match(r"\d+\.\d\d \(decode time autoregressive / speculative", lines["DSR"])
    # The same answer as sparrow.generate's own autoregressive decoding, decoded.
    from sparrow.generation import generate
    from sparrow.world.processor import encode_clip

    target = cli.load_target(world_like["target"], "cpu")
    inputs = encode_clip(np.load(world_like["clip.npy"]), "what moves?", world_like["tokenizer"])
    ref = generate(target, None, inputs, 8)
    assert lines["answer"] == repr(world_like["tokenizer"].decode(ref.tokens[0]))
    # A chain instead of the tree, sampled; and no draft: autoregressive only.
    assert _generate(world_like, "--draft", world_like["draft"], "--chain", "2", "--temperature", "0.8", "--seed", "3") == 0
    assert "(sparrow-chain, 8 new tokens" in capsys.readouterr().out
    assert _generate(world_like) == 0
    out = capsys.readouterr().out
    assert "(autoregressive, 8 new tokens" in out and "identical" not in out


def test_generate_refuses_what_does_not_fit(world_like, capsys, tmp_path):
    rc = _generate(world_like, "--draft", world_like["other_draft"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match this target" in err and "num_hidden_layers" in err
    assert _generate(world_like, "--compare") == 2 and "--compare needs --draft" in capsys.readouterr().err
    rc = cli.main(["generate", "--target", world_like["target"], "--video", str(tmp_path / "none.npy"), "--prompt", "p"])
    assert rc == 2 and "--video" in capsys.readouterr().err
    # A folder without the world's tokenizer and no --processor: say what to pass.
    target = tiny_adapter()
    target.model.save_pretrained(tmp_path / "plain")
    rc = cli.main(["generate", "--target", str(tmp_path / "plain"), "--video", world_like["clip.npy"], "--prompt", "p"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs the checkpoint's tokenizer" in err and "--processor module:function" in err


def test_generate_with_a_processor_and_no_tokenizer(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    from sparrow.draft import SparrowDraft

    target = tiny_adapter()
    target.model.save_pretrained(tmp_path / "target")
    SparrowDraft.from_target(target).save_pretrained(str(tmp_path / "draft"))
    np.save(tmp_path / "clip.npy", np.zeros((4, 8, 8, 3), np.uint8))
    rc = cli.main(["generate", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                   "--video", str(tmp_path / "clip.npy"), "--prompt", "what moves here?", "--device", "cpu",
                   "--processor", "test_cli:video_inputs", "--chain", "3", "--compare", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["answer"].startswith("token ids [") and lines["identical"] == "yes"
    # A Hugging Face tokenizer in the folder (built offline): the answer is decoded with it.
    ids = json.loads(lines["answer"].removeprefix("token ids "))
    _hf_word_tokenizer().save_pretrained(tmp_path / "target")
    rc = cli.main(["generate", "--target", str(tmp_path / "target"), "--video", str(tmp_path / "clip.npy"),
                   "--prompt", "what moves here?", "--device", "cpu", "--processor", "test_cli:video_inputs",
                   "--max-new-tokens", "6"])
    assert rc == 0 and capsys.readouterr().out.splitlines()[0] == "answer: " + repr(" ".join(f"w{i}" for i in ids))


def _hf_word_tokenizer():
    """A Hugging Face tokenizer with one word per id of the tiny vocabulary, built offline."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiny_models import VOCAB

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)  # no special token: every id decodes


def test_attn_per_part_reaches_the_model_config(world_like, capsys, monkeypatch):
    assert cli.parse_attn(None) == "sdpa" and cli.parse_attn("eager") == "eager"
    assert cli.parse_attn("text=eager") == {"vision_config": "sdpa", "text_config": "eager"}
    for spec, vision, text in (("vision=sdpa,text=eager", "sdpa", "eager"), ("vision=eager", "eager", "sdpa"),
                               ("eager", "eager", "eager"), (None, "sdpa", "sdpa")):
        target = cli.load_target(world_like["target"], "cpu", attn=cli.parse_attn(spec))
        cfg = target.model.config
        assert (cfg.vision_config._attn_implementation, cfg.text_config._attn_implementation) == (vision, text), spec
        assert target._impl == text  # what the adapter's prompt mask follows
    # Through the command line: the same answer with an eager language model.
    seen = []
    plain_load = cli.load_target
    monkeypatch.setattr(cli, "load_target", lambda *a, **k: seen.append(plain_load(*a, **k)) or seen[-1])
    assert _generate(world_like) == 0
    sdpa_answer = capsys.readouterr().out.splitlines()[0]
    assert _generate(world_like, "--attn", "vision=sdpa,text=eager") == 0
    assert capsys.readouterr().out.splitlines()[0] == sdpa_answer
    assert seen[-1].model.config.text_config._attn_implementation == "eager"
    assert seen[-1].model.config.vision_config._attn_implementation == "sdpa"
    for bad, msg in (("vision=sdpa,txt=eager", "parts: vision, text"), ("bogus", "--attn bogus"), ("vision=eager,text=nope", "--attn vision=eager,text=nope")):
        assert _generate(world_like, "--attn", bad) == 2
        assert msg in capsys.readouterr().err


def test_positions_flag_reaches_the_adapter(world_like, monkeypatch):
    """--positions picks the M-RoPE rule; without it the rule the checkpoint records (or release)."""
    seen = []
    plain_load = cli.load_target
    monkeypatch.setattr(cli, "load_target", lambda *a, **k: seen.append(plain_load(*a, **k)) or seen[-1])
    assert _generate(world_like, "--positions", "generate") == 0
    assert seen[-1].positions == "generate"
    assert cli.load_target(world_like["target"], "cpu").positions == "release"  # it records no rule
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--target", "t", "--video", "v", "--prompt", "p",
                                       "--positions", "last"])
