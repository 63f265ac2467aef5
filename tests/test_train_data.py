"""Training data: the JSONL/in-memory record format, gen-data's shards and index (contents,
resumption, never overwriting), and clear errors for bad data, naming the sample."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparrow.train import datagen, records, shards
from sparrow.train.records import RecordError
from sparrow.train.shards import DataError, ShardDataset

from tiny_models import tiny_inputs, tiny_target


# -- shared helpers (test_trainer.py and test_cli.py use them too) -----------------------------
def make_inputs(record, model):
    """The tests' processor: tiny_inputs for the record's frame count and prompt length, seeded
    by the record (its "seed" key) so that a record always gives the same inputs."""
    n_frames = int(record["frames"].shape[0]) if "frames" in record else 1
    return tiny_inputs(model, frames=n_frames, prompt_lens=[int(record.get("plen", 6))], seed=int(record["seed"]))


def tiny_records(n, start=0, frames=(2, 4)):
    rng = np.random.default_rng(start)
    return [
        {
            "id": f"s{i:03d}",
            "frames": rng.integers(0, 255, size=(frames[i % len(frames)], 8, 8, 3), dtype=np.uint8),
            "prompt": f"question {i}",
            "seed": 1000 + i,
            "plen": 4 + i % 5,
        }
        for i in range(start, start + n)
    ]


_TARGETS = {}


def tiny_adapter(family="qwen2_5_vl", **kw):
    """A cached adapter over a tiny target; initializer_range 0.2 by default: its greedy answers
    have learnable structure (repeats, short cycles) yet differ by prompt."""
    from sparrow.targets import load_target

    kw.setdefault("initializer_range", 0.2)
    key = (family, tuple(sorted(kw.items())))
    if key not in _TARGETS:
        _TARGETS[key] = load_target(tiny_target(family, **kw))
    return _TARGETS[key]


def file_bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".safetensors")}


# -- records ------------------------------------------------------------------------------------
def test_jsonl_records_and_visual_loading(tmp_path):
    np.save(tmp_path / "clip.npy", np.zeros((3, 4, 4, 3), np.uint8))
    torch.save(torch.ones(2, 3, 4, 4), tmp_path / "clip.pt")
    (tmp_path / "frames").mkdir()
    for k in range(4):
        np.save(tmp_path / "frames" / f"{k:03d}.npy", np.full((4, 4, 3), k, np.uint8))
    from PIL import Image

    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "img.png")
    lines = [
        {"id": "a", "video": "clip.npy", "prompt": "p", "answer": "x"},
        {"id": "b", "video": "clip.pt", "prompt": "p"},
        {"id": "c", "video": "frames", "prompt": "p", "group": "short"},
        {"id": "d", "image": "img.png", "prompt": "p"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = records.load_records(tmp_path / "data.jsonl")
    assert [r["id"] for r in recs] == ["a", "b", "c", "d"]
    assert recs[2]["group"] == "short"
    loaded = [records.load_visual(r) for r in recs]
    assert loaded[0]["frames"].shape == (3, 4, 4, 3)
    assert tuple(loaded[1]["frames"].shape) == (2, 3, 4, 4)
    assert loaded[2]["frames"].shape == (4, 4, 4, 3) and loaded[2]["frames"][3].max() == 3
    assert loaded[3]["image"].shape == (5, 6, 3)


def test_record_errors_name_the_sample(tmp_path):
    with pytest.raises(RecordError, match="'dup'.*duplicate"):
        records.load_records([{"id": "dup", "frames": np.zeros((1, 2)), "prompt": "p"}] * 2)
    with pytest.raises(RecordError, match="'x'.*exactly one of"):
        records.load_records([{"id": "x", "prompt": "p"}])
    with pytest.raises(RecordError, match="'y'.*prompt"):
        records.load_records([{"id": "y", "frames": np.zeros((1, 2)), "prompt": 3}])
    with pytest.raises(RecordError, match="'z'.*count"):
        records.load_records([{"id": "z", "frames": 0}])
    # Procedural records: a frame count, no prompt, any answer: passed to the processor as they are.
    (rec,) = records.load_records([{"id": "w", "frames": 8, "seed": 3, "answer": True}])
    assert records.load_visual(rec)["frames"] == 8 and rec["answer"] is True
    (tmp_path / "d.jsonl").write_text('{"id": "gone", "video": "nope.npy", "prompt": "p"}\n{bad json\n')
    with pytest.raises(RecordError, match=r"d.jsonl:2: not valid JSON"):
        records.load_records(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text('{"id": "gone", "video": "nope.npy", "prompt": "p"}\n')
    (rec,) = records.load_records(tmp_path / "d.jsonl")
    with pytest.raises(RecordError, match="sample 'gone'.*not found.*nope.npy"):
        records.load_visual(rec)


def test_pool_states():
    x = torch.arange(10.0).reshape(10, 1).expand(10, 3)
    assert torch.equal(datagen.pool_states(x, 0), x)
    assert torch.equal(datagen.pool_states(x, 20), x)
    p = datagen.pool_states(x, 5)
    assert p.shape == (5, 3) and torch.allclose(p[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))


# -- gen-data -----------------------------------------------------------------------------------
def test_generate_data_contents(tmp_path):
    target = tiny_adapter()
    model = target.model
    recs = tiny_records(3)
    out = tmp_path / "data"
    s = datagen.generate_data(target, recs, make_inputs, str(out), max_new_tokens=6, shard_size=2,
                              mid_pool=3, progress=False)
    assert s["new_samples"] == 3 and s["total_shards"] == 2 and s["feature_argmax_agreement"] == 1.0
    index = json.loads((out / "index.json").read_text())
    assert index["target"] == target.identity() and index["num_samples"] == 3
    assert [sh["samples"] for sh in index["shards"]] == [["s000", "s001"], ["s002"]]
    assert index["settings"]["max_new_tokens"] == 6 and index["settings"]["mid_pool"] == 3
    ds = ShardDataset(str(out), target=target.identity())
    assert len(ds) == 3
    for i, rec in enumerate(recs):
        item = ds[i]
        assert item["id"] == rec["id"]
        inputs = make_inputs(records.load_visual(rec), model)
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        P = item["prompt_len"]
        assert P == inputs["input_ids"].shape[1]
        S = item["input_ids"].shape[0]
        assert S > P and torch.equal(item["input_ids"], ref[0, :S])  # prompt + the target's greedy answer
        assert S == ref.shape[1] or int(ref[0, S]) in target.placeholder_ids()
        pre = target.prefill(datagen.extend_inputs(inputs, ref[:, P:S]), want_visual_mid=True, continuation=S - P)
        txt = pre.text_mask[0]
        assert torch.equal(item["text_mask"], txt) and torch.equal(item["visual_mask"], pre.visual_mask[0])
        assert torch.equal(item["features"], pre.features[0][txt])
        nvis = int(pre.visual_mask[0].sum())
        assert item["visual_mid"].shape == (min(3, nvis), 64)
        assert torch.allclose(item["visual_mid"], datagen.pool_states(pre.visual_mid[0][pre.visual_mask[0]], 3))


def test_generate_data_llava_and_embeds(tmp_path):
    target = tiny_adapter("llava_onevision")
    recs = tiny_records(2, frames=(2,))
    s = datagen.generate_data(target, recs, make_inputs, str(tmp_path), max_new_tokens=3, mid_pool=0,
                              store_embeds=True, store_dtype=torch.float32, progress=False)
    assert s["new_samples"] == 2
    ds = ShardDataset(str(tmp_path), require=("visual_embeds",))
    item = ds[0]
    nvis = int(item["visual_mask"].sum())
    assert item["visual_mid"].shape == (nvis, 64) and item["visual_embeds"].shape == (nvis, 64)
    assert item["features"].dtype == torch.float32


class Interrupted(Exception):
    pass


def test_resume_after_interruption_never_overwrites(tmp_path):
    target = tiny_adapter()
    recs = tiny_records(7)
    out = str(tmp_path / "data")
    calls, fail = [], [True]

    def flaky(record, model):
        calls.append(record["id"])
        if record["id"] == "s004" and fail[0]:
            fail[0] = False
            raise Interrupted  # the run dies in the middle of a shard
        return make_inputs(record, model)

    with pytest.raises(Interrupted):
        datagen.generate_data(target, recs, flaky, out, max_new_tokens=4, shard_size=3, progress=False)
    index = shards.ShardIndex.load(out)
    assert [sh["samples"] for sh in index.shards] == [["s000", "s001", "s002"], ["s003"]]  # nothing lost
    before = file_bytes(out)
    calls.clear()
    s = datagen.generate_data(target, recs, flaky, out, max_new_tokens=4, shard_size=3, progress=False)
    assert calls == ["s004", "s005", "s006"] and s["skipped_done"] == 4 and s["new_samples"] == 3
    after = file_bytes(out)
    assert all(after[n] == b for n, b in before.items())  # finished shards untouched
    ds = ShardDataset(out)
    assert sorted(sid for _, _, sid in ds.items) == [r["id"] for r in recs]  # no duplicate, none lost
    # A third run has nothing to do.
    s = datagen.generate_data(target, recs, make_inputs, out, max_new_tokens=4, shard_size=3, progress=False)
    assert s["new_samples"] == 0 and file_bytes(out) == after
    # Other settings on the same folder: refused, not mixed.
    with pytest.raises(DataError, match="settings"):
        datagen.generate_data(target, recs, make_inputs, out, max_new_tokens=5, shard_size=3, progress=False)


def test_crash_between_shard_and_index(tmp_path):
    """A shard renamed into place whose index update was lost is adopted, not redone or replaced;
    a leftover .tmp is discarded."""
    target = tiny_adapter()
    recs = tiny_records(4)
    out = str(tmp_path)
    datagen.generate_data(target, recs[:2], make_inputs, out, max_new_tokens=3, shard_size=2, progress=False)
    index = shards.ShardIndex.load(out)
    lost = index.shards.pop()  # the index never heard of the shard
    index.save()
    (tmp_path / "shard-00007.safetensors.tmp").write_bytes(b"half written")
    before = file_bytes(out)
    s = datagen.generate_data(target, recs, make_inputs, out, max_new_tokens=3, shard_size=2, progress=False)
    assert s["new_samples"] == 2 and s["skipped_done"] == 2
    assert not (tmp_path / "shard-00007.safetensors.tmp").exists()
    assert all(file_bytes(out)[n] == b for n, b in before.items())
    assert lost["file"] in shards.ShardIndex.load(out).files()
    assert len(ShardDataset(out)) == 4
    with pytest.raises(FileExistsError, match="never overwritten"):
        shards.write_shard(os.path.join(out, lost["file"]), [], target.identity())


def test_bad_data_errors_name_the_sample(tmp_path):
    target = tiny_adapter()
    # An empty given answer.
    recs = tiny_records(2)
    recs[1]["answer_ids"] = []
    recs[0]["answer_ids"] = [5, 6]
    with pytest.raises(RecordError, match="sample 's001': empty answer"):
        datagen.generate_data(target, recs, make_inputs, str(tmp_path / "a"), answers="given", progress=False)
    assert len(ShardDataset(str(tmp_path / "a"))) == 1  # the good sample before it was kept
    # A missing video file.
    bad = [{"id": "lost-clip", "video": str(tmp_path / "missing.npy"), "prompt": "p", "seed": 1}]
    with pytest.raises(RecordError, match="sample 'lost-clip'.*not found"):
        datagen.generate_data(target, bad, make_inputs, str(tmp_path / "b"), progress=False)

    out = tmp_path / "c"
    datagen.generate_data(target, tiny_records(3), make_inputs, str(out), max_new_tokens=3, shard_size=3, progress=False)
    shard = out / "shard-00000.safetensors"
    good = shard.read_bytes()
    tensors = load_file(shard)
    from safetensors import safe_open

    with safe_open(shard, framework="pt") as f:
        meta = f.metadata()

    def rewrite(mutate, meta_mut=None):
        t = dict(tensors)
        mutate(t)
        m = dict(meta)
        if meta_mut:
            meta_mut(m)
        shard.unlink()
        save_file(t, shard, metadata=m)

    # Wrong feature shape in sample 1.
    rewrite(lambda t: t.__setitem__("s1.features", t["s1.features"][:-1]))
    with pytest.raises(DataError, match="sample 's001': features has shape"):
        ShardDataset(str(out))
    # A mask of the wrong length.
    rewrite(lambda t: t.__setitem__("s2.text_mask", t["s2.text_mask"][:-1]))
    with pytest.raises(DataError, match="sample 's002': text_mask must be bool"):
        ShardDataset(str(out))
    # A missing tensor.
    rewrite(lambda t: t.pop("s0.visual_mid"))
    with pytest.raises(DataError, match="sample 's000': missing tensor 'visual_mid'"):
        ShardDataset(str(out))
    # A shard of another target.
    other = dict(target.identity(), hidden_size=128)
    rewrite(lambda t: None, lambda m: m.__setitem__("target", shards.identity_json(other)))
    with pytest.raises(DataError, match="written for target"):
        ShardDataset(str(out))
    shard.unlink()
    shard.write_bytes(good)
    assert len(ShardDataset(str(out))) == 3
    # Data of this folder used with another target.
    with pytest.raises(DataError, match="generated by target"):
        ShardDataset(str(out), target=other)
    other_target = tiny_adapter("qwen2_vl")
    with pytest.raises(DataError, match="holds data of target"):
        datagen.generate_data(other_target, tiny_records(1), make_inputs, str(out), max_new_tokens=3, progress=False)
    # A shard the index lists but that is gone.
    shard.unlink()
    with pytest.raises(DataError, match="does not exist"):
        ShardDataset(str(out))


def test_answers_stop_at_eos_and_before_placeholders():
    target = tiny_adapter(eos_token_id=35)  # a token the 0.2-init target emits often
    model = target.model
    inputs = make_inputs({"frames": np.zeros((2, 1)), "seed": 1000, "plen": 4}, model)
    full = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs["input_ids"].shape[1]:].tolist()
    assert 35 in full
    ans = datagen.target_answer(model, inputs, 12, eos={35})[0].tolist()
    assert ans == full[: full.index(35) + 1]  # eos kept, nothing after it
    ans = datagen.target_answer(model, inputs, 12, placeholders={35})[0].tolist()
    assert ans == full[: full.index(35)]  # a placeholder id is dropped with what follows


# -- gen-data answers are sparrow.generate's, features are decoding's, batches change nothing ----
def _decoding(target, inputs, max_new_tokens, monkeypatch):
    """sparrow.generate's greedy autoregressive answer for one record, and the features its own
    decoding computes: the prompt's text positions (its prefill) and every answer token fed back
    (verify's feature at the root, [H] per step), in order."""
    from sparrow.generation import generate

    seen = {"verify": []}
    prefill, verify = target.prefill, target.verify

    def spy_prefill(*a, **kw):
        out = prefill(*a, **kw)
        seen["prompt"] = out.features[0][out.text_mask[0]]
        return out

    def spy_verify(*a, **kw):
        out = verify(*a, **kw)
        seen["verify"].append(out.features[0, 0])
        return out

    with monkeypatch.context() as m:
        m.setattr(target, "prefill", spy_prefill)
        m.setattr(target, "verify", spy_verify)
        tokens = generate(target, None, inputs, max_new_tokens).tokens[0]
    return tokens, seen["prompt"], seen["verify"]


def _check_against_decoding(target, recs, out, max_new_tokens, monkeypatch):
    """Every stored sample: the answer is sparrow.generate's (cut before a placeholder id, as
    gen-data documents) and the features are those decoding computes at the same tokens."""
    holders = set(target.placeholder_ids())
    ds = ShardDataset(str(out), target=target.identity())
    assert [ds[i]["id"] for i in range(len(ds))] == [r["id"] for r in recs]
    answers = {}
    for i, rec in enumerate(recs):
        item = ds[i]
        inputs = make_inputs(records.load_visual(rec), target.model)
        tokens, prompt_feats, step_feats = _decoding(target, inputs, max_new_tokens, monkeypatch)
        cut = next((k for k, t in enumerate(tokens) if t in holders), len(tokens))
        P = int(item["prompt_len"])
        assert P == inputs["input_ids"].shape[1] and torch.equal(item["input_ids"][:P], inputs["input_ids"][0])
        answer = item["input_ids"][P:].tolist()
        assert answer == tokens[:cut] and answer, rec["id"]
        n_prompt = prompt_feats.shape[0]
        assert int(item["text_mask"][:P].sum()) == n_prompt and bool(item["text_mask"][P:].all())
        torch.testing.assert_close(item["features"][:n_prompt], prompt_feats, rtol=1e-9, atol=1e-9)
        # The answer's features: answer token k (k < A - 1) went through verify at decode step k.
        A = len(answer)
        assert len(step_feats) >= A - 1
        if A > 1:
            torch.testing.assert_close(item["features"][n_prompt : n_prompt + A - 1], torch.stack(step_feats[: A - 1]),
                                       rtol=1e-9, atol=1e-9)
        answers[rec["id"]] = answer
    return answers


def test_gen_data_answers_are_sparrow_generate_qwen_long_video(tmp_path, monkeypatch):
    """Qwen2.5-VL with 12-frame videos (6 temporal positions > 2 merged rows: the "release" rule,
    the default, and transformers 5.x's "generate" rule give different answers), batched with
    shorter videos in one forward."""
    from sparrow.generation import generate
    from sparrow.targets import load_target

    target = tiny_adapter()
    assert target.positions == "release"
    recs = tiny_records(4, frames=(12, 8, 4, 12))
    s = datagen.generate_data(target, recs, make_inputs, str(tmp_path), max_new_tokens=8, batch_size=3,
                              shard_size=2, progress=False)
    assert s["new_samples"] == 4 and s["forwards"] == 2 and s["settings"]["positions"] == "release"
    answers = _check_against_decoding(target, recs, tmp_path, 8, monkeypatch)
    # The videos are long enough for the rule to matter: under "generate" the answer differs.
    other = load_target(target.model, positions="generate")
    inputs = make_inputs(records.load_visual(recs[0]), target.model)
    assert generate(other, None, inputs, 8).tokens[0] != answers["s000"]


def test_gen_data_answers_are_sparrow_generate_llava(tmp_path, monkeypatch):
    target = tiny_adapter("llava_onevision")
    recs = tiny_records(3, frames=(2,))
    s = datagen.generate_data(target, recs, make_inputs, str(tmp_path), max_new_tokens=6, batch_size=3,
                              progress=False)
    assert s["forwards"] == 1
    _check_against_decoding(target, recs, tmp_path, 6, monkeypatch)


def _shard_tensors(folder):
    return {n: load_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")}


def _assert_same_data(a, b):
    ia, ib = (json.loads((x / "index.json").read_text()) for x in (a, b))
    assert [sh["samples"] for sh in ia["shards"]] == [sh["samples"] for sh in ib["shards"]]
    assert ia["settings"] == ib["settings"] and ia["num_samples"] == ib["num_samples"]
    ta, tb = _shard_tensors(a), _shard_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for key, x in ta[name].items():
            y = tb[name][key]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, key)
            if x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)  # float64: rounding only
            else:
                assert torch.equal(x, y), (name, key)


