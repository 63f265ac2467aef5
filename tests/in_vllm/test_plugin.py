"""Sparrow's draft inside vLLM (sparrow/integrations/vllm): lossless on a mixed batch, its attention
over text positions only, and clear refusals."""

from __future__ import annotations

import json
import os

import pytest

from vllm_fixtures import (MAX_TOKENS, mixed_requests, sparrow_answers, tiny_vllm_checkpoint, trained_draft,
                           video_prompt, vllm_acceptance, vllm_engine)

K = 3  # draft tokens per step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_vllm_checkpoint(tmp_path_factory.mktemp("ckpt"))


def exported_draft(checkpoint: str, folder) -> str:
    """An untrained Sparrow draft of the checkpoint, exported for vLLM."""
    import sparrow
    from sparrow.integrations.vllm.export import export_vllm

    draft = sparrow.SparrowDraft.from_target(sparrow.load_target(checkpoint, device="cpu", dtype="float32"))
    draft.save_pretrained(os.path.join(folder, "draft"))
    return export_vllm(os.path.join(folder, "draft"), os.path.join(folder, "served"))


def spec_config(draft: str) -> dict:
    return {"method": "eagle", "model": draft, "num_speculative_tokens": K, "disable_padded_drafter_batch": True}


def run(checkpoint, requests, draft, record, monkeypatch, text_only=True):
    from vllm import SamplingParams

    monkeypatch.setenv("SPARROW_VLLM_RECORD_ATTENTION", str(record))
    monkeypatch.setenv("SPARROW_VLLM_TEXT_ONLY", "1" if text_only else "0")
    with vllm_engine(checkpoint, speculative_config=spec_config(draft)) as llm:
        outs = llm.generate([r.vllm_prompt for r in requests],
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    forwards = [json.loads(line) for line in record.read_text().splitlines()]
    return [list(o.outputs[0].token_ids) for o in outs], forwards


def prompt_passes(forwards) -> list[int]:
    """Attention lengths of the draft's first pass over each prompt (a request's rows = its entries)."""
    return sorted(s for f in forwards for s, q in zip(f["seq_lens"], f["query_lens"]) if q == s)


def text_entries(r) -> int:
    """The prompt's text positions: its tokens less the visual placeholders."""
    return sum(1 for t in r.input_ids if t not in (290, 291))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_lossless_and_text_only_attention(family, tmp_path, monkeypatch):
    checkpoint = tiny_vllm_checkpoint(tmp_path, family)
    requests = mixed_requests(checkpoint, tmp_path)
    expected = sparrow_answers(checkpoint, requests)
    draft = exported_draft(checkpoint, tmp_path)
    answers, forwards = run(checkpoint, requests, draft, tmp_path / "sparrow.jsonl", monkeypatch)
    assert answers == expected  # greedy with Sparrow speculation == without (== sparrow.generate)
    # The draft's pass over a prompt attends over its text entries + entry 0, whatever the video's
    # length; later passes grow by the new tokens only.
    assert prompt_passes(forwards) == sorted(text_entries(r) + 1 for r in requests), [len(r.input_ids) for r in requests]
    longest_text = max(text_entries(r) for r in requests) + 1 + MAX_TOKENS + K
    assert max(max(f["seq_lens"]) for f in forwards) <= longest_text < max(len(r.input_ids) for r in requests)


def test_vllm_eagle_draft_sees_every_position(checkpoint, tmp_path, monkeypatch):
    """The baseline: the same draft fed by vLLM's own EAGLE proposer attends over visual
    positions too (MSD-style), and is lossless too."""
    requests = mixed_requests(checkpoint, tmp_path)
    draft = exported_draft(checkpoint, tmp_path)
    answers, forwards = run(checkpoint, requests, draft, tmp_path / "eagle.jsonl", monkeypatch, text_only=False)
    assert answers == sparrow_answers(checkpoint, requests)
    assert prompt_passes(forwards) == sorted(len(r.input_ids) for r in requests)


def test_trained_draft_accepts_as_in_sparrow(tmp_path, monkeypatch):
    """A draft trained with `sparrow train`, exported and served: vLLM's accepted tokens per step
    are sparrow.generate(chain=K)'s on the same prompts (within 10% of the mean accepted length)."""
    import sparrow
    from sparrow.inputs.auto import CheckpointProcessor
    from sparrow.integrations.vllm.export import export_vllm
    from vllm import SamplingParams

    target_dir, draft_dir, videos = trained_draft(tmp_path)
    proc = CheckpointProcessor(target_dir, use_hf=False)
    target = sparrow.load_target(target_dir, device="cpu", dtype="float32")
    draft = sparrow.SparrowDraft.from_pretrained(draft_dir, target).eval()
    prompts, accepted, steps = [], 0, 0
    for path in videos:
        rec = {"id": path, "video": path, "prompt": "what is moving in the video"}
        out = sparrow.generate(target, draft, proc(rec), max_new_tokens=24, chain=K)
        accepted, steps = accepted + out.stats.accepted_per_step * out.stats.steps, steps + out.stats.steps
        prompts.append(video_prompt(proc, path, rec["prompt"]))
    ours = accepted / steps
    assert ours > 1.0, f"the trained draft barely accepts ({ours:.2f} tokens/step): the comparison would say nothing"
    served = export_vllm(draft_dir, str(tmp_path / "served"))
    monkeypatch.setenv("SPARROW_VLLM_TEXT_ONLY", "1")
    with vllm_engine(target_dir, speculative_config=spec_config(served), disable_log_stats=False) as llm:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        theirs = vllm_acceptance(llm)
    print(f"accepted tokens per step: vLLM {theirs:.3f}, sparrow.generate {ours:.3f}")
    assert abs((1 + theirs) - (1 + ours)) <= 0.1 * (1 + ours), (theirs, ours)


def test_world_target_and_its_demo_draft(tmp_path, monkeypatch):
    """The shipped world target written as a Hugging Face folder, its demo draft exported and
    served on rendered clips: vLLM's greedy answers are sparrow.generate's (under the release
    position rule, vLLM's), and its accepted tokens per step are within 10% of sparrow.generate's."""
    import sparrow
    from sparrow.inputs.auto import CheckpointProcessor
    from sparrow.integrations.vllm.export import export_vllm
    from sparrow.world import make_scene, render
    from sparrow.world.language import make_question
    from tiny_checkpoints import write_video
    from vllm import SamplingParams
    from vllm_fixtures import world_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target_dir = world_checkpoint(tmp_path)
    proc = CheckpointProcessor(target_dir, use_hf=False)
    target = sparrow.load_target(target_dir, device="cpu", dtype="float32", positions="release")
    draft_dir = os.path.join(root, "assets", "drafts", "sparrow")
    draft = sparrow.SparrowDraft.from_pretrained(draft_dir, target).eval()
    prompts, answers, accepted, steps = [], [], 0, 0
    for seed in range(4):
        path = write_video(tmp_path / f"clip{seed}.mp4", render(make_scene(seed), 16, 224), fps=2)
        question = make_question(seed)
        inputs = proc({"id": str(seed), "video": path, "prompt": question})
        out = sparrow.generate(target, draft, inputs, max_new_tokens=32, chain=K)
        answers.append(out.tokens[0])
        accepted, steps = accepted + out.stats.accepted_per_step * out.stats.steps, steps + out.stats.steps
        prompts.append(video_prompt(proc, path, question))
    ours = accepted / steps
    served = export_vllm(draft_dir, str(tmp_path / "served"))
    monkeypatch.setenv("SPARROW_VLLM_TEXT_ONLY", "1")
    with vllm_engine(target_dir, speculative_config=spec_config(served), disable_log_stats=False) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        theirs = vllm_acceptance(llm)
    print(f"world target, demo draft: accepted tokens per step: vLLM {theirs:.3f}, sparrow.generate {ours:.3f}")
    assert [list(o.outputs[0].token_ids) for o in outs] == answers
    assert ours > 1.0 and abs((1 + theirs) - (1 + ours)) <= 0.1 * (1 + ours), (theirs, ours)
