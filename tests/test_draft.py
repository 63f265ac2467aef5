"""SparrowDraft: cached inference paths against the dense forward, tree expansion, checkpoints,
and the VATA property (the draft's cache holds no visual entry)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparrow.draft import DraftConfig, SparrowDraft
from sparrow.drafting import TreeConfig, propose_chain, propose_tree
from sparrow.sampling import SamplingConfig
from sparrow.tree import Tree

V, H = 50, 32


def _standalone(seed=0, window=0, after_norm=True, heads=4, kv=2) -> SparrowDraft:
    """A draft with its own random embed / lm_head (no target needed), float64."""
    torch.manual_seed(seed)
    cfg = DraftConfig(
        target={"model_type": "none"},
        hidden_size=H,
        intermediate_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=H // heads,
        vocab_size=V,
        window=window,
        feature_after_norm=after_norm,
        initializer_range=0.3,
    )
    embed = nn.Embedding(V, H).double()
    head = nn.Linear(H, V, bias=False).double()
    norm = None if after_norm else nn.LayerNorm(H).double()
    return SparrowDraft(cfg, embed, head, norm).double()


def _dense_last(draft, x_path: torch.Tensor) -> torch.Tensor:
    """Layer output at the last position of a causal dense pass over layer inputs x_path [L, H]."""
    L = x_path.shape[0]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None]
    pos = torch.arange(L)[None]
    return draft.layer.dense(x_path[None], pos, allowed)[0, -1]


# -- the cached path equals the dense forward ------------------------------------------------------
@pytest.mark.parametrize("with_prefix", [False, True])
def test_ragged_cached_extend_equals_forward_sequence(with_prefix):
    draft = _standalone()
    B, L, P = 3, 9, 4
    tokens = torch.randint(0, V, (B, L))
    feats = torch.randn(B, L, H, dtype=torch.float64)
    feats[:, 0] = 0
    prefix = torch.randn(B, P, H, dtype=torch.float64) if with_prefix else None
    with torch.no_grad():
        dense = draft.forward_sequence(tokens, feats, torch.arange(L).expand(B, L), None, prefix)
        x = draft.input_states(tokens, feats)
        if with_prefix:
            x = torch.cat([prefix, x], 1)
        total = x.shape[1]
        # Ragged chunks: row b feeds chunk sizes from its own schedule.
        schedules = [[3, 1, 4, total - 8], [1] * total, [total]]
        cache = draft.new_cache(B, capacity=total + 9)  # the last block of a full row is padded
        outs = [[] for _ in range(B)]
        done = [0] * B
        while any(done[b] < total for b in range(B)):
            counts = []
            for b in range(B):
                sched = schedules[b]
                n = sched.pop(0) if sched else 0
                counts.append(n)
            M = max(counts)
            block = torch.zeros(B, M, H, dtype=torch.float64)
            for b in range(B):
                block[b, : counts[b]] = x[b, done[b] : done[b] + counts[b]]
            y = draft.extend(cache, block, torch.tensor(counts))
            for b in range(B):
                outs[b].append(y[b, : counts[b]])
                done[b] += counts[b]
        got = torch.stack([torch.cat(o)[-L:] for o in outs])
    assert cache.lens.tolist() == [total] * B
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10)


def test_cache_is_allocated_once_and_a_write_past_it_fails():
    draft = _standalone()
    cache = draft.new_cache(2, capacity=5)
    k, v = cache.k, cache.v
    x = torch.randn(2, 3, H, dtype=torch.float64)
    with torch.no_grad():
        draft.extend(cache, x, torch.tensor([3, 2]))
        assert cache.k is k and cache.v is v  # written in place
        with pytest.raises(RuntimeError, match="start"):
            draft.extend(cache, x, torch.tensor([3, 3]))  # row 0 would need slots 3..5 of 0..4


def test_window_limits_what_a_new_query_sees():
    w = 3
    draft = _standalone(window=w)
    tokens = torch.randint(0, V, (1, 10))
    feats = torch.randn(1, 10, H, dtype=torch.float64)
    with torch.no_grad():
        dense = draft.forward_sequence(tokens, feats, torch.arange(10)[None])
        x = draft.input_states(tokens, feats)
        cache = draft.new_cache(1, capacity=10)
        ys = [draft.extend(cache, x[:, t : t + 1], torch.tensor([1]))[:, 0] for t in range(10)]
    # One token at a time: each query sees itself plus the last `window` entries, as in the dense mask.
    torch.testing.assert_close(torch.stack(ys, 1), dense, rtol=1e-10, atol=1e-10)


def test_tree_block_outputs_equal_their_paths():
    """Depth-by-depth tree expansion through text_attention (whole tree-so-far as the block with
    its ancestor mask) gives each node the output of a plain causal pass over its own path."""
    draft = _standalone(seed=1)
    B, C = 2, 5
    x_committed = torch.randn(B, C, H, dtype=torch.float64)
    with torch.no_grad():
        cache = draft.new_cache(B, capacity=16)
        draft.extend(cache, x_committed, torch.tensor([C, C - 2]))  # row 1 has 3 committed entries
        lens = cache.lens.tolist()
        # Level 1: 2 nodes under the root; level 2: 3 nodes with parents [0, 0, 1] among level 1.
        x1 = torch.randn(B, 2, H, dtype=torch.float64)
        anc1 = torch.eye(2, dtype=torch.bool).expand(B, 2, 2).clone()
        root = (cache.lens - 1)[:, None]
        out1, q = draft.tree_block(cache, x1, root + 1, None, anc1)
        x2 = torch.randn(B, 3, H, dtype=torch.float64)
        par = [0, 0, 1]
        anc2 = torch.zeros(B, 5, 5, dtype=torch.bool)
        anc2[:, :2, :2] = anc1
        for j, p in enumerate(par):
            anc2[:, 2 + j, p] = True
            anc2[:, 2 + j, 2 + j] = True
        out2, _ = draft.tree_block(cache, x2, (root + 2).expand(B, 3), q, anc2)
        assert cache.lens.tolist() == lens  # committed part untouched
        for b in range(B):
            base = x_committed[b, : lens[b]]
            for j in range(2):
                ref = _dense_last(draft, torch.cat([base, x1[b, j : j + 1]]))
                torch.testing.assert_close(out1[b, j], ref, rtol=1e-10, atol=1e-10)
            for j, p in enumerate(par):
                ref = _dense_last(draft, torch.cat([base, x1[b, p : p + 1], x2[b, j : j + 1]]))
                torch.testing.assert_close(out2[b, j], ref, rtol=1e-10, atol=1e-10)


def _committed(draft, B=3, with_inputs=False):
    torch.manual_seed(5)
    cache = draft.new_cache(B, capacity=64)
    L = 6
    toks = torch.randint(0, V, (B, L))
    feats = torch.randn(B, L, H, dtype=torch.float64)
    counts = torch.tensor([6, 4, 5][:B])
    root_hidden = draft.commit(cache, toks, feats, counts)
    if with_inputs:
        with torch.no_grad():
            x = draft.input_states(toks, feats)
        return cache, root_hidden, [x[b, : counts[b]] for b in range(B)]
    return cache, root_hidden


def test_propose_tree_structure_and_scores():
    draft = _standalone(seed=2)
    cache, root_hidden, x_committed = _committed(draft, with_inputs=True)
    lens = cache.lens.clone()
    K, N = 3, 8
    tree = TreeConfig(depth=3, top_k=K, total_nodes=N)
    proposal = propose_tree(draft, cache, root_hidden, tree)
    tokens, parents = proposal.tokens, proposal.parents
    assert proposal.draft_probs is None and tokens.shape == parents.shape == (3, N)
    assert torch.equal(cache.lens, lens)
    ids = torch.arange(1, N + 1)
    assert bool((parents >= 0).all()) and bool((parents < ids).all())  # parents precede children
    # Depths and ancestor masks from the candidates' paths equal those derived from the parents.
    derived = Tree.from_parents(tokens, parents)
    assert torch.equal(proposal.depths, derived.depths) and torch.equal(proposal.visible, derived.visible)
    assert int(proposal.depths.max()) <= proposal.max_depth == 3
    # Recompute every node from scratch with dense causal passes over its own path (committed
    # inputs, then the path's fc(token, parent's output)): each node is among the top-k children of
    # its parent, cumulative scores never grow along a path, siblings differ.
    with torch.no_grad():
        for b in range(3):
            hid, score, xs = {0: root_hidden[b]}, {0: 0.0}, {0: []}
            for i in range(1, N + 1):
                p = int(parents[b, i - 1])
                t = tokens[b, i - 1]
                logp = torch.log_softmax(draft.logits(hid[p]), -1)
                assert int(t) in logp.topk(K).indices.tolist()
                score[i] = score[p] + float(logp[t])
                assert score[i] <= score[p]
                x = draft.input_states(t.view(1, 1), hid[p].view(1, 1, H))[0]
                xs[i] = xs[p] + [x]
                hid[i] = _dense_last(draft, torch.cat([x_committed[b], *xs[i]]))
            sib = {}
            for i in range(1, N + 1):
                sib.setdefault(int(parents[b, i - 1]), []).append(int(tokens[b, i - 1]))
            assert all(len(s) == len(set(s)) for s in sib.values())
            # The best depth-1 child (the root's argmax) is always kept, first.
            assert int(tokens[b, 0]) == int(draft.logits(root_hidden[b]).argmax()) and int(parents[b, 0]) == 0


def test_chain_equals_tree_with_top_k_1():
    draft = _standalone(seed=3)
    cache, root_hidden = _committed(draft)
    chain = propose_chain(draft, cache, root_hidden, 4, SamplingConfig())
    tree = propose_tree(draft, cache, root_hidden, TreeConfig(depth=4, top_k=1, total_nodes=4))
    for field in ("tokens", "parents", "depths", "visible"):
        assert torch.equal(getattr(chain, field), getattr(tree, field)), field
    assert chain.parents[0].tolist() == [0, 1, 2, 3]


def test_sampled_chain_returns_its_distributions():
    draft = _standalone(seed=4)
    cache, root_hidden = _committed(draft)
    g = torch.Generator().manual_seed(0)
    chain = propose_chain(draft, cache, root_hidden, 3, SamplingConfig(1.0, 5, 1.0), torch.rand(3, 3, generator=g))
    tokens, q = chain.tokens, chain.draft_probs
    assert q.shape == (3, 3, V) and q.dtype == torch.float64  # float32 for float32/16 drafts
    torch.testing.assert_close(q.sum(-1), torch.ones(3, 3, dtype=q.dtype))
    assert bool(((q > 0).sum(-1) == 5).all())  # top-k masking
    assert bool((q.gather(-1, tokens[..., None]) > 0).all())


def test_logits_use_final_norm_only_for_pre_norm_features():
    d_post, d_pre = _standalone(after_norm=True), _standalone(after_norm=False)
    h = torch.randn(4, H, dtype=torch.float64)
    torch.testing.assert_close(d_post.logits(h), d_post._shared["lm_head"](h))
    torch.testing.assert_close(d_pre.logits(h), d_pre._shared["lm_head"](d_pre._shared["final_norm"](h)))


def test_shared_modules_are_not_parameters_and_training_path_has_grads():
    draft = _standalone()
    names = {n for n, _ in draft.named_parameters()}
    assert all(n.startswith(("fc.", "layer.")) for n in names)
    assert not any("embed" in n or "lm_head" in n for n in draft.state_dict())
    tokens = torch.randint(0, V, (2, 5))
    feats = torch.randn(2, 5, H, dtype=torch.float64)
    prefix = torch.randn(2, 3, H, dtype=torch.float64)
    out = draft.forward_sequence(tokens, feats, torch.arange(5).expand(2, 5), None, prefix)
    draft.logits(out).logsumexp(-1).sum().backward()
    assert draft.fc.weight.grad is not None and draft.layer.q_proj.weight.grad is not None
    assert draft._shared["embed"].weight.grad is None
    # An explicit mask equal to the default gives the same result.
    Lall = 8
    mask = torch.ones(Lall, Lall, dtype=torch.bool).tril()[None].expand(2, Lall, Lall)
    with torch.no_grad():
        a = draft.forward_sequence(tokens, feats, torch.arange(5).expand(2, 5), mask, prefix)
    torch.testing.assert_close(a, out.detach())


def test_config_json_and_validation(tmp_path):
    cfg = _standalone().config
    cfg.save(str(tmp_path))
    assert DraftConfig.load(str(tmp_path)) == cfg
    json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="visual_source"):
        DraftConfig(visual_source="pixels")
    with pytest.raises(ValueError, match="multiple"):
        DraftConfig(hidden_size=8, num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ValueError, match="unknown keys"):
        DraftConfig.from_dict({**cfg.to_dict(), "depth": 3})


# -- with a real (tiny) target ------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    from sparrow.targets import load_target
    from tiny_models import tiny_target

    model = tiny_target("qwen2_5_vl")
    return model, load_target(model)


def test_from_target_shapes(qwen):
    model, target = qwen
    draft = SparrowDraft.from_target(target)
    tc = target.text_config
    c = draft.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size)
    assert c.target == target.identity() and c.mid_layer == tc.num_hidden_layers // 2
    assert c.attention_bias and draft.layer.q_proj.bias is not None  # Qwen2-family layer
    assert draft.fc.weight.dtype == torch.float64
    assert draft._shared["lm_head"] is target.lm_head()


def test_save_load_round_trip_and_refusal(qwen, tmp_path):
    from sparrow.targets import FeatureSpec, load_target
    from tiny_models import tiny_target

    model, target = qwen
    draft = SparrowDraft.from_target(target, window=7)
    draft.save_pretrained(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = SparrowDraft.from_pretrained(str(tmp_path), target)
    assert loaded.config == draft.config
    for (n, a), (m, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    other = load_target(tiny_target("qwen2_vl"))
    with pytest.raises(ValueError, match="does not match this target"):
        SparrowDraft.from_pretrained(str(tmp_path), other)
    with pytest.raises(ValueError, match="FeatureSpec"):
        SparrowDraft.from_pretrained(str(tmp_path), load_target(model, FeatureSpec(layer=1, after_norm=False)))


@pytest.mark.parametrize("visual_source", ["none", "mid", "embed"])
def test_draft_cache_holds_no_visual_entry_under_vata(qwen, visual_source):
    """Structural VATA check: after prefill the draft's cache holds exactly the prompt's text
    tokens plus the root (visual_source "none"); the baselines add the visual entries."""
    from tiny_models import tiny_inputs

    model, target = qwen
    draft = SparrowDraft.from_target(target, visual_source=visual_source)
    inputs = tiny_inputs(model, batch=3, frames=[2, 6, 4], prompt_lens=[6, 9, 4])
    pre = target.prefill(inputs, want_visual_embeds=visual_source == "embed", want_visual_mid=visual_source == "mid")
    root = pre.logits.argmax(-1)
    cache, root_hidden = draft.prefill(pre, root)
    n_text = (pre.text_mask.bool() & ~pre.visual_mask.bool()).sum(1)
    n_vis = pre.visual_mask.bool().sum(1)
    assert int(n_vis.min()) > 0
    expect = n_text + 1 + (n_vis if visual_source != "none" else 0)
    assert cache.lens.tolist() == expect.tolist()
    assert root_hidden.shape == (3, draft.config.hidden_size)
    if visual_source == "none":
        # The same prompt with 3x more video gives the same cache length.
        big = tiny_inputs(model, batch=3, frames=[6, 18, 12], prompt_lens=[6, 9, 4])
        pre2 = target.prefill(big)
        cache2, _ = draft.prefill(pre2, pre2.logits.argmax(-1))
        assert int(pre2.visual_mask.sum()) > int(pre.visual_mask.sum())
        assert cache2.lens.tolist() == cache.lens.tolist()
        assert cache2.capacity == cache.capacity  # nor does its memory grow with the video
