"""M-RoPE position rules of Qwen2-VL / Qwen2.5-VL (sparrow/targets/positions.py, `positions=`).

"release" (the default): positions.py against hand-worked cases, then sparrow.generate against an
independent reference: a greedy loop of full forwards of the Hugging Face model (no cache) with the
prompt's positions from positions.py and decoded token i at (largest prompt position) + 1 + i.
"generate": sparrow.generate against the installed transformers' model.generate. Both on long
videos (more temporal positions than rows of merged patches), where the rules differ (checked),
chain and tree, batch 1 and 3. The world target runs with the rule it records.
"""

from __future__ import annotations

import functools

import pytest
import torch

import sparrow
from sparrow.targets import load_target
from sparrow.targets.positions import after_largest, after_last, release_position_ids
from test_generate import ORACLE_TREE, OracleDraft, oracle_proposals  # noqa: F401 (autouse fixture)
from tiny_models import IMAGE_ID, PAD_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID, take_row, tiny_inputs, tiny_target

QWEN = ("qwen2_5_vl", "qwen2_vl")
N_NEW = 10
# 14-20 frames: 7-10 temporal positions (x2 in Qwen2.5-VL: tokens_per_second 2) against 2x2 merged
# rows/columns; the text after the video is 3-4 tokens, shorter than the temporal extent.
LONG = dict(frames=(16, 14, 20), prompt_lens=(5, 7, 4), seed=3)
A, B, C, D = 10, 11, 12, 13  # text tokens of the hand-worked cases
VS, VE = VISION_START_ID, VISION_END_ID


def _release(ids, grids, video=True, mask=None, **kw):
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    key = "video_grid_thw" if video else "image_grid_thw"
    return release_position_ids(ids, mask, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, spatial_merge_size=2,
                                **{key: torch.tensor(grids)}, **kw)


# -- (a) the rule by hand ------------------------------------------------------------------------
# Prompt: A B <vs> video(t=4, h=2, w=2 -> 4 tokens of one merged patch) <ve> C D
HAND_IDS = [[A, B, VS] + [VIDEO_ID] * 4 + [VE, C, D]]


def test_qwen2_vl_video_by_hand():
    # text 0 1 2; frames at 3+0..3+3 on the temporal axis, 3 on height/width; the block's largest
    # position is 6, so <ve> C D are 7 8 9 (transformers 5.x: 4 5 6) and decoding starts at 10.
    want = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            [0, 1, 2, 3, 3, 3, 3, 7, 8, 9],
            [0, 1, 2, 3, 3, 3, 3, 7, 8, 9]]
    pos = _release(HAND_IDS, [[4, 2, 2]])
    assert pos[:, 0].tolist() == want
    assert after_largest(pos, torch.ones(1, 10)).tolist() == [10]


def test_qwen2_5_vl_time_scaled_video_by_hand():
    # 2 s per grid step x 2 tokens per second: temporal offsets 0 4 8 12 -> 3 7 11 15; text after at 16.
    want = [[0, 1, 2, 3, 7, 11, 15, 16, 17, 18],
            [0, 1, 2, 3, 3, 3, 3, 16, 17, 18],
            [0, 1, 2, 3, 3, 3, 3, 16, 17, 18]]
    pos = _release(HAND_IDS, [[4, 2, 2]], second_per_grid_ts=torch.tensor([2.0]), tokens_per_second=2)
    assert pos[:, 0].tolist() == want
    # 0.5 s x 3 tokens/s = 1.5 per step, floored as the release's .long(): 0 1 3 4
    pos = _release(HAND_IDS, [[4, 2, 2]], second_per_grid_ts=torch.tensor([0.5]), tokens_per_second=3)
    assert pos[0, 0, 3:7].tolist() == [3, 4, 6, 7] and pos[0, 0, 7] == 8
    # no second_per_grid_ts: 1 s per step
    pos = _release(HAND_IDS, [[4, 2, 2]], tokens_per_second=2)
    assert pos[0, 0, 3:8].tolist() == [3, 5, 7, 9, 10]


