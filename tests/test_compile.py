"""generate(compile=...): the target's verify forward, the draft's proposal and its commit run
under torch.compile, traced whole (fullgraph: a graph break fails the call) at static shapes.

On CPU: the outputs stay lossless (equal to eager and to Hugging Face's greedy generate), dynamo
compiles a bounded number of graphs over a whole generation and over many (a dimension that
changes between calls becomes symbolic rather than one graph per size), and a second generation
at the same shapes compiles nothing. One
case runs the real default backend (inductor); the others use aot_eager, which traces the same
graphs without generating code, to keep the suite fast.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from sparrow.draft import SparrowDraft
from sparrow.drafting import TreeConfig
from sparrow.generation import generate
from sparrow.targets import load_target
from tiny_models import PAD_ID, take_row, tiny_inputs, tiny_target

TREE = TreeConfig(depth=3, top_k=3, total_nodes=8)


@functools.lru_cache(maxsize=None)
def _setup(family: str):
    model = tiny_target(family)
    target = load_target(model, positions="generate")  # the reference is HF generate (rules differ from 4 frames on)
    return model, target, SparrowDraft.from_target(target)


def _inputs(model, family):
    if family == "llava_onevision":
        return tiny_inputs(model, batch=3, prompt_lens=[6, 9, 4], seed=5)
    return tiny_inputs(model, batch=3, frames=[2, 4, 6], prompt_lens=[6, 9, 4], seed=5)


def _hf(model, inputs, b, n, eos):
    row = take_row(inputs, b)
    out = model.generate(**row, do_sample=False, max_new_tokens=n, pad_token_id=PAD_ID, eos_token_id=eos)
    return out[0, row["input_ids"].shape[1] :].tolist()


def _compiled_run(fn):
    """fn() from a fresh dynamo -> (its result, graphs compiled, graph breaks seen)."""
    torch._dynamo.reset()
    counters.clear()
    out = fn()
    return out, counters["stats"]["unique_graphs"], dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,how,backend",
    [
        ("qwen2_5_vl", "tree", "inductor"),
        ("qwen2_vl", "chain", "aot_eager"),
        ("llava_onevision", "tree", "aot_eager"),
        ("qwen2_5_vl", "autoregressive", "aot_eager"),
    ],
)
def test_compiled_generation_is_lossless_and_compiles_a_bounded_number_of_graphs(family, how, backend):
    model, target, draft = _setup(family)
    inputs = _inputs(model, family)
    n = 10
    eager = generate(target, draft, inputs, n, tree=TREE)
    # An eos that one row emits mid-way, so that the batch shrinks (3 -> 2 or fewer) during the run.
    eos = next(t for t in eager.tokens[1][2:] if t not in eager.tokens[1][:2])
    kw = {"tree": dict(tree=TREE), "chain": dict(chain=3), "autoregressive": dict(mode="autoregressive")}[how]
    ref = generate(target, draft, inputs, n, eos_token_id=eos, **kw)
    out, graphs, breaks = _compiled_run(
        lambda: generate(target, draft, inputs, n, eos_token_id=eos, compile={"backend": backend}, **kw))
    assert breaks == {}
    assert out.tokens == ref.tokens == [_hf(model, inputs, b, n, eos) for b in range(3)]
    assert any(len(t) < n for t in out.tokens)  # a row left the batch early
    # One graph per compiled function (the verify forward; a proposal and the draft's commit too),
    # and one more once the batch shrinks (its size then becomes symbolic).
    per_size = 1 if how == "autoregressive" else 3
    assert per_size <= graphs <= 3 * per_size, graphs
    # The same shapes again: everything is reused, nothing compiles.
    counters.clear()
    again = generate(target, draft, inputs, n, eos_token_id=eos, compile={"backend": backend}, **kw)
    assert again.tokens == out.tokens and counters["stats"]["unique_graphs"] == 0


@pytest.mark.slow
def test_many_cache_sizes_and_batch_sizes_stay_within_the_compile_budget(monkeypatch):
    """Videos of many lengths give caches of many sizes, and rows leave batches of every size:
    dynamo then makes those dimensions symbolic instead of compiling one graph per shape (with
    fullgraph it would fail outright past its recompile limit)."""
    import sparrow.compiling

    monkeypatch.setattr(sparrow.compiling, "CAPACITY_STEP", 4)  # many capacity buckets, short prompts
    model = tiny_target("qwen2_5_vl", num_hidden_layers=1, seed=2)
    target = load_target(model)
    draft = SparrowDraft.from_target(target)
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 3, 2):
        inputs = tiny_inputs(model, batch=batch, frames=[2, 4, 6][:batch], prompt_lens=[6, 9, 4][:batch])
        for n in range(2, 40, 6):  # 7 capacities per batch size
            out = generate(target, draft, inputs, n, tree=TREE, compile={"backend": "aot_eager"})
            assert out.tokens == generate(target, draft, inputs, n, tree=TREE).tokens
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] <= 3 * 4, dict(counters["stats"])  # 3 functions, a few each


@pytest.mark.slow
def test_compiled_sampling_draws_what_eager_draws():
    """Same seed, same uniforms, same tokens with and without compile (a sampled chain: the draft's
    q goes to ops.verify in float32 / float64 as drawn)."""
    model, target, draft = _setup("qwen2_5_vl")
    inputs = _inputs(model, "qwen2_5_vl")
    kw = dict(chain=2, temperature=1.0, top_k=8, seed=3)
    eager = generate(target, draft, inputs, 8, **kw)
    out, _, breaks = _compiled_run(lambda: generate(target, draft, inputs, 8, compile={"backend": "aot_eager"}, **kw))
    assert breaks == {} and out.tokens == eager.tokens


def test_compile_argument_is_checked():
    _, target, draft = _setup("qwen2_5_vl")
    inputs = _inputs(_setup("qwen2_5_vl")[0], "qwen2_5_vl")
    with pytest.raises(ValueError, match="compile must be"):
        generate(target, draft, inputs, 2, compile=3)
