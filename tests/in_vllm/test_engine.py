"""vLLM's CPU build serves the tests' tiny Qwen2.5-VL checkpoint offline, and its greedy answers
are Sparrow's own autoregressive answers: the same model, the same positions (vLLM's M-RoPE is the
release's rule, Sparrow's default), a mixed batch of text, image and video requests. Everything
the plugin's tests compare against stands on this."""

from __future__ import annotations

import pytest

from vllm_fixtures import MAX_TOKENS, mixed_requests, sparrow_answers, tiny_vllm_checkpoint, vllm_engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_vllm_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_vllm_greedy_equals_sparrow_autoregressive(checkpoint, tmp_path):
    requests = mixed_requests(checkpoint, tmp_path)
    expected = sparrow_answers(checkpoint, requests)  # before the engine takes the cores
    with vllm_engine(checkpoint) as llm:
        from vllm import SamplingParams

        outs = llm.generate([r.vllm_prompt for r in requests],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    for r, out, want in zip(requests, outs, expected):
        assert list(out.prompt_token_ids) == r.input_ids, f"{r.name}: vLLM's prompt differs from the processor's"
        assert list(out.outputs[0].token_ids) == want, r.name
