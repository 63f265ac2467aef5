"""The draft/verify loop end to end on tiny float64 models of every family.

Greedy output must equal the target's own `generate(do_sample=False)` token for token, whatever
the draft proposes: random drafts (almost every proposal rejected) and wide trees (every step
accepts at least one node, so commit paths with k >= 1 and ragged pending blocks run). Sampled
output must follow the target's distribution (chi-square against the exact distribution).
"""

from __future__ import annotations

import functools

import pytest
import torch

import sparrow
from sparrow.draft import SparrowDraft
from sparrow.drafting import TreeConfig
from sparrow.generation import SpeculativeGenerator, generate
from sparrow.targets import load_target
from tiny_models import FAMILIES, PAD_ID, TEXT_HI, TEXT_LO, VOCAB, take_row, tiny_inputs, tiny_target

from oracle_draft import OracleDraft, route_proposals  # noqa: F401 (OracleDraft: test_positions imports it here)

N_NEW = 12
SMALL_TREE = TreeConfig(depth=3, top_k=3, total_nodes=8)
# Every token is a depth-1 child, so the target's choice is always among them: 1 accepted per step.
WIDE_TREE = TreeConfig(depth=1, top_k=VOCAB, total_nodes=VOCAB)
ORACLE_TREE = TreeConfig(depth=4, top_k=2, total_nodes=8)


@pytest.fixture(autouse=True)
def oracle_proposals(monkeypatch):
    route_proposals(monkeypatch)


def _oracle(family: str, inputs: dict, n: int, eos=None, seed=0) -> OracleDraft:
    model, target, _ = _setup(family)
    draft = OracleDraft.from_target(target)
    draft.refs = {b: _reference(model, inputs, b, n, eos) for b in range(inputs["input_ids"].shape[0])}
    draft.rng = torch.Generator().manual_seed(seed)
    return draft


@functools.lru_cache(maxsize=None)
def _model(family: str, eos: int | None = None):
    return tiny_target(family, eos_token_id=eos)


@functools.lru_cache(maxsize=None)
def _setup(family: str):
    model = _model(family)
    target = load_target(model, positions="generate")  # the reference is HF generate (rules differ from 4 frames on)
    draft = SparrowDraft.from_target(target)
    return model, target, draft


def _batch(family: str, batch: int, seed: int = 0):
    model = _model(family)
    if family == "llava_onevision":
        return tiny_inputs(model, batch=batch, prompt_lens=[6, 9, 4, 7][:batch], seed=seed)
    return tiny_inputs(model, batch=batch, frames=[2, 4, 6, 2][:batch], prompt_lens=[6, 9, 4, 7][:batch], seed=seed)


def _reference(model, inputs: dict, b: int, n: int, eos=None) -> list[int]:
    row = take_row(inputs, b)
    kw = dict(do_sample=False, max_new_tokens=n, pad_token_id=PAD_ID)
    if eos is not None:
        kw["eos_token_id"] = eos
    out = model.generate(**row, **kw)
    return out[0, row["input_ids"].shape[1] :].tolist()


# -- greedy losslessness -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["chain", "tree"])
def test_greedy_batch1_matches_hf(family, how):
    model, target, draft = _setup(family)
    inputs = _batch(family, 1)
    kw = dict(chain=3) if how == "chain" else dict(tree=SMALL_TREE)
    out = generate(target, draft, inputs, N_NEW, **kw)
    assert out.tokens[0] == _reference(model, inputs, 0, N_NEW)
    s = out.stats
    assert s.steps >= 1 and s.tokens_per_step == pytest.approx(s.accepted_per_step + 1)
    assert sum(s.accept_histogram) == s.row_steps
    assert s.new_tokens == N_NEW and s.total_s > 0 and s.tokens_per_s > 0
    assert s.prefill_s > 0 and s.total_s == pytest.approx(s.prefill_s + s.decode_s)  # the clock starts before prefill


@pytest.mark.parametrize(
    "family,kind",
    [(f, k) for f in FAMILIES for k in ("random", "oracle")] + [("qwen2_5_vl", "wide")],
)
def test_greedy_batch4_rows_match_their_own_hf(family, kind):
    model, target, draft = _setup(family)
    inputs = _batch(family, 4)
    tree = {"random": SMALL_TREE, "wide": WIDE_TREE, "oracle": ORACLE_TREE}[kind]
    if kind == "oracle":
        draft = _oracle(family, inputs, N_NEW)
    out = generate(target, draft, inputs, N_NEW, tree=tree)
    for b in range(4):
        assert out.tokens[b] == _reference(model, inputs, b, N_NEW), f"row {b}"
    hist = out.stats.accept_histogram
    if kind == "wide":
        assert hist[0] == 0 and out.stats.accepted_per_step == 1.0  # every step accepted one node
    if kind == "oracle":
        assert sum(1 for h in hist[2:] if h) >= 2  # several different multi-token acceptances


