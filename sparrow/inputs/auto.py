"""`--processor auto`: a record -> model inputs with the checkpoint's own tokenizer, chat template
and processor settings, for Qwen2.5-VL, Qwen2-VL and LLaVA-OneVision.

    make_inputs = checkpoint_processor("path/to/Qwen2.5-VL-7B-Instruct")
    inputs = make_inputs({"video": "clip.mp4", "prompt": "What happens?", "fps": 2.0})

A record's video file is decoded here (sparrow/inputs/video.py: PyAV, the family's frame
sampling) and its sampled frame rate reaches Qwen2.5-VL as `second_per_grid_ts`. Then:

- where transformers' processor for the checkpoint builds (its video processors need
  torchvision), that processor makes the inputs from the sampled frames: the checkpoint's truth;
- elsewhere Sparrow does what it does: the chat template through the tokenizer, each visual
  placeholder repeated as many times as the model has visual tokens for it, video pixels from
  sparrow/inputs/preprocess.py (torch only), image pixels from the checkpoint's image processor
  (transformers has a PIL one), LLaVA-OneVision's anyres image token count from preprocess.py.
  tests/test_inputs.py checks the two equal.

Record keys read here besides "video"/"image"/"frames" and "prompt": "fps" (frames sampled per
second of video; Qwen-VL's default 2), "num_frames" (a fixed count instead; LLaVA-OneVision's
default 32), "max_pixels" (a lower per-frame pixel cap, Qwen only).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from sparrow.inputs import preprocess
from sparrow.inputs.video import DEFAULT_FPS, VideoClip, is_video_file, read_video

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")
# (video placeholder, image placeholder) when the tokenizer does not name them
PLACEHOLDERS = {"qwen2_5_vl": ("<|video_pad|>", "<|image_pad|>"), "qwen2_vl": ("<|video_pad|>", "<|image_pad|>"),
                "llava_onevision": ("<video>", "<image>")}
MM_TYPE = {"image": 1, "video": 2}
# LLaVA-OneVision was trained on up to 32 uniformly sampled frames (196 tokens each at 384 px):
# its default, where Qwen-VL's is 2 frames per second
LLAVA_ONEVISION_FRAMES = 32  # mm_token_type_ids: what transformers' Qwen-VL reads for positions


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def chat_template(path: str, tokenizer) -> str:
    """The checkpoint's chat template: the processor's (chat_template.jinja / .json), else the
    tokenizer's."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tmpl = _read_json(os.path.join(path, "chat_template.json")).get("chat_template") or tokenizer.chat_template
    if not tmpl:
        raise ValueError(f"{path}: no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")
    return tmpl


def video_settings(path: str) -> dict:
    """The checkpoint's video processor settings, where transformers looks for them: nested in
    processor_config.json (what transformers 5 saves), video_preprocessor_config.json, else the
    image processor's preprocessor_config.json (older Qwen-VL checkpoints)."""
    nested = _processor_config(path).get("video_processor")
    if isinstance(nested, dict) and nested:
        return nested
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        cfg = _read_json(os.path.join(path, name))
        if cfg:
            return cfg
    raise ValueError(f"{path}: no video processor settings (processor_config.json, "
                     "video_preprocessor_config.json or preprocessor_config.json)")


