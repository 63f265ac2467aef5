"""The decode step as a GPU needs it, counted on the CPU (sparrow/profiling.py): one host read of
device values per step, and no more ATen dispatches than the work needs.

Per-step figures are differences between a longer and a shorter generation (prefill cancels).
bench/bench_step.py reports the same figures with wall times; here they are properties to keep.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sparrow.draft import SparrowDraft
from sparrow.drafting import TreeConfig
from sparrow.generation import generate
from sparrow.profiling import HostCounter
from sparrow.targets import load_target
from tiny_models import tiny_inputs, tiny_target


@functools.lru_cache(maxsize=None)
def _setup(layers: int):
    model = tiny_target("qwen2_5_vl", dtype=torch.float32, num_hidden_layers=layers)
    target = load_target(model)
    return model, target, SparrowDraft.from_target(target)


def _per_step(fn, n1=6, n2=14):
    """(dispatches, host reads) per verify step of fn(n) -> GenerationOutput."""
    counted = []
    for n in (n1, n2):
        with HostCounter() as c:
            out = fn(n)
        counted.append((c.dispatches, c.host_reads, out.stats.steps))
    steps = counted[1][2] - counted[0][2]
    assert steps > 0
    return (counted[1][0] - counted[0][0]) / steps, (counted[1][1] - counted[0][1]) / steps


MODES = {
    "autoregressive": dict(mode="autoregressive"),
    "chain": dict(chain=3),
    "tree": dict(tree=TreeConfig(depth=3, top_k=3, total_nodes=8)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_host_read_per_step(mode, sampled, batch):
    model, target, draft = _setup(3)
    inputs = tiny_inputs(model, batch=batch, frames=[2, 4, 6][:batch], prompt_lens=[6, 9, 4][:batch])
    kw = dict(MODES[mode], temperature=1.0, top_k=10, seed=1) if sampled else MODES[mode]
    _, reads = _per_step(lambda n: generate(target, draft, inputs, n, **kw))
    assert reads == 1.0


@pytest.mark.slow
def test_dispatches_per_step_against_hf_generate():
    """At the depth of a 7B target (28 layers): the autoregressive step dispatches no more than
    Hugging Face generate does per token on the same model, and a 60-node tree step (depth 6) no
    more than 1.3 times the autoregressive step."""
    model, target, draft = _setup(28)
    inputs = tiny_inputs(model, batch=1, frames=4)
    counted = []
    for n in (6, 14):
        with HostCounter() as c:
            model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        counted.append(c.dispatches)
    hf = (counted[1] - counted[0]) / 8
    ar, _ = _per_step(lambda n: generate(target, None, inputs, n))
    tree, _ = _per_step(lambda n: generate(target, draft, inputs, n, tree=TreeConfig(depth=6, top_k=10, total_nodes=60)))
    assert ar <= hf, (ar, hf)
    assert tree <= 1.3 * ar, (tree, ar)
