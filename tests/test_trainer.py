"""The IVSB + MTP trainer: sequence masks and shapes, the MTP unroll feeding back the draft's own
features, the loss (in chunks of positions, against the whole-logits formula), float32 master
weights under a bfloat16 target's autocast, bit-exact resumption, the ablation switches, and a tiny
end-to-end run after which the trained draft is accepted more often than an untrained one."""

import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sparrow.train import trainer
from sparrow.train.trainer import TrainConfig, build_attention_mask, collate, compute_loss, shift_features

from test_train_data import make_inputs, tiny_adapter, tiny_records

H = 8


# -- masks, batches, the unroll (no target needed) -----------------------------------------------
def test_attention_mask_ivsb_and_padding():
    prefix_valid = torch.tensor([[False, True, True], [True, True, True]])
    m = build_attention_mask(prefix_valid, L=4)
    assert m.shape == (2, 7, 7)
    P = 3
    # Text queries see every valid prefix state (IVSB: visual prefix at training) ...
    assert m[0, P:, :P].tolist() == [[False, True, True]] * 4
    assert m[1, P:, :P].all()
    # ... and the causal text.
    assert torch.equal(m[:, P:, P:], torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(2, 4, 4))
    # Prefix queries never see text, and see only valid earlier prefix slots (or themselves).
    assert not m[:, :P, P:].any()
    assert m[0, :P, :P].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # No prefix: plain causal; a window keeps the last `window` earlier text positions.
    assert torch.equal(build_attention_mask(None, 3)[0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    w = build_attention_mask(prefix_valid, L=4, window=1)
    assert w[0, P + 3, P:].tolist() == [False, False, True, True] and w[0, P + 3, :P].tolist() == [False, True, True]


def _fake_sample(sid, n_vis, n_txt, prompt_len_text, seed):
    """A stored sample: visual block after 2 text tokens; the answer is the last text tokens."""
    g = torch.Generator().manual_seed(seed)
    S = n_vis + n_txt
    vis = torch.zeros(S, dtype=torch.bool)
    vis[2 : 2 + n_vis] = True
    txt = ~vis
    ids = torch.randint(3, 50, (S,), generator=g)
    ids[vis] = 99
    return {
        "id": sid,
        "input_ids": ids,
        "visual_mask": vis,
        "text_mask": txt,
        "prompt_len": S - (n_txt - prompt_len_text),
        "features": torch.randn(n_txt, H, generator=g, dtype=torch.float64),
        "visual_mid": torch.randn(n_vis, H, generator=g, dtype=torch.float64),
    }


def test_collate_shapes_and_padding():
    a = _fake_sample("a", n_vis=3, n_txt=6, prompt_len_text=4, seed=0)
    b = _fake_sample("b", n_vis=5, n_txt=4, prompt_len_text=2, seed=1)
    batch = collate([a, b], "visual_mid", "answer", 0, "cpu", torch.float64)
    assert batch.token_ids.shape == (2, 6) and batch.features.shape == (2, 6, H)
    assert batch.prefix.shape == (2, 5, H) and batch.attention_mask.shape == (2, 11, 11)
    assert batch.valid.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    assert batch.loss_mask.tolist() == [[False] * 4 + [True] * 2, [False, False, True, True, False, False]]
    assert torch.equal(batch.token_ids[0], a["input_ids"][a["text_mask"]])
    # Prefix left-padded: the real states sit next to the text.
    assert batch.prefix_valid.tolist() == [[False, False, True, True, True], [True] * 5]
    assert torch.equal(batch.prefix[0, 2:], a["visual_mid"])
    none = collate([a, b], None, "all", 0, "cpu", torch.float64)
    assert none.prefix is None and none.attention_mask.shape == (2, 6, 6)
    assert none.loss_mask.tolist() == none.valid.tolist()


class StandInDraft(nn.Module):
    """A draft with the SparrowDraft training interface: fc(e ⊕ prev) then causal mean mixing
    (prefix included); logits through a frozen head. Records every forward_sequence call."""

    def __init__(self, vocab=60):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(vocab, H, generator=g, dtype=torch.float64)
        self.head = torch.randn(vocab, H, generator=g, dtype=torch.float64)
        self.fc = nn.Linear(2 * H, H, dtype=torch.float64)
        self.calls = []

    def forward_sequence(self, token_ids, prev_features, position_ids, attention_mask=None, prefix_states=None):
        x = self.fc(torch.cat([self.embed[token_ids], prev_features], -1))
        P = 0
        if prefix_states is not None:
            P = prefix_states.shape[1]
            x = torch.cat([prefix_states, x], 1)
        allowed = attention_mask.to(x.dtype)
        out = (allowed @ x) / allowed.sum(-1, keepdim=True)
        out = torch.tanh(out[:, P:])
        self.calls.append({"prev": prev_features.detach().clone(), "out": out.detach().clone(),
                           "prefix": prefix_states})
        return out

    def logits(self, hidden):
        return hidden @ self.head.T


def test_mtp_unroll_feeds_back_the_drafts_own_features():
    samples = [_fake_sample("a", 3, 7, 3, 0), _fake_sample("b", 2, 5, 2, 1)]
    batch = collate(samples, "visual_mid", "all", 0, "cpu", torch.float64)
    draft = StandInDraft()
    cfg = TrainConfig(unroll=3, feature_noise=0.0)
    loss, metrics = compute_loss(draft, batch, cfg)
    assert len(draft.calls) == 3 and set(metrics) >= {"acc0", "acc1", "acc2", "loss"}
    valid = batch.valid[..., None]
    # Pass 0 reads the target's features, shifted by one text position.
    assert torch.equal(draft.calls[0]["prev"], shift_features(batch.features))
    for j in (1, 2):
        prev = draft.calls[j]["prev"]
        # Pass j reads pass j-1's outputs: prev[:, t] = ĥ_{t-1}, zeros at t = 0 and on padding.
        assert torch.equal(prev, shift_features(draft.calls[j - 1]["out"]) * valid)
        assert not torch.allclose(prev, shift_features(batch.features))
        assert draft.calls[j]["prefix"] is batch.prefix  # the visual anchor stays the target's
    # Gradients flow through the unroll (mtp_detach=False): the pass-2 loss alone reaches fc via
    # pass 0 and pass 1 too.
    loss.backward()
    assert draft.fc.weight.grad is not None and draft.fc.weight.grad.abs().sum() > 0


def test_loss_formula_single_pass():
    samples = [_fake_sample("a", 3, 7, 3, 0)]
    batch = collate(samples, None, "answer", 0, "cpu", torch.float64)
    draft = StandInDraft()
    cfg = TrainConfig(unroll=1, feature_noise=0.0, feature_weight=1.0, token_weight=0.1)
    loss, _ = compute_loss(draft, batch, cfg)
    out = draft.calls[0]["out"]
    m = batch.loss_mask[0]
    h = batch.features
    feat = nn.functional.smooth_l1_loss(out[0, m], h[0, m], reduction="none").mean(-1).mean()
    p = torch.softmax(draft.logits(h[0, m]), -1)
    tok = -(p * torch.log_softmax(draft.logits(out[0, m]), -1)).sum(-1).mean()
    assert torch.allclose(loss, feat + 0.1 * tok, atol=1e-12)
    # MTP weights 1, 0.8, 0.64, normalised: a 3-pass loss is the weighted mean of the passes.
    cfg3 = TrainConfig(unroll=3, feature_noise=0.0)
    draft.calls.clear()
    loss3, _ = compute_loss(draft, batch, cfg3)
    per = []
    for c in draft.calls:
        o = c["out"][0, m]
        f = nn.functional.smooth_l1_loss(o, h[0, m], reduction="none").mean(-1).mean()
        t = -(p * torch.log_softmax(draft.logits(o), -1)).sum(-1).mean()
        per.append(f + 0.1 * t)
    assert torch.allclose(loss3, (per[0] + 0.8 * per[1] + 0.64 * per[2]) / 2.44, atol=1e-12)


def test_feature_noise_is_uniform_on_pass_zero_only():
    samples = [_fake_sample("a", 3, 40, 3, 0)]
    batch = collate(samples, None, "all", 0, "cpu", torch.float64)
    draft = StandInDraft()
    compute_loss(draft, batch, TrainConfig(unroll=2, feature_noise=0.1), torch.Generator().manual_seed(0))
    noise = draft.calls[0]["prev"] - shift_features(batch.features)
    assert noise.abs().max() <= 0.1 and noise.abs().max() > 0.05 and noise.std() > 0.04
    assert torch.equal(draft.calls[1]["prev"], shift_features(draft.calls[0]["out"]))  # no noise on ĥ


def test_lr_schedule():
    f = trainer.lr_lambda(TrainConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=14)
    assert [round(f(s), 6) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and abs(f(9) - 0.55) < 1e-9 and abs(f(14) - 0.1) < 1e-12
    lin = trainer.lr_lambda(TrainConfig(schedule="linear"), total_steps=10)
    assert lin(5) == 0.5


# -- with a tiny target and the real draft -----------------------------------------------------
@pytest.fixture(scope="module")
def target():
    return tiny_adapter()


@pytest.fixture(scope="module")
def data_dir(target, tmp_path_factory):
    from sparrow.train import datagen

    out = str(tmp_path_factory.mktemp("data"))
    datagen.generate_data(target, tiny_records(6), make_inputs, out, max_new_tokens=6, mid_pool=8,
                          store_embeds=True, progress=False)
    return out


def _draft(target, **kw):
    from sparrow.draft import SparrowDraft

    torch.manual_seed(0)
    return SparrowDraft.from_target(target, **kw)


def test_batched_forward_equals_single_rows(target, data_dir):
    """The padded batch's masks reproduce each row run alone with the draft's default masks."""
    from sparrow.train.shards import ShardDataset

    ds = ShardDataset(data_dir)
    samples = [ds[i] for i in range(3)]
    draft = _draft(target)
    for key in ("visual_mid", None):
        batch = collate(samples, key, "all", 0, "cpu", torch.float64)
        out = draft.forward_sequence(batch.token_ids, shift_features(batch.features), batch.position_ids,
                                     batch.attention_mask, batch.prefix)
        for b, s in enumerate(samples):
            one = collate([s], key, "all", 0, "cpu", torch.float64)
            ref = draft.forward_sequence(one.token_ids, shift_features(one.features), one.position_ids, None, one.prefix)
            T = int(one.valid.sum())
            torch.testing.assert_close(out[b, :T], ref[0], atol=1e-10, rtol=0)


def test_vata_cache_holds_no_visual_entry_at_inference(target):
    """visual_source "none": the draft's cache after prefill holds the text positions only (while
    training gives text queries the visual prefix, test_attention_mask_ivsb_and_padding); "mid"
    keeps the visual states in front."""
    inputs = make_inputs({"frames": torch.zeros(4, 1), "seed": 3, "plen": 5}, target.model)
    pre = target.prefill(inputs, want_visual_mid=True)
    root = pre.logits.argmax(-1)
    n_text, n_vis = int(pre.text_mask.sum()), int(pre.visual_mask.sum())
    cache, _ = _draft(target, visual_source="none").prefill(pre, root)
    assert int(cache.lens[0]) == n_text + 1
    cache, _ = _draft(target, visual_source="mid").prefill(pre, root)
    assert int(cache.lens[0]) == n_vis + n_text + 1


def _spy(draft):
    calls = []
    orig = draft.forward_sequence

    def spy(token_ids, prev_features, position_ids, attention_mask=None, prefix_states=None):
        out = orig(token_ids, prev_features, position_ids, attention_mask, prefix_states)
        calls.append({"prev": prev_features.detach().clone(), "out": out.detach().clone(), "prefix": prefix_states})
        return out

    draft.forward_sequence = spy
    return calls


def test_real_draft_unroll_reads_its_own_features(target, data_dir):
    from sparrow.train.shards import ShardDataset

    ds = ShardDataset(data_dir)
    batch = collate([ds[0], ds[1]], "visual_mid", "answer", 0, "cpu", torch.float64)
    draft = _draft(target)
    calls = _spy(draft)
    compute_loss(draft, batch, TrainConfig(unroll=3, feature_noise=0.0))
    assert len(calls) == 3
    assert torch.equal(calls[0]["prev"], shift_features(batch.features))
    assert torch.equal(calls[1]["prev"], shift_features(calls[0]["out"]) * batch.valid[..., None])
    assert torch.equal(calls[2]["prev"], shift_features(calls[1]["out"]) * batch.valid[..., None])
    assert not torch.allclose(calls[1]["prev"], calls[0]["prev"])


# -- the token loss in chunks -------------------------------------------------------------------
def _whole_logits_loss(draft, batch, cfg):
    """The loss written out plainly: [B, T, V] logits of every pass kept, masked means over T."""
    h = batch.features
    m = batch.loss_mask.to(h.dtype)
    denom = m.sum()
    p = torch.softmax(draft.logits(h), -1)
    prev, total, accs = shift_features(h), 0.0, []
    for j in range(cfg.unroll):
        out = draft.forward_sequence(batch.token_ids, prev, batch.position_ids, batch.attention_mask, batch.prefix)
        feat = (nn.functional.smooth_l1_loss(out, h, reduction="none").mean(-1) * m).sum() / denom
        logq = torch.log_softmax(draft.logits(out), -1)
        tok = (-(p * logq).sum(-1) * m).sum() / denom
        total = total + cfg.mtp_decay**j * (cfg.feature_weight * feat + cfg.token_weight * tok)
        accs.append(float(((logq.argmax(-1) == p.argmax(-1)).to(h.dtype) * m).sum() / denom))
        prev = shift_features(out) * batch.valid[..., None]
    return total / sum(cfg.mtp_decay**j for j in range(cfg.unroll)), accs


def _loss_and_grads(draft, loss):
    params = [p for p in draft.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.fixture(scope="module")
def loss_batch(data_dir):
    from sparrow.train.shards import ShardDataset

    ds = ShardDataset(data_dir)
    batch = collate([ds[0], ds[1], ds[2]], "visual_mid", "answer", 0, "cpu", torch.float64)
    assert 4 < int(batch.loss_mask.sum()) < batch.loss_mask.numel()  # some positions out of the loss
    return batch


@pytest.mark.parametrize("after_norm", [True, False])  # False: logits through the target's final norm
def test_chunked_token_loss_equals_the_whole_logits_formula(target, loss_batch, after_norm):
    draft = _draft(target, feature_after_norm=after_norm)
    cfg = TrainConfig(unroll=3, feature_noise=0.0)
    loss, metrics = compute_loss(draft, loss_batch, cfg, chunk=3)
    ref, ref_accs = _whole_logits_loss(draft, loss_batch, cfg)
    (a, ga), (b, gb) = _loss_and_grads(draft, loss), _loss_and_grads(draft, ref)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
    assert [metrics[f"acc{j}"] for j in range(3)] == pytest.approx(ref_accs, abs=1e-12)


def test_token_loss_does_not_depend_on_the_chunk_size(target, loss_batch):
    draft = _draft(target)
    cfg = TrainConfig(unroll=2, feature_noise=0.0)
    n = int(loss_batch.loss_mask.sum())
    runs = [(chunk, *_loss_and_grads(draft, compute_loss(draft, loss_batch, cfg, chunk=chunk)[0]))
            for chunk in (1, 2, n - 1, n, 4 * n)]
    _, loss0, grads0 = runs[0]
    for chunk, loss, grads in runs[1:]:
        torch.testing.assert_close(loss, loss0, atol=1e-13, rtol=1e-13, msg=f"chunk {chunk}")
        for x, y in zip(grads, grads0):
            torch.testing.assert_close(x, y, atol=1e-13, rtol=1e-11, msg=f"chunk {chunk}")


class _LargestLogits(TorchDispatchMode):
    """Records the most rows (numel / V) of any new tensor with a last dim V that an op returns
    (views of its inputs, such as lm_head.weight.t() [H, V], are not new memory)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_training_holds_one_chunk_of_logits_at_a_time(target, loss_batch):
    """No [T, V] logits anywhere in forward or backward (checkpoint recompute included), and none
    saved for backward by the loss's graph itself."""
    draft = _draft(target)
    V = draft.config.vocab_size
    cfg = TrainConfig(unroll=3, feature_noise=0.0)
    saved = []
    with _LargestLogits(V) as seen:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss, _ = compute_loss(draft, loss_batch, cfg, chunk=2)
        loss.backward()
    assert 0 < seen.rows <= 2
    assert saved and not [s for s in saved if s and s[-1] == V]
    with _LargestLogits(V) as whole:  # the whole-logits formula: every text position of the batch
        _whole_logits_loss(draft, loss_batch, cfg)[0].backward()
    assert whole.rows == loss_batch.token_ids.numel()


# -- precision: float32 master weights under a bfloat16 target's autocast ----------------------
def test_training_precision_default_and_override():
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    assert trainer.training_precision(bf16) == (f32, bf16) and trainer.training_precision(f16) == (f32, f16)
    assert trainer.training_precision(f32) == (f32, None) and trainer.training_precision(f64) == (f64, None)
    assert trainer.training_precision(bf16, draft_dtype=bf16) == (bf16, None)  # the recipe of before


def test_bf16_target_trains_float32_master_weights_under_autocast(data_dir, tmp_path, monkeypatch):
    from sparrow.draft import SparrowDraft

    target = tiny_adapter(dtype=torch.bfloat16)
    seen = []
    orig = SparrowDraft.forward_sequence

    def spy(self, *args, **kw):
        out = orig(self, *args, **kw)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out

    monkeypatch.setattr(SparrowDraft, "forward_sequence", spy)
    # One Adam step moves each weight by about lr: 1e-4, far below bf16's spacing at 1.0 (2^-8..2^-7).
    cfg = TrainConfig(max_steps=1, unroll=2, lr=1e-4)
    s = trainer.train(target, data_dir, str(tmp_path / "amp"), cfg, progress=False)
    assert s["precision"] == {"weights": "float32", "autocast": "bfloat16"}
    assert seen == [(True, torch.bfloat16, torch.bfloat16)] * 2
    draft = s["draft"]
    assert {p.dtype for p in draft.parameters()} == {torch.float32}
    for w in (target.embed_tokens().weight, target.lm_head().weight):
        assert w.dtype == torch.bfloat16 and not w.requires_grad
    norm = draft.layer.input_layernorm.weight
    assert 0 < (norm - 1).abs().max() < 3e-4  # the float32 master weights keep the small update
    # The saved draft loads for inference in the target's dtype, as before.
    loaded = SparrowDraft.from_pretrained(str(tmp_path / "amp"), target)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.fc.weight, draft.fc.weight.to(torch.bfloat16))
    # The old recipe (bf16 weights, no autocast) loses that update altogether.
    seen.clear()
    old = trainer.train(target, data_dir, str(tmp_path / "bf16"), cfg, draft_dtype=torch.bfloat16, progress=False)
    assert old["precision"] == {"weights": "bfloat16", "autocast": None} and seen[0][0] is False
    assert torch.equal(old["draft"].layer.input_layernorm.weight, torch.ones_like(norm, dtype=torch.bfloat16))
    # A run is resumed in the precision it trained with.
    part = trainer.train(target, data_dir, str(tmp_path / "part"), TrainConfig(max_steps=2, unroll=1),
                         stop_after=1, progress=False)
    assert not part["finished"]
    with pytest.raises(ValueError, match="the checkpoint trained with"):
        trainer.train(target, data_dir, str(tmp_path / "part"), TrainConfig(max_steps=2, unroll=1), resume=True,
                      draft_dtype=torch.bfloat16, progress=False)


# A step whose float16 gradients overflow is skipped by the scaler (the first one here, at its
# initial scale), so the scheduler steps past an optimizer step that did not happen: expected.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_float16_target_trains_under_autocast_with_a_grad_scaler(data_dir, tmp_path):
    target = tiny_adapter(dtype=torch.float16)
    s = trainer.train(target, data_dir, str(tmp_path), TrainConfig(max_steps=2, unroll=2), progress=False)
    assert s["precision"] == {"weights": "float32", "autocast": "float16"}
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in s["draft"].parameters())
    state = torch.load(tmp_path / trainer.STATE_NAME, weights_only=False)
    assert state["scaler"]["scale"] > 0  # checkpointed, so a resumed run scales as the uninterrupted one


@pytest.mark.parametrize(
    "visual_source,ivsb,prefix",
    [("none", True, "visual_mid"), ("none", False, None), ("mid", False, "visual_mid"), ("embed", True, "visual_embeds")],
)
def test_ablation_switches_choose_the_prefix(target, data_dir, tmp_path, monkeypatch, visual_source, ivsb, prefix):
    from sparrow.draft import SparrowDraft
    from sparrow.train.shards import ShardDataset

    seen = []
    orig = SparrowDraft.forward_sequence

    def spy(self, token_ids, prev_features, position_ids, attention_mask=None, prefix_states=None):
        seen.append(prefix_states)
        return orig(self, token_ids, prev_features, position_ids, attention_mask, prefix_states)

    monkeypatch.setattr(SparrowDraft, "forward_sequence", spy)
    cfg = TrainConfig(max_steps=1, unroll=2, ivsb=ivsb, lr=1e-3)
    s = trainer.train(target, data_dir, str(tmp_path), cfg, draft_overrides={"visual_source": visual_source}, progress=False)
    assert s["prefix"] == prefix and len(seen) == 2
    if prefix is None:
        assert all(p is None for p in seen)
    else:
        ds = ShardDataset(data_dir)
        sizes = {ds[i][prefix].shape[0] for i in range(len(ds))}
        assert seen[0] is not None and seen[0].shape[1] in sizes
    loaded = SparrowDraft.from_pretrained(str(tmp_path), target)
    assert loaded.config.visual_source == visual_source


def _state(draft):
    return {k: v.clone() for k, v in draft.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resume_is_bit_exact(dtype, target, data_dir, tmp_path):
    # bfloat16: float32 master weights under autocast; a checkpoint must give them back unrounded.
    target = target if dtype == torch.float64 else tiny_adapter(dtype=dtype)
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=2, unroll=2, seed=5,
                      keep_checkpoints=0)
    full = trainer.train(target, data_dir, str(tmp_path / "full"), cfg, progress=False)
    assert full["finished"] and full["steps"] == 6
    # The same run, killed after 3 steps (a checkpoint at step 2, another written on the way out),
    # resumed once from the newest checkpoint.
    part = trainer.train(target, data_dir, str(tmp_path / "part"), cfg, stop_after=3, progress=False)
    assert not part["finished"] and part["steps"] == 3
    assert trainer.latest_checkpoint(str(tmp_path / "part")).endswith("step-0000003")
    assert not os.path.exists(tmp_path / "part" / "model.safetensors")
    res = trainer.train(target, data_dir, str(tmp_path / "part"), cfg, resume=True, progress=False)
    assert res["finished"] and res["steps"] == 6
    a, b = _state(full["draft"]), _state(res["draft"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full["history"][3:]] == [h["loss"] for h in res["history"]]
    # Resuming from an earlier checkpoint gives the same again; other settings are refused.
    res2 = trainer.train(target, data_dir, str(tmp_path / "part"), cfg,
                         resume=str(tmp_path / "part" / "checkpoints" / "step-0000002"), progress=False)
    assert all(torch.equal(a[k], v) for k, v in _state(res2["draft"]).items())
    moments = torch.load(tmp_path / "part" / "checkpoints" / "step-0000002" / trainer.STATE_NAME,
                         weights_only=False)["optimizer"]["state"]
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert {m[k].dtype for m in moments.values() for k in ("exp_avg", "exp_avg_sq")} == {want}
    with pytest.raises(ValueError, match="lr"):
        trainer.train(target, data_dir, str(tmp_path / "part"), TrainConfig(**{**cfg.to_dict(), "lr": 1e-3}),
                      resume=True, progress=False)


def test_training_refuses_data_of_another_target(target, data_dir, tmp_path):
    from sparrow.train.shards import DataError

    with pytest.raises(DataError, match="generated by target"):
        trainer.train(tiny_adapter("qwen2_vl"), data_dir, str(tmp_path), TrainConfig(max_steps=1), progress=False)


@pytest.mark.slow
def test_end_to_end_trained_draft_is_accepted_more(target, tmp_path):
    """gen-data -> train -> sparrow.generate: the trained draft's tokens are accepted more often
    than an untrained draft's, on prompts it was trained on and on prompts it never saw, and the
    output stays the target's."""
    from sparrow.train import datagen, evaluate

    data = str(tmp_path / "data")
    datagen.generate_data(target, tiny_records(16), make_inputs, data, max_new_tokens=12, progress=False)
    cfg = TrainConfig(epochs=20, batch_size=4, lr=3e-3, warmup_steps=5, loss_on="all", unroll=2)
    # The tiny target's initializer_range (0.2) would be the draft's too; real targets use 0.02.
    res = trainer.train(target, data, str(tmp_path / "draft"), cfg, draft_overrides={"initializer_range": 0.02},
                        progress=False)
    assert res["last"]["acc0"] > 0.2
    trained = res["draft"].eval()
    untrained = _draft(target, initializer_range=0.02)
    drafts = {"untrained": untrained, "trained": trained}
    seen = evaluate.evaluate(target, tiny_records(4), make_inputs, drafts, max_new_tokens=10, chain=3, warmup=0,
                             out=str(tmp_path / "eval"), progress=False)["overall"]
    new = evaluate.evaluate(target, tiny_records(4, start=500), make_inputs, drafts, max_new_tokens=10, chain=3,
                            warmup=0, progress=False)["overall"]
    for figs in (seen, new):
        assert figs["trained"]["lossless"] == 1.0 and figs["untrained"]["lossless"] == 1.0
    assert seen["trained"]["accepted_per_step"] > seen["untrained"]["accepted_per_step"] + 0.3, seen
    assert new["trained"]["accepted_per_step"] > new["untrained"]["accepted_per_step"], new
    # Two visual lengths among the records: the overall table and one per group.
    assert (tmp_path / "eval.md").read_text().count("| trained |") == 3
    print({name: {m: round(f["accepted_per_step"], 3) for m, f in figs.items()} for name, figs in (("seen", seen), ("new", new))})
