"""Target adapters: a greedy draft/verify/commit loop over trees must reproduce HF generate.

Everything runs on tiny float64 models (tests/tiny_models.py). The loop below uses only the
adapter's prefill / verify / commit (and select_rows) plus sparrow.ops.verify at temperature 0;
drafts are trees that contain the true continuation up to a random depth, random siblings and a
padded node, so accept lengths vary per row and per step and rejected entries pollute the cache.
"""

from __future__ import annotations

import types

import pytest
import torch

from sparrow import ops
from sparrow.targets import FeatureSpec, load_target
from sparrow.tree import Tree
from tiny_models import FAMILIES, TEXT_HI, TEXT_LO, take_row, tiny_inputs, tiny_target

NEW = 8  # tokens generated per row

# A 6-node tree: node1 = true token 1 (under root), node2 random sibling, node3 = true token 2
# (under node1), node4 padded (under node1), node5 random (under node3), node6 = true token 3.
TREE_PARENTS = [0, 0, 1, 1, 3, 3]
TRUE_NODES = [1, 3, 6]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_target(request.param)


_REFS: dict = {}


def _batch_case(family, model, which):
    """Shared inputs and per-row reference continuations (each row's own batch-1 generate)."""
    key = (family, which)
    if key not in _REFS:
        if which == "b1":
            inputs = tiny_inputs(model, batch=1, frames=4, prompt_lens=7, seed=1)
        else:
            frames = 2 if family == "llava_onevision" else (2, 6, 4)
            inputs = tiny_inputs(model, batch=3, frames=frames, prompt_lens=(5, 11, 3), seed=2)
        refs = [_reference(model, take_row(inputs, b)) for b in range(inputs["input_ids"].shape[0])]
        _REFS[key] = (inputs, refs)
    return _REFS[key]


def _reference(model, inputs, n=NEW):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _draft(refs, done, g, B, tree_kind):
    """Draft tokens [B, N] and parents [B, N] for every row: the true continuation refs[b][done[b]:]
    up to a random depth, the rest random."""
    if tree_kind == "ar":
        return torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, 0, dtype=torch.long)
    parents = TREE_PARENTS if tree_kind == "tree" else [0, 1, 2]
    true_nodes = TRUE_NODES if tree_kind == "tree" else [1, 2, 3]
    N = len(parents)
    drafts = torch.randint(TEXT_LO, TEXT_HI, (B, N), generator=g)
    for b in range(B):
        cont = refs[b][done[b] :]
        good = int(torch.randint(0, 4, (1,), generator=g))
        for d, node in enumerate(true_nodes[:good]):
            if d < len(cont):
                drafts[b, node - 1] = cont[d]
        if tree_kind == "tree":
            drafts[b, 3] = -1  # node 4: padded
    return drafts, torch.tensor(parents).expand(B, N).clone()


def _spec_loop(adapter, inputs, refs, tree_kind="tree", seed=0, drop_after=None, keep=None):
    """Greedy speculative decoding with the adapter. Returns per-row generated tokens and, per row,
    the (generated-token index, feature) pairs seen at verify."""
    g = torch.Generator().manual_seed(seed)
    dev = adapter.device
    pre = adapter.prefill(inputs)
    state = pre.state
    B = state.batch_size
    rows = list(range(B))
    first = pre.logits.argmax(-1)
    outs = {b: [int(first[i])] for i, b in enumerate(rows)}
    feats = {b: [] for b in rows}
    root = first
    step = 0
    while any(len(outs[b]) < NEW for b in rows):
        done = [len(outs[b]) for b in rows]  # tokens generated so far; the root is the last one
        drafts, parents = _draft([refs[b] for b in rows], done, g, len(rows), tree_kind)
        drafts, parents = drafts.to(dev), parents.to(dev)
        vo = adapter.verify(state, root, Tree.from_parents(drafts, parents))
        assert vo.logits.shape == (len(rows), drafts.shape[1] + 1, adapter.text_config.vocab_size)
        n = drafts.shape[1]
        acc_len, acc_nodes, out_tok = ops.verify(
            drafts, parents, vo.logits, None, torch.zeros(len(rows), device=dev), torch.rand(len(rows), n + 1).to(dev)
        )
        adapter.commit(state, acc_nodes, acc_len)
        for i, b in enumerate(rows):
            k = int(acc_len[i])
            nodes = [0] + acc_nodes[i, :k].tolist()
            for j, node in enumerate(nodes):
                feats[b].append((done[i] - 1 + j, vo.features[i, node]))
            outs[b] += out_tok[i, : k + 1].tolist()
        root = out_tok.gather(1, acc_len[:, None]).squeeze(1)
        step += 1
        if drop_after is not None and step == drop_after:
            idx = [rows.index(b) for b in keep]
            state = adapter.select_rows(state, torch.tensor(idx))
            root = root[torch.tensor(idx, device=dev)]
            rows = list(keep)
    return {b: outs[b][:NEW] for b in rows}, feats, pre