def test_gen_data_batch_of_3_equals_one_at_a_time_with_early_eos(tmp_path, monkeypatch):
    """Qwen2.5-VL, videos of 12 and 4 frames in one batch; s001's answer is the eos token alone
    (a 1-token answer beside 8-token ones: fillers in the features' prefill)."""
    target = tiny_adapter(eos_token_id=35)
    recs = tiny_records(5, frames=(12, 4))
    kw = dict(max_new_tokens=8, shard_size=2, mid_pool=5, progress=False)
    one = datagen.generate_data(target, recs, make_inputs, str(tmp_path / "b1"), batch_size=1, **kw)
    three = datagen.generate_data(target, recs, make_inputs, str(tmp_path / "b3"), batch_size=3, **kw)
    assert one["forwards"] == 5 and three["forwards"] == 2 and one["new_tokens"] == three["new_tokens"]
    _assert_same_data(tmp_path / "b1", tmp_path / "b3")
    answers = _check_against_decoding(target, recs, tmp_path / "b3", 8, monkeypatch)
    assert answers["s001"] == [35]  # stopped at eos, eos kept
    assert any(len(a) == 8 for a in answers.values())


def test_gen_data_llava_frame_counts_split_batches(tmp_path):
    """LLaVA-OneVision stacks videos per row: records of other frame counts go to their own
    forward (said once), with the same data as one at a time."""
    target = tiny_adapter("llava_onevision")
    recs = tiny_records(3, frames=(2, 4, 2))
    kw = dict(max_new_tokens=4, progress=False)
    one = datagen.generate_data(target, recs, make_inputs, str(tmp_path / "b1"), batch_size=1, **kw)
    with pytest.warns(UserWarning, match="'s000' and 's001' cannot share a forward.*pixel_values_videos"):
        three = datagen.generate_data(target, recs, make_inputs, str(tmp_path / "b3"), batch_size=3, **kw)
    assert one["forwards"] == 3 and three["forwards"] == 2
    _assert_same_data(tmp_path / "b1", tmp_path / "b3")