def test_greedy_batch4_chain_oracle():
    family = "qwen2_5_vl"
    model, target, draft = _setup(family)
    inputs = _batch(family, 4, seed=1)
    draft = _oracle(family, inputs, N_NEW, seed=1)
    out = generate(target, draft, inputs, N_NEW, chain=4)
    for b in range(4):
        assert out.tokens[b] == _reference(model, inputs, b, N_NEW), f"row {b}"


def test_eos_in_the_middle_of_a_batch():
    family = "qwen2_vl"
    model, target, draft = _setup(family)
    inputs = _batch(family, 4, seed=2)
    free = _reference(model, inputs, 1, N_NEW)
    # An eos id that row 1 emits mid-way (first occurrence at index >= 2).
    pos = next(i for i in range(2, N_NEW) if free[i] not in free[:i])
    eos = free[pos]
    for tree in (SMALL_TREE, ORACLE_TREE):
        if tree is ORACLE_TREE:
            draft = _oracle(family, inputs, N_NEW, eos=eos, seed=3)
        out = generate(target, draft, inputs, N_NEW, tree=tree, eos_token_id=eos)
        assert out.tokens[1] == free[: pos + 1]
        for b in range(4):
            assert out.tokens[b] == _reference(model, inputs, b, N_NEW, eos=eos), f"row {b}"


@pytest.mark.parametrize("n", [1, 2, 5])
def test_max_new_tokens_reached_mid_step(n):
    family = "llava_onevision"
    model, target, draft = _setup(family)
    inputs = _batch(family, 3)
    # The oracle accepts up to 4 nodes per step (up to 5 tokens per step): limits fall mid-step.
    draft = _oracle(family, inputs, n + 5, seed=n)
    out = generate(target, draft, inputs, n, tree=ORACLE_TREE)
    for b in range(3):
        assert out.tokens[b] == _reference(model, inputs, b, n)
        assert len(out.tokens[b]) == n
    assert out.padded().shape == (3, n)


