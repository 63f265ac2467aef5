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
        text = proc.prompt_text(prompt, kind)
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
    text = proc.prompt_text(prompt)
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


def world_checkpoint(folder) -> str:
    """The shipped world target (assets/world_target) as a Hugging Face folder vLLM loads: its
    weights and configs as they are, its word tokenizer written as a transformers tokenizer (the
    same ids), a chat template that writes the world's prompt, and Qwen2.5-VL processor configs
    that keep its 224x224 frames as they are (the world's patchify is Qwen's)."""
    import json
    import shutil

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sparrow.inputs.preprocess import CLIP_MEAN, CLIP_STD

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "assets", "world_target")
    out = os.path.join(folder, "world_target")
    os.makedirs(out)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    words = json.load(open(os.path.join(src, "tokenizer.json")))
    vocab = {t: i for i, t in enumerate(words["tokens"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                              eos_token="<|im_end|>")
    hf.add_special_tokens({"additional_special_tokens": [t for t in words["special_tokens"] if t not in (
        "<unk>", "<|endoftext|>", "<|im_end|>")]})
    hf.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
                        "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
                        "{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %} <|im_end|> "
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}")
    hf.save_pretrained(out)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(hf.chat_template)
    frame = 224 * 224
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "size": {"shortest_edge": frame, "longest_edge": frame},
             "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
             "do_sample_frames": False, "cap_pixels_per_frame": False}
    image = dict(video, image_processor_type="Qwen2VLImageProcessor")
    image.pop("video_processor_type")
    for name, content in (("video_preprocessor_config.json", video), ("preprocessor_config.json", image),
                          ("processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})):
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f)
    return out