def test_image_by_hand():
    # A <vs> image(1 x 4 x 6 -> 2 x 3 merged: rows 2 3, columns 2 3 4) <ve> B: the largest is 4.
    ids = [[A, VS] + [IMAGE_ID] * 6 + [VE, B]]
    want = [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
            [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
            [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    for tps in (None, 2):  # Qwen2.5-VL: an image's temporal offset is 0 whatever tokens_per_second
        assert _release(ids, [[1, 4, 6]], video=False, tokens_per_second=tps)[:, 0].tolist() == want


def test_two_blocks_and_left_padding_by_hand():
    # row 0: A video(t=2, 1x1) video(t=3, 1x1) B -- two blocks back to back, each after the last's largest
    # row 1: padded; A B video(t=2, 1x1) C
    ids = [[A] + [VIDEO_ID] * 5 + [B], [PAD_ID, PAD_ID, A, B, VIDEO_ID, VIDEO_ID, C]]
    mask = [[1] * 7, [0, 0, 1, 1, 1, 1, 1]]
    pos = _release(ids, [[2, 2, 2], [3, 2, 2], [2, 2, 2]], mask=mask)
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 1, 3, 3, 3, 6], [0, 1, 1, 3, 3, 3, 6]]
    assert pos[:, 1, 2:].tolist() == [[0, 1, 2, 3, 4]] + [[0, 1, 2, 2, 4]] * 2
    live = torch.tensor(mask)
    assert after_largest(pos, live).tolist() == [7, 5]
    assert after_last(pos, live).tolist() == [7, 5]


def test_clear_errors():
    with pytest.raises(ValueError, match="needs 8 placeholder tokens, the prompt has 4"):
        _release(HAND_IDS, [[8, 2, 2]])
    with pytest.raises(ValueError, match="more video placeholder tokens"):
        _release([[A] + [VIDEO_ID] * 8 + [B]], [[4, 2, 2]])
    with pytest.raises(ValueError, match="1 more video"):
        _release(HAND_IDS, [[4, 2, 2], [2, 2, 2]])
    with pytest.raises(ValueError, match="ends with a visual token"):
        after_last(_release([[A] + [VIDEO_ID] * 4], [[1, 4, 4]]), torch.ones(1, 5))
    model = _model("qwen2_vl")
    with pytest.raises(ValueError, match="'release'.*'generate'"):
        load_target(model, positions="4.x")
    assert load_target(model).positions == "release"  # the default
    llava = load_target(tiny_target("llava_onevision"), positions="generate")  # 1D positions: no effect
    assert llava.family == "llava_onevision"


@pytest.mark.parametrize("family", QWEN)
def test_short_clips_agree_with_the_installed_rule(family):
    """Where the temporal extent fits in the spatial one (1 frame pair), the release's rule and
    the installed get_rope_index give the same positions: positions.py reads the same inputs."""
    model = _model(family)
    inputs = tiny_inputs(model, batch=3, frames=2, prompt_lens=(5, 7, 4), seed=1)
    mine = _release_of(model, inputs)
    theirs = load_target(model, positions="generate")._installed_positions(
        inputs, inputs["input_ids"], inputs["attention_mask"])
    live = inputs["attention_mask"].bool()[None].expand_as(mine)
    assert torch.equal(mine[live], theirs[live])


# -- the references ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _model(family):
    return tiny_target(family)


@functools.lru_cache(maxsize=None)
def _long_batch(family):
    return tiny_inputs(_model(family), batch=3, **LONG)


def _release_of(model, inputs):
    cfg = model.config
    tps = cfg.vision_config.tokens_per_second if cfg.model_type == "qwen2_5_vl" else None
    return release_position_ids(
        inputs["input_ids"], inputs["attention_mask"], image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision_config.spatial_merge_size,
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        tokens_per_second=tps)


@torch.no_grad()
def _release_greedy(model, row, n):
    """The release's rule through the model's own forward: the whole sequence every step, no cache
    (the vision tower's output is computed once and scattered into the embeddings, as forward does)."""
    prompt = _release_of(model, row)
    first = int(prompt.max()) + 1
    ids = row["input_ids"]
    video = model.model.get_video_features(row["pixel_values_videos"], row["video_grid_thw"]).pooler_output
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == VIDEO_ID] = torch.cat(video).to(embeds.dtype)
    out = []
    for i in range(n):
        decoded = torch.arange(first, first + i).view(1, 1, -1).expand(3, 1, i)
        logits = model(inputs_embeds=embeds, position_ids=torch.cat([prompt, decoded], -1)).logits
        out.append(int(logits[0, -1].argmax()))
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[out[-1]]]))], 1)
    return out


