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


def tiny_vllm_checkpoint(folder) -> str:
    return save_tiny_checkpoint("qwen2_5_vl", os.path.join(folder, "qwen2_5_vl"), text_overrides=VLLM_TEXT)


@dataclass
class Request:
    name: str
    record: dict  # Sparrow's record (sparrow/train/records.py)
    vllm_prompt: dict  # vLLM's prompt: text with one placeholder, multi_modal_data
    input_ids: list  # the processor's ids, placeholders expanded


def mixed_requests(checkpoint: str, folder) -> list[Request]:
    """A text-only request, an image and two videos of different lengths and frame rates."""
    from PIL import Image

    from sparrow.inputs import read_video
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
        data = np.asarray(source) if kind == "image" else source
        if kind == "video":
            clip = read_video(source, multiple=2, min_frames=4)
            data = (clip.frames, {"fps": clip.video_fps, "total_num_frames": clip.total_frames,
                                  "frames_indices": clip.indices, "duration": clip.total_frames / clip.video_fps,
                                  "video_backend": "pyav"})
        out.append(Request(name, record, {"prompt": text, "multi_modal_data": {kind: data}},
                           inputs["input_ids"][0].tolist()))
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


@contextlib.contextmanager
def vllm_engine(checkpoint: str, **engine_kw):
    """vLLM's offline engine on the CPU: float32, eager, 1 GiB of KV cache, no prefix caching."""
    import gc

    from vllm import LLM

    llm = LLM(model=checkpoint, dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=4,
              limit_mm_per_prompt={"image": 1, "video": 1}, enable_prefix_caching=False,
              gpu_memory_utilization=0.05, seed=0, **engine_kw)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