# -- baselines through the same call ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_autoregressive_baseline(family):
    model, target, _ = _setup(family)
    inputs = _batch(family, 2)
    for out in (generate(target, None, inputs, 8), generate(target, _setup(family)[2], inputs, 8, mode="autoregressive")):
        assert out.stats.mode == "autoregressive" and out.stats.accepted_per_step == 0.0
        assert out.stats.accept_histogram == [out.stats.row_steps]
        for b in range(2):
            assert out.tokens[b] == _reference(model, inputs, b, 8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("visual_source", ["embed", "mid"])
def test_msd_and_no_vata_baselines_lossless(family, visual_source):
    model, target, _ = _setup(family)
    draft = SparrowDraft.from_target(target, visual_source=visual_source)
    inputs = _batch(family, 2)
    for kw in (dict(chain=2), dict(tree=SMALL_TREE)):
        out = generate(target, draft, inputs, 8, **kw)
        for b in range(2):
            assert out.tokens[b] == _reference(model, inputs, b, 8), (kw, b)


def test_object_form_keeps_models_and_defaults():
    family = "qwen2_5_vl"
    model, target, draft = _setup(family)
    gen = SpeculativeGenerator(target, draft, tree=SMALL_TREE)
    inputs = _batch(family, 1)
    a = gen.generate(inputs, 4)
    b = gen(inputs, 4, chain=2)  # an override replaces the default tree
    assert a.stats.mode == "sparrow-tree" and b.stats.mode == "sparrow-chain"
    assert a.tokens == b.tokens == [_reference(model, inputs, 0, 4)]
    # sparrow.generate is the function, and a bare HF model is wrapped by load_target.
    c = sparrow.generate(model, draft, inputs, 4, chain=2)
    assert c.tokens == a.tokens
    with pytest.raises(TypeError, match="unknown settings"):
        SpeculativeGenerator(target, draft, depth=3)


# -- sampling follows the target's distribution ---------------------------------------------------------
def _exact_second_token_dist(model, target, inputs, temperature, top_k) -> torch.Tensor:
    """p(t2) = sum_t1 p(t1) p(t2 | prompt, t1) under the same temperature / top-k, from plain HF
    forwards (no cache, no sparrow code)."""
    from sparrow.sampling import SamplingConfig, probs

    cfg = SamplingConfig(temperature, top_k, 1.0)
    row = take_row(inputs, 0)
    with torch.no_grad():
        p1 = probs(model(**row).logits[0, -1], cfg)
        out = torch.zeros_like(p1)
        for t1 in p1.nonzero().flatten().tolist():
            ext = dict(row)
            ext["input_ids"] = torch.cat([row["input_ids"], torch.tensor([[t1]])], 1)
            ext["attention_mask"] = torch.ones_like(ext["input_ids"])
            if "mm_token_type_ids" in row:
                ext["mm_token_type_ids"] = torch.cat([row["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
            out += p1[t1] * probs(model(**ext).logits[0, -1], cfg)
    return out


def _chi_square_pvalue(counts: torch.Tensor, p: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = int(counts.sum())
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if float(exp[-1]) < 5:  # fold the small bucket into the last big cell
        obs = torch.cat([obs[:-2], (obs[-2] + obs[-1])[None]])
        exp = torch.cat([exp[:-2], (exp[-2] + exp[-1])[None]])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("how", ["chain", "tree"])
def test_sampled_tokens_follow_the_target(how):
    family = "qwen2_5_vl"
    model, target, draft = _setup(family)
    R, temperature, top_k = 600, 1.0, 6
    one = _batch(family, 1)
    inputs = {k: (v.repeat(R, *([1] * (v.dim() - 1))) if k not in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") else v) for k, v in one.items()}
    inputs["pixel_values_videos"] = one["pixel_values_videos"].repeat(R, 1)
    inputs["video_grid_thw"] = one["video_grid_thw"].repeat(R, 1)
    inputs["second_per_grid_ts"] = one["second_per_grid_ts"].repeat(R)
    # chain: sampled draft tokens + draft_probs (mostly rejected: residual path); tree: deterministic
    # children covering the target's whole top-k support at depth 1 (acceptance path).
    kw = dict(chain=2) if how == "chain" else dict(tree=TreeConfig(depth=1, top_k=VOCAB, total_nodes=VOCAB))
    out = generate(target, draft, inputs, 2, temperature=temperature, top_k=top_k, seed=123, **kw)
    second = torch.tensor([t[1] for t in out.tokens])
    counts = torch.bincount(second, minlength=VOCAB)
    p = _exact_second_token_dist(model, target, one, temperature, top_k)
    assert int(counts[p == 0].sum()) == 0  # nothing outside the support
    assert _chi_square_pvalue(counts, p) > 1e-3
    # Same seed, same result.
    a = generate(target, draft, one, 4, temperature=temperature, top_k=top_k, seed=7, **kw)
    b = generate(target, draft, one, 4, temperature=temperature, top_k=top_k, seed=7, **kw)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("how", ["chain", "tree"])
def test_a_rows_sampled_tokens_do_not_depend_on_its_batch(how):
    """Uniforms are drawn on the device per request row: row b of a batch of 4 (its own seed)
    gets the tokens it gets alone with that seed, whoever shares its batch and whenever they stop."""
    family = "qwen2_vl"
    model, target, draft = _setup(family)
    inputs = _batch(family, 4, seed=4)
    kw = dict(chain=3) if how == "chain" else dict(tree=SMALL_TREE)
    seeds = [11, 12, 13, 14]
    together = generate(target, draft, inputs, N_NEW, temperature=1.0, top_k=20, seed=seeds, **kw)
    for b in range(4):
        alone = generate(target, draft, take_row(inputs, b), N_NEW, temperature=1.0, top_k=20, seed=[seeds[b]], **kw)
        assert alone.tokens[0] == together.tokens[b], f"row {b}"
    assert len({tuple(t) for t in together.tokens}) == 4  # the rows really are sampled apart
    with pytest.raises(ValueError, match="one seed per row"):
        generate(target, draft, inputs, 2, temperature=1.0, seed=[1, 2], **kw)


# -- clear errors -----------------------------------------------------------------------------------
def test_errors():
    family = "qwen2_5_vl"
    model, target, draft = _setup(family)
    inputs = _batch(family, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(target, draft, inputs, 0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(target, draft, {"input_ids": torch.zeros(1, 0, dtype=torch.long), "attention_mask": torch.zeros(1, 0, dtype=torch.long)}, 4)
    bad = dict(inputs)
    bad["attention_mask"] = inputs["attention_mask"].clone()
    bad["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"empty prompt: rows \[1\]"):
        generate(target, draft, bad, 4)
    novis = {k: v for k, v in inputs.items() if k not in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    with pytest.raises(ValueError, match="no pixel_values_videos"):
        generate(target, draft, novis, 4)
    for tree, msg in (
        (TreeConfig(depth=0, top_k=2, total_nodes=2), "depth"),
        (TreeConfig(depth=2, top_k=0, total_nodes=2), "top_k"),
        (TreeConfig(depth=2, top_k=2, total_nodes=0), "total_nodes"),
        (TreeConfig(depth=2, top_k=2, total_nodes=7), "exceeds the 6 candidates"),
        (TreeConfig(depth=1, top_k=VOCAB + 1, total_nodes=3), "exceeds the vocabulary"),
    ):
        with pytest.raises(ValueError, match=msg):
            generate(target, draft, inputs, 4, tree=tree)
    with pytest.raises(ValueError, match="chain"):
        generate(target, draft, inputs, 4, chain=0)
    with pytest.raises(ValueError, match="either tree"):
        generate(target, draft, inputs, 4, chain=2, tree=SMALL_TREE)
    with pytest.raises(ValueError, match="temperature"):
        generate(target, draft, inputs, 4, temperature=-1.0)
    # A draft built for another target.
    other = load_target(_model("qwen2_vl"))
    with pytest.raises(ValueError, match="do not match"):
        generate(other, draft, _batch("qwen2_vl", 1), 4)
    # Inputs on different devices (a meta tensor stands in for a second device).
    mixed = dict(inputs)
    mixed["pixel_values_videos"] = inputs["pixel_values_videos"].to("meta")
    with pytest.raises(ValueError, match="different devices"):
        generate(target, draft, mixed, 4)


@pytest.mark.cuda
def test_inputs_on_another_device_than_the_model():
    family = "qwen2_5_vl"
    model, target, draft = _setup(family)
    inputs = {k: v.cuda() for k, v in _batch(family, 1).items()}
    with pytest.raises(ValueError, match="target model is on cpu"):
        generate(target, draft, inputs, 4)


# -- clear errors where users meet them (issue 16, item 8) ------------------------------------------
def _no_forward(model):
    """A context that fails the test if any module of `model` runs forward."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        calls = []
        handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__)) for m in model.modules()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        assert not calls, f"a forward ran before the error: {calls[:3]}"

    return guard()


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 17, -1])
def test_token_ids_outside_the_vocabulary(bad):
    model, target, draft = _setup("qwen2_5_vl")
    inputs = _batch("qwen2_5_vl", 2)
    ids = inputs["input_ids"].clone()
    ids[1, -1] = bad  # a text token of the last row
    with _no_forward(model), pytest.raises(ValueError, match=rf"input_ids hold token id {bad}, outside the "
                                                              rf"vocabulary \(vocab_size {VOCAB}"):
        generate(target, draft, dict(inputs, input_ids=ids), 4)


@pytest.mark.parametrize("image", [False, True])
def test_a_grid_that_does_not_match_its_placeholders(image):
    model, target, draft = _setup("qwen2_vl")
    inputs = tiny_inputs(model, batch=2, frames=[2, 4], prompt_lens=[6, 4], image=image)
    kind, grid, tid = ("image", "image_grid_thw", 290) if image else ("video", "video_grid_thw", 291)
    expected = int((inputs[grid].prod(-1) // 4).sum())
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == tid).nonzero()[0])
    ids[0, first] = TEXT_LO  # one placeholder fewer than the grid's tokens
    with _no_forward(model), pytest.raises(
        ValueError, match=rf"{grid} .* gives {expected} {kind} tokens \(t\*h\*w/2\^2\) but input_ids hold "
                          rf"{expected - 1} {kind} placeholder tokens"):
        generate(target, draft, dict(inputs, input_ids=ids), 4)


def test_a_draft_in_another_dtype_is_cast_with_a_warning():
    model, target, _ = _setup("qwen2_5_vl")  # float64
    draft = SparrowDraft.from_target(target).float()  # e.g. float32 master weights kept from training
    inputs = _batch("qwen2_5_vl", 2)
    with pytest.warns(UserWarning, match="the draft is torch.float32 but the target is torch.float64; casting"):
        out = generate(target, draft, inputs, 6, chain=2)
    assert {p.dtype for p in draft.parameters()} == {torch.float64}
    assert target.embed_tokens().weight.dtype == torch.float64  # shared modules are the target's, untouched
    assert out.tokens == generate(target, None, inputs, 6).tokens
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cast once: no warning the next time
        generate(target, draft, inputs, 2, chain=2)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "llava_onevision"])
def test_text_only_prompts(family):
    """A request without a picture (a server's batch mixes them in): plain positions, and the
    speculative and autoregressive answers are Hugging Face generate's, left padding included."""
    import sparrow
    from tiny_models import tiny_target

    model = tiny_target(family)
    ids = torch.randint(3, 280, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = model.generate(**inputs, do_sample=False, max_new_tokens=10)[:, 9:].tolist()
    target = sparrow.load_target(model)
    draft = sparrow.SparrowDraft.from_target(target)
    assert sparrow.generate(target, None, inputs, max_new_tokens=10).tokens == ref
    assert sparrow.generate(target, draft, inputs, max_new_tokens=10).tokens == ref
    with pytest.raises(ValueError, match="placeholder"):  # placeholders but no pixels
        sparrow.generate(target, None, {"input_ids": torch.tensor([[5, 291, 6]])}, max_new_tokens=2)