def _full_forward_hidden(model, row_inputs, generated):
    """HF's own hidden states (plain forward, output_hidden_states) over prompt + generated."""
    ids = torch.cat([row_inputs["input_ids"], torch.tensor([generated])], 1)
    full = dict(row_inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in row_inputs:
        full["mm_token_type_ids"] = torch.cat(
            [row_inputs["mm_token_type_ids"], torch.zeros(1, len(generated), dtype=row_inputs["mm_token_type_ids"].dtype)], 1
        )
    with torch.no_grad():
        out = model(**full, output_hidden_states=True)
        last = model.model(**full).last_hidden_state
    return last[0], [h[0] for h in out.hidden_states], out.logits[0]


@pytest.mark.parametrize("tree_kind", ["tree", "chain"])
def test_batch1_matches_generate(family_model, tree_kind):
    family, model = family_model
    if tree_kind == "chain" and family != "qwen2_5_vl":
        pytest.skip("chains: one family suffices (trees cover the rest)")
    adapter = load_target(model, positions="generate")  # the reference is HF generate
    inputs, (ref,) = _batch_case(family, model, "b1")
    outs, feats, pre = _spec_loop(adapter, inputs, [ref], tree_kind)
    assert outs[0] == ref
    # Features = HF's final-norm hidden states at the same positions (prompt and generated).
    last, _, _ = _full_forward_hidden(model, inputs, ref)
    S = inputs["input_ids"].shape[1]
    torch.testing.assert_close(pre.features[0], last[:S], rtol=1e-9, atol=1e-9)
    for j, f in feats[0]:
        if j < NEW:
            torch.testing.assert_close(f, last[S + j], rtol=1e-9, atol=1e-9)


def test_batch3_rows_match_their_own_generate(family_model):
    family, model = family_model
    adapter = load_target(model, positions="generate")  # the reference is HF generate
    inputs, refs = _batch_case(family, model, "b3")
    outs, feats, pre = _spec_loop(adapter, inputs, refs, "tree", seed=3)
    for b in range(3):
        assert outs[b] == refs[b], f"row {b}"
    # The batched prefill's features at real positions equal each row's own forward.
    for b in range(3):
        row = take_row(inputs, b)
        last, _, _ = _full_forward_hidden(model, row, refs[b])
        n = row["input_ids"].shape[1]
        torch.testing.assert_close(pre.features[b, -n:], last[:n], rtol=1e-9, atol=1e-9)
        for j, f in feats[b]:
            if j < NEW:
                torch.testing.assert_close(f, last[n + j], rtol=1e-9, atol=1e-9)
    lens = [take_row(inputs, b)["input_ids"].shape[1] for b in range(3)]
    assert adapter.prefill(inputs).state.lens.tolist() == lens  # rows are left-aligned in the cache
    assert pre.text_mask.sum(-1).tolist() == [
        int((take_row(inputs, b)["input_ids"] < TEXT_HI).sum()) + (2 if family != "llava_onevision" else 0)
        for b in range(3)
    ]


def test_autoregressive_n0_and_select_rows(family_model):
    family, model = family_model
    adapter = load_target(model, positions="generate")  # the reference is HF generate
    inputs, refs = _batch_case(family, model, "b3")
    outs, _, _ = _spec_loop(adapter, inputs, refs, "ar")
    assert [outs[b] for b in range(3)] == refs
    outs, _, _ = _spec_loop(adapter, inputs, refs, "tree", seed=5, drop_after=2, keep=[0, 2])
    assert outs[0] == refs[0] and outs[2] == refs[2] and 1 not in outs


def test_verify_attention_backends_agree(family_model, monkeypatch):
    """Verify's attention through ops.text_attention (the default) and through SDPA over a mask
    built once per step give the same logits and features, for a tree with a padded node, in a
    padded batch (verify_attention.py); the model's own attention setting is restored after."""
    family, model = family_model
    inputs, refs = _batch_case(family, model, "b3")
    calls = []
    real = ops.text_attention
    monkeypatch.setattr(ops, "text_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    drafts = torch.tensor([[r[1], 3, r[2], -1, 5, r[3]] for r in refs])
    tree = Tree.from_parents(drafts, torch.tensor([TREE_PARENTS] * 3))
    outs = {}
    for backend in ("sparrow", "sdpa"):
        adapter = load_target(model)
        adapter.verify_attention = backend
        state = adapter.prefill(inputs).state
        calls.clear()
        outs[backend] = adapter.verify(state, torch.tensor([r[0] for r in refs]), tree)
        assert len(calls) == (model.config.text_config.num_hidden_layers if backend == "sparrow" else 0)
        assert model.config.text_config._attn_implementation == "sdpa"  # restored after the call
    real_nodes = torch.cat([torch.ones(3, 1, dtype=torch.bool), drafts >= 0], 1)
    for field in ("logits", "features"):
        a, b = getattr(outs["sparrow"], field), getattr(outs["sdpa"], field)
        torch.testing.assert_close(a[real_nodes], b[real_nodes], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_input(family):
    model = tiny_target(family, seed=1)
    adapter = load_target(model)
    inputs = tiny_inputs(model, batch=2, prompt_lens=(4, 7), seed=6, image=True)
    refs = [_reference(model, take_row(inputs, b)) for b in range(2)]
    outs, _, _ = _spec_loop(adapter, inputs, refs, "tree", seed=7)
    assert [outs[0], outs[1]] == refs


@pytest.mark.parametrize("positions", ["release", "generate", "forward"])
def test_prefill_continuation_places_the_answer_where_decoding_does(family_model, positions):
    """Training data: prefill over prompt + answer with continuation=A gives the answer tokens the
    features (and logits) decoding gives them: prefill(prompt), then verify of the answer as a
    chain. A long video (8 frame pairs, 2x2 rows) before a 1-token question is where a
    whole-sequence forward of Qwen-VL under transformers 5.x places the answer elsewhere than
    decoding after the largest position does (positions="forward"); under "release" and
    "generate" the whole-sequence positions are the decoding ones."""
    family, model = family_model
    frames = 4 if family == "llava_onevision" else 16
    batch = tiny_inputs(model, batch=2, frames=frames, prompt_lens=(2, 5), seed=4)
    adapter = load_target(model, positions=positions)
    for b in range(2):
        inputs = take_row(batch, b)
        answer = torch.tensor([_reference(model, inputs, n=5)])
        A = answer.shape[1]
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer], 1))
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in inputs:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
        together = adapter.prefill(full, continuation=A)
        pre = adapter.prefill(inputs)
        stepwise = adapter.verify(pre.state, answer[:, 0], Tree.chain(answer[:, 1:]))
        torch.testing.assert_close(together.features[0, -A:], stepwise.features[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(together.logits[0], stepwise.logits[0, -1], rtol=1e-9, atol=1e-9)
        assert int(together.state.next_position[0]) == int(pre.state.next_position[0]) + A
        whole = adapter.prefill(full)  # positions of one forward over everything
        differs = not torch.allclose(whole.features[0, -A:], stepwise.features[0], atol=1e-6)
        assert differs == (family != "llava_onevision" and positions == "forward"), (family, b)
    with pytest.raises(ValueError, match="continuation"):
        adapter.prefill(full, continuation=full["input_ids"].shape[1])


def test_feature_spec_and_visual_states():
    model = tiny_target("qwen2_5_vl", num_hidden_layers=4)
    inputs = tiny_inputs(model, batch=1, frames=2, prompt_lens=5)
    ref = _reference(model, inputs, n=3)
    _, hidden, logits = _full_forward_hidden(model, inputs, ref)
    S = inputs["input_ids"].shape[1]
    # Pre-norm output of decoder layer 1 (hidden_states[2]); visual_mid = input of layer L/2 = 2.
    adapter = load_target(model, FeatureSpec(layer=1, after_norm=False))
    pre = adapter.prefill(inputs, want_visual_embeds=True, want_visual_mid=True)
    torch.testing.assert_close(pre.features[0], hidden[2][:S], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pre.visual_mid[0], hidden[2][:S], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pre.visual_embeds[0], hidden[0][:S], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pre.logits[0], logits[S - 1], rtol=1e-9, atol=1e-9)
    assert pre.visual_mask.sum() == (inputs["input_ids"] == model.config.video_token_id).sum()
    vo = adapter.verify(pre.state, torch.tensor([ref[0]]), Tree.chain(torch.tensor([[ref[1]]])))
    torch.testing.assert_close(vo.features[0], hidden[2][S : S + 2], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(vo.logits[0], logits[S : S + 2], rtol=1e-9, atol=1e-9)
    # Last layer, pre-norm.
    adapter = load_target(model, FeatureSpec(layer=-1, after_norm=False))
    pre = adapter.prefill(inputs)
    torch.testing.assert_close(pre.features[0], hidden[4][:S] if len(hidden) > 5 else pre.features[0])
    assert adapter.identity()["model_type"] == "qwen2_5_vl"
    assert adapter.final_norm() is adapter.language_model.norm
    assert adapter.lm_head() is model.lm_head
    with pytest.raises(ValueError, match="after_norm"):
        load_target(model, FeatureSpec(layer=0, after_norm=True))


def test_clear_errors():
    model = tiny_target("qwen2_vl")
    adapter = load_target(model)
    inputs = tiny_inputs(model, batch=2)
    no_video = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw")}
    with pytest.raises(ValueError, match="visual input"):
        adapter.prefill(no_video)
    with pytest.raises(ValueError, match="empty prompt"):
        adapter.prefill(dict(inputs, input_ids=inputs["input_ids"][:, :0], attention_mask=inputs["attention_mask"][:, :0]))
    empty_row = inputs["attention_mask"].clone()
    empty_row[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        adapter.prefill(dict(inputs, attention_mask=empty_row))
    with pytest.raises(ValueError, match="device"):
        adapter.prefill(dict(inputs, attention_mask=inputs["attention_mask"].to("meta")))
    with pytest.raises(ValueError, match="LEFT-padded"):
        adapter.prefill(dict(inputs, attention_mask=inputs["attention_mask"].flip(-1)))
    pre = adapter.prefill(inputs)
    with pytest.raises(RuntimeError, match="no verify"):
        adapter.commit(pre.state, torch.full((2, 1), -1), torch.zeros(2, dtype=torch.long))

    class Fake:
        class config:
            model_type = "llama"

    with pytest.raises(ValueError, match="unsupported target model_type 'llama'"):
        load_target(Fake())


def test_eager_attention_and_flash_refused():
    model = tiny_target("llava_onevision", attn_implementation="eager", seed=3)
    assert model.config.get_text_config()._attn_implementation == "eager"
    adapter = load_target(model)
    inputs = tiny_inputs(model, batch=2, frames=2, prompt_lens=(3, 6), seed=8)
    refs = [_reference(model, take_row(inputs, b)) for b in range(2)]
    outs, _, _ = _spec_loop(adapter, inputs, refs, "tree", seed=9)
    assert [outs[0], outs[1]] == refs

    class FlashConfig:
        model_type = "qwen2_vl"
        _attn_implementation = "flash_attention_2"

        def get_text_config(self):
            return types.SimpleNamespace(num_hidden_layers=3, _attn_implementation="flash_attention_2")

    class FlashModel:
        config = FlashConfig()

    with pytest.raises(ValueError, match="cannot take a padded batch"):
        load_target(FlashModel())


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_float32_batch_matches_generate(family):
    model = tiny_target(family, dtype=torch.float32, seed=4).to("cuda")
    adapter = load_target(model, positions="generate")  # the reference is HF generate
    frames = 2 if family == "llava_onevision" else (4, 2, 6)
    inputs = tiny_inputs(model, batch=3, frames=frames, prompt_lens=(4, 9, 6), seed=10)
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    tf32 = torch.backends.cudnn.allow_tf32  # the patch-embedding convs: keep them exact-ish
    torch.backends.cudnn.allow_tf32 = False
    try:
        refs = [_reference(model, take_row(inputs, b)) for b in range(3)]
        outs, _, _ = _spec_loop(adapter, inputs, refs, "tree", seed=11, drop_after=1, keep=[0, 2])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert outs[0] == refs[0] and outs[2] == refs[2]