class CheckpointProcessor:
    """make_inputs(record) -> inputs for a batch of one, from a Hugging Face model folder."""

    def __init__(self, path: str, model_type: str | None = None, use_hf: bool | None = None, tokenizer=None):
        import transformers

        self.path = path
        self.family = model_type or _read_json(os.path.join(path, "config.json")).get("model_type")
        if self.family not in FAMILIES:
            raise ValueError(f"{path}: --processor auto knows {', '.join(FAMILIES)}, not {self.family!r}; "
                             "pass --processor module:function")
        # the folder's tokenizer, unless the caller has loaded it already
        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.template = chat_template(path, self.tokenizer)
        self.settings = video_settings(path)
        self.processor_config = _processor_config(path)  # read once, not per record
        self.hf = _hf_processor(path) if use_hf in (None, True) else None
        if use_hf and self.hf is None:
            raise ValueError(f"{path}: transformers' processor does not build here (it needs torchvision)")
        self._images = None
        video_token, image_token = PLACEHOLDERS[self.family]
        self.video_token = getattr(self.tokenizer, "video_token", None) or video_token
        self.image_token = getattr(self.tokenizer, "image_token", None) or image_token

    # -- the record's visual input -------------------------------------------------------------
    def _clip(self, record: dict) -> VideoClip:
        """The record's video, sampled the family's way (Qwen: multiples of the temporal patch)."""
        qwen = self.family != "llava_onevision"
        s = self.settings
        multiple = s.get("temporal_patch_size", 2) if qwen else 1
        fps, count = record.get("fps"), record.get("num_frames")
        default_count = not qwen and fps is None and count is None
        if default_count:  # up to 32 frames: all of a shorter video
            count = LLAVA_ONEVISION_FRAMES
        if is_video_file(record.get("video")):
            return read_video(record["video"], fps=None if count else fps, num_frames=count, multiple=multiple,
                              min_frames=s.get("min_frames", 4) if qwen else 1, max_frames=s.get("max_frames", 768),
                              up_to=default_count)
        frames = np.asarray(record["frames"])  # decoded already: every frame, at "fps" if the record says
        n = frames.shape[0]
        return VideoClip(frames, float(fps or DEFAULT_FPS), n, list(range(n)))

    def prompt_text(self, prompt: str, kind: str = "video") -> str:
        """The chat template's text for one user turn: a `kind` part ("video", "image"; "text":
        none) then the prompt, and the generation prompt; one placeholder per visual part."""
        parts = [] if kind == "text" else [{"type": kind}]
        messages = [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, record: dict) -> dict:
        kind = "image" if record.get("image") is not None else "video"
        prompt = record.get("prompt")
        if not prompt:
            raise ValueError(f"sample {record.get('id')!r}: --processor auto needs a 'prompt'")
        text = self.prompt_text(prompt, kind)
        if kind == "video":
            clip = self._clip(record)
            return self._hf_video(text, clip, record) if self.hf is not None else self._video(text, clip, record)
        image = _load_image(record["image"])
        return self._hf_image(text, image) if self.hf is not None else self._image(text, image)

    # -- through transformers' processor ---------------------------------------------------------
    def _hf_video(self, text: str, clip: VideoClip, record: dict) -> dict:
        from transformers.video_utils import VideoMetadata

        meta = VideoMetadata(total_num_frames=clip.total_frames, fps=clip.video_fps, frames_indices=clip.indices)
        kw = {}
        if self.family != "llava_onevision" and record.get("max_pixels"):
            lo, hi = preprocess.qwen_pixel_budget(self.settings, len(clip.indices), record["max_pixels"])
            kw["size"] = {"shortest_edge": lo, "longest_edge": hi}
        out = self.hf(text=[text], videos=[clip.frames], video_metadata=[meta], do_sample_frames=False,
                      return_tensors="pt", **kw)
        return _tensors(out)

    def _hf_image(self, text: str, image) -> dict:
        return _tensors(self.hf(text=[text], images=[image], return_tensors="pt"))

    # -- Sparrow's own path (no torchvision) ---------------------------------------------------
    def _video(self, text: str, clip: VideoClip, record: dict) -> dict:
        if self.family == "llava_onevision":
            pixels = preprocess.llava_onevision_video(clip.frames, self.settings)
            side = int(round(self.processor_config.get("num_image_tokens", 729) ** 0.5))
            count = pixels.shape[1] * (-(-side // 2)) ** 2 + 1  # 2x2-pooled tokens per frame, one newline
            extra = {"pixel_values_videos": pixels}
        else:
            pixels, grid = preprocess.qwen_video(clip.frames, self.settings, record.get("max_pixels"))
            count = int(np.prod(grid)) // self.settings.get("merge_size", 2) ** 2
            extra = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}
            if self.family == "qwen2_5_vl":
                seconds = self.settings.get("temporal_patch_size", 2) / clip.sampled_fps
                extra["second_per_grid_ts"] = torch.tensor([seconds])
        return self._encode(text, self.video_token, count, "video") | extra

    def _image(self, text: str, image) -> dict:
        if self._images is None:  # transformers' image processors have a PIL backend: no torchvision
            import transformers

            self._images = transformers.AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        px = self._images(images=[image], return_tensors="pt")
        if self.family == "llava_onevision":
            cfg = self.processor_config
            count = preprocess.llava_onevision_image_tokens(
                tuple(px["image_sizes"][0].tolist()), tuple(px["pixel_values"].shape[-2:]),
                self._images.image_grid_pinpoints, cfg.get("num_image_tokens", 729),
                cfg.get("vision_aspect_ratio", "anyres_max_9"), cfg.get("vision_feature_select_strategy", "full"))
            return self._encode(text, self.image_token, count, "image") | {
                k: px[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in px}
        count = int(px["image_grid_thw"][0].prod()) // self._images.merge_size ** 2
        return self._encode(text, self.image_token, count, "image") | {
            "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}

    def _encode(self, text: str, token: str, count: int, kind: str) -> dict:
        if token not in text:
            raise ValueError(f"{self.path}: the chat template wrote no {token} for a {kind}")
        enc = self.tokenizer([text.replace(token, token * count, 1)], return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.family != "llava_onevision":
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            out["mm_token_type_ids"] = (enc["input_ids"] == token_id).long() * MM_TYPE[kind]
        return out


def _processor_config(path: str) -> dict:
    return _read_json(os.path.join(path, "processor_config.json"))


def _hf_processor(path: str):
    """transformers' AutoProcessor for the folder, or None where it does not build (torchvision)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError, TypeError):
        return None


def _load_image(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return np.asarray(image)


def _tensors(batch) -> dict:
    """The processor's output as tensors (it may leave second_per_grid_ts a list of floats)."""
    out = {}
    for k, v in dict(batch).items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            v = torch.tensor(v)
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


def checkpoint_processor(path: str, model_type: str | None = None, tokenizer=None) -> CheckpointProcessor:
    return CheckpointProcessor(path, model_type, tokenizer=tokenizer)