def _hf_generate(model, row, n):
    out = model.generate(**row, do_sample=False, max_new_tokens=n, pad_token_id=PAD_ID)
    return out[0, row["input_ids"].shape[1]:].tolist()


@functools.lru_cache(maxsize=None)
def _references(family, rule):
    model, inputs = _model(family), _long_batch(family)
    reference = _release_greedy if rule == "release" else _hf_generate
    return [reference(model, take_row(inputs, b), N_NEW) for b in range(3)]


# -- (b, c) sparrow.generate against each rule's reference ---------------------------------------------
@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("rule", ["release", "generate"])
@pytest.mark.parametrize("batch,how", [(1, "chain"), (1, "tree"), (3, "chain"), (3, "tree")])
def test_generate_follows_the_rule_on_long_videos(family, rule, batch, how):
    target = load_target(_model(family), positions=rule)
    inputs = _long_batch(family) if batch == 3 else take_row(_long_batch(family), 0)
    refs = _references(family, rule)[:batch]
    draft = OracleDraft.from_target(target)  # proposes the reference, right up to a random depth
    draft.refs, draft.rng = dict(enumerate(refs)), torch.Generator().manual_seed(batch)
    kw = dict(chain=3) if how == "chain" else dict(tree=ORACLE_TREE)
    out = sparrow.generate(target, draft, inputs, N_NEW, **kw)
    assert out.tokens == refs
    assert out.stats.accepted_per_step > 0.5  # positions of accepted nodes count too


# -- (d) the rules really differ here ----------------------------------------------------------------------
@pytest.mark.parametrize("family", QWEN)
def test_the_rules_differ_on_these_videos(family):
    model, inputs = _model(family), _long_batch(family)
    mask = inputs["attention_mask"]
    release = _release_of(model, inputs)
    installed = load_target(model, positions="generate")._installed_positions(inputs, inputs["input_ids"], mask)
    for b in range(3):  # the text after every row's video sits elsewhere
        assert not torch.equal(release[:, b][:, mask[b].bool()], installed[:, b][:, mask[b].bool()]), b
    # generate continues after the last position, not after the largest (Sparrow before `positions=`)
    assert (after_last(installed, mask) < after_largest(installed, mask)).all()
    rel, gen = _references(family, "release"), _references(family, "generate")
    assert all(r != g for r, g in zip(rel, gen))
    stepwise = sparrow.generate(load_target(model, positions="forward"), None, inputs, N_NEW).tokens
    assert stepwise != gen


# -- (e) the world target records its rule ------------------------------------------------------------------
def test_world_target_runs_with_its_recorded_rule():
    """The world target was trained with the answer after the prompt's largest position under the
    installed get_rope_index ("forward", generation_position_ids); its config records it, load_target
    takes it, and sparrow.generate then equals the model's own step-by-step cached decoding."""
    from sparrow.world import load_world_target, make_inputs
    from sparrow.world.processor import ASSET_DIR
    from sparrow.world.target import TRAINED_POSITIONS

    if not (ASSET_DIR / "config.json").exists():
        pytest.skip("no trained world target shipped")
    model, _ = load_world_target()
    assert model.config.sparrow_positions == TRAINED_POSITIONS == "forward"
    target = load_target(model)
    assert target.positions == "forward"
    assert load_target(model, positions="release").positions == "release"  # an explicit choice wins
    x = make_inputs({"seed": 5, "frames": 64, "height": 56})  # 32 frame pairs, 2x2 merged rows
    mask = x["attention_mask"]
    installed = target._installed_positions(x, x["input_ids"], mask)
    assert after_last(installed, mask) < after_largest(installed, mask)  # generate would differ
    n = 6
    with torch.no_grad():  # the model's cached forward continues through its rope_deltas
        out = model(**x, use_cache=True)
        cached = []
        for _ in range(n):
            cached.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[cached[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    assert sparrow.generate(target, None, x, n).tokens == [cached]