def test_collate_pads_left_and_stacks_by_family():
    qwen = tiny_adapter().model
    a, b = (tiny_inputs(qwen, frames=f, prompt_lens=[n], seed=s) for f, n, s in ((12, 4, 1), (2, 7, 2)))
    assert datagen.batch_signature(a) == datagen.batch_signature(b)
    batch = datagen.collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == (2, max(a["input_ids"].shape[1], b["input_ids"].shape[1]))
    assert torch.equal(batch["pixel_values_videos"], torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]))
    assert batch["video_grid_thw"].tolist() == [[6, 4, 4], [1, 4, 4]]
    short = 0 if a["input_ids"].shape[1] < b["input_ids"].shape[1] else 1
    assert batch["attention_mask"][short, 0] == 0 and batch["attention_mask"][:, -1].all()
    llava = tiny_adapter("llava_onevision").model
    v2, v4 = tiny_inputs(llava, frames=2), tiny_inputs(llava, frames=4)
    assert datagen.batch_signature(v2) != datagen.batch_signature(v4)
    assert datagen.collate([v2, v2])["pixel_values_videos"].shape[0] == 2


def test_one_batch_of_pixels_on_the_device_at_a_time(tmp_path, monkeypatch):
    """gen-data and eval move one batch (eval: one record) to the device at a time, and the batch
    before is gone by then: at every move, no pixel tensor an earlier move returned is alive."""
    import gc
    import weakref

    from sparrow.train import evaluate as ev

    def watch(module):
        moved = []

        def to_device(inputs, device, dtype):
            gc.collect()
            alive = [r for r in moved if r() is not None]
            assert not alive, f"{len(alive)} earlier batches' pixels still held"
            out = records.to_device(inputs, device, dtype)
            moved.extend(weakref.ref(v) for k, v in out.items() if k.startswith("pixel_values") and v is not None)
            return out

        monkeypatch.setattr(module, "to_device", to_device)
        return moved

    target = tiny_adapter()
    moved = watch(datagen)
    datagen.generate_data(target, tiny_records(5), make_inputs, str(tmp_path), max_new_tokens=3, batch_size=2,
                          progress=False)
    assert len(moved) == 3  # 2 + 2 + 1 records
    moved = watch(ev)
    res = ev.evaluate(target, tiny_records(3), make_inputs, {}, max_new_tokens=3, warmup=1, progress=False)
    assert len(moved) == 4 and len(res["requests"]) == 3  # the warm-up record, then each record once
