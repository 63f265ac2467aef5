"""What the vLLM tests share: the tiny checkpoint vLLM's CPU attention accepts, a mixed batch of
requests written both ways (vLLM's prompt dict and Sparrow's inputs), Sparrow's answers, and an
engine that is shut down after use."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from tiny_checkpoints import random_video, save_tiny_checkpoint, write_video

MAX_TOKENS = 8
# vLLM's CPU attention takes head_dim in {32, 64, ...}: 64 hidden / 2 heads; M-RoPE sections sum to 16
VLLM_TEXT = dict(num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})


def tiny_vllm_checkpoint(folder, family: str = "qwen2_5_vl") -> str:
    return save_tiny_checkpoint(family, os.path.join(folder, family), text_overrides=VLLM_TEXT)


@dataclass
class Request:
    name: str
    record: dict  # Sparrow's record (sparrow/train/records.py)
    vllm_prompt: dict  # vLLM's prompt: text with one placeholder, multi_modal_data
    input_ids: list  # the processor's ids, placeholders expanded


def mixed_requests(checkpoint: str, folder) -> list[Request]:
    """A text-only request, an image and two videos of different lengths and frame rates."""
    from PIL import Image

    from sparrow.inputs.auto import CheckpointProcessor

    proc = CheckpointProcessor(checkpoint, use_hf=False)
    image = Image.fromarray(random_video(1, 40, 56, seed=4)[0])
    videos = [write_video(os.path.join(folder, f"v{i}.mp4"), random_video(t, 24, 32, seed=i), fps=fps)
              for i, (t, fps) in enumerate([(8, 4), (12, 3)])]
    out = []
    for name, kind, source, prompt in [("text", "text", None, "what is moving"),
                                       ("image", "image", image, "describe the picture"),
                                       ("video0", "video", videos[0], "what is moving in the video"),
                                       ("video1", "video", videos[1], "how many objects are there")]:
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        if kind != "text":
            messages[0]["content"].insert(0, {"type": kind})
        text = proc.tokenizer.apply_chat_template(messages, chat_template=proc.template, tokenize=False,
                                                  add_generation_prompt=True)
        record = {"id": name, "prompt": prompt}
        if kind == "text":
            ids = proc.tokenizer(text)["input_ids"]
            out.append(Request(name, record | {"text": text}, {"prompt": text}, ids))
            continue
        record[kind] = source
        inputs = proc(record)
        data = np.asarray(source) if kind == "image" else None
        prompt = video_prompt(proc, source, prompt) if kind == "video" else {
            "prompt": text, "multi_modal_data": {kind: data}}
        out.append(Request(name, record, prompt, inputs["input_ids"][0].tolist()))
    return out


def sparrow_answers(checkpoint: str, requests: list[Request], draft=None, **kw) -> list[list[int]]:
    """sparrow.generate's greedy answer of each request alone (autoregressive without a draft)."""
    import torch

    import sparrow
    from sparrow.inputs.auto import CheckpointProcessor

    proc = CheckpointProcessor(checkpoint, use_hf=False)
    target = sparrow.load_target(checkpoint, device="cpu", dtype="float32")
    answers = []
    for r in requests:
        if "text" in r.record:
            ids = torch.tensor([r.input_ids])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
        else:
            inputs = proc(r.record)
        answers.append(sparrow.generate(target, draft, inputs, max_new_tokens=MAX_TOKENS, **kw).tokens[0])
    return answers


def trained_draft(folder) -> tuple[str, str, list[str]]:
    """A tiny target (small weights: answers the draft can learn), a Sparrow draft trained against it
    with the CLI on its own answers to video records, and the records' video files."""
    from sparrow import cli

    target = save_tiny_checkpoint("qwen2_5_vl", os.path.join(folder, "target"), text_overrides=VLLM_TEXT,
                                  initializer_range=0.1)
    videos = os.path.join(folder, "videos")
    os.makedirs(videos)
    paths = [write_video(os.path.join(videos, f"c{i}.mp4"), random_video(8 + 2 * i, 24, 32, seed=10 + i), fps=4)
             for i in range(6)]
    questions = os.path.join(folder, "q.txt")
    with open(questions, "w") as f:
        f.write("what is moving in the video\nhow many objects are there\ndescribe the video\n")
    records, data, draft = (os.path.join(folder, n) for n in ("records.jsonl", "data", "draft"))
    for argv in (["records", "--videos", videos, "--questions", questions, "--out", records],
                 ["gen-data", "--target", target, "--data", records, "--out", data, "--max-new-tokens", "32"],
                 # without IVSB: on this tiny target it accepts 2.6 tokens/step against 0.2 with it
                 ["train", "--target", target, "--data", data, "--out", draft, "--max-steps", "300", "--lr", "3e-3",
                  "--no-ivsb"]):
        assert cli.main([*argv, "--no-progress"] if argv[0] != "records" else argv) == 0, argv
    return target, draft, paths


def vllm_acceptance(llm) -> float:
    """Draft tokens accepted per verify step, from vLLM's own counters."""
    counts = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return counts["vllm:spec_decode_num_accepted_tokens"] / counts["vllm:spec_decode_num_drafts"]


def video_prompt(proc, path: str, prompt: str, **sampling) -> dict:
    """vLLM's prompt for a video file: the chat template's text, the frames Sparrow samples and
    their metadata (so both engines see the same pixels and second_per_grid_ts)."""
    from sparrow.inputs import read_video

    clip = read_video(path, multiple=2, min_frames=4, **sampling)
    text = proc.tokenizer.apply_chat_template(proc._messages(prompt, "video"), chat_template=proc.template,
                                              tokenize=False, add_generation_prompt=True)
    meta = {"fps": clip.video_fps, "total_num_frames": clip.total_frames, "frames_indices": clip.indices,
            "duration": clip.total_frames / clip.video_fps, "video_backend": "pyav"}
    return {"prompt": text, "multi_modal_data": {"video": (clip.frames, meta)}}


@contextlib.contextmanager
def vllm_engine(checkpoint: str, **engine_kw):
    """vLLM's offline engine on the CPU: float32, eager, 1 GiB of KV cache, no prefix caching."""
    import gc

    from vllm import LLM

    kw = dict(dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=4,
              limit_mm_per_prompt={"image": 1, "video": 1}, enable_prefix_caching=False,
              gpu_memory_utilization=0.05, seed=0)
    llm = LLM(model=checkpoint, **(kw | engine_kw))
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
