"""Frames + prompt -> Qwen2.5-VL processor-style inputs, without torchvision or a HF processor.

    make_inputs(record) -> {input_ids [1,S], attention_mask [1,S], mm_token_type_ids [1,S],
                            pixel_values_videos [N, 3*2*14*14], video_grid_thw [1,3]}

The prompt is Qwen's chat layout with word tokens:
    <|im_start|> user <|vision_start|> <|video_pad|> x n <|vision_end|> question <|im_end|> <|im_start|> assistant
with n = t * (h/2) * (w/2) for video_grid_thw = (t, h, w) = (ceil(T/2), H/14, W/14), i.e. one
visual token per 28x28 pixels per 2 frames (render.visual_tokens). Pixel values are normalised
with CLIP's mean/std and flattened exactly as Qwen2VLVideoProcessor.patchify does (an odd frame
count repeats the last frame). mm_token_type_ids (0 text, 2 video) is what transformers' Qwen2.5-VL
needs to build its 3D (M-RoPE) positions; temporal positions advance by 1 per frame pair
(vision_config.tokens_per_second = 1, no second_per_grid_ts).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from sparrow.inputs import preprocess
from sparrow.world.render import MERGE, PATCH, TEMPORAL_PATCH, render
from sparrow.world.scene import make_scene
from sparrow.world.tokenizer import WordTokenizer

CLIP_MEAN = np.array(preprocess.CLIP_MEAN, np.float32)
CLIP_STD = np.array(preprocess.CLIP_STD, np.float32)
ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "world_target"


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> WordTokenizer:
    """The world's tokenizer: the shipped one (assets/world_target/tokenizer.json) by default,
    else the vocabulary built from the grammar."""
    p = Path(path) if path is not None else ASSET_DIR / "tokenizer.json"
    if p.exists():
        return WordTokenizer.load(p)
    if path is not None:
        raise FileNotFoundError(p)
    from sparrow.world.tokenizer import build_vocab

    return build_vocab()


def patchify(frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [T,H,W,3] -> (pixel_values_videos [t*h*w, 3*2*14*14] float32, video_grid_thw [1,3])."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T,H,W,3], got {tuple(frames.shape)}")
    T, H, W, _ = frames.shape
    if H % (PATCH * MERGE) or W % (PATCH * MERGE):
        raise ValueError(f"H and W must be multiples of {PATCH * MERGE}, got {H}x{W}")
    x = (frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # [T, C, H, W]
    if T % TEMPORAL_PATCH:
        x = torch.cat([x, x[-1:].expand(TEMPORAL_PATCH - T % TEMPORAL_PATCH, -1, -1, -1)])
    t, h, w = x.shape[0] // TEMPORAL_PATCH, H // PATCH, W // PATCH
    x = x.reshape(t, TEMPORAL_PATCH, 3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, hm, wm, mh, mw, C, tp, ph, pw (as HF's patchify)
    pixels = x.reshape(t * h * w, 3 * TEMPORAL_PATCH * PATCH * PATCH).contiguous()
    return pixels, torch.tensor([[t, h, w]], dtype=torch.long)


def prompt_ids(tok: WordTokenizer, question: str, num_video_tokens: int) -> list[int]:
    return ([tok.im_start_id] + tok.encode("user") + [tok.vision_start_token_id]
            + [tok.video_token_id] * num_video_tokens + [tok.vision_end_token_id] + tok.encode(question)
            + [tok.eos_token_id, tok.im_start_id] + tok.encode("assistant"))


def encode_clip(frames: np.ndarray, question: str, tok: WordTokenizer | None = None) -> dict:
    """Processor-style inputs (batch of 1) of rendered frames and a question."""
    tok = load_tokenizer() if tok is None else tok
    pixels, grid = patchify(frames)
    n = int(grid.prod()) // (MERGE * MERGE)
    ids = torch.tensor([prompt_ids(tok, question, n)], dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == tok.video_token_id).long() * 2,
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
    }


def make_inputs(record: dict, tokenizer: WordTokenizer | None = None) -> dict:
    """Training-CLI entry point ("sparrow.world.processor:make_inputs").

    record: {"seed": int, "frames": 8, "height": 112, "width": height, "question": optional
    (default: the seed's question), "answer": optional (True: the seed's reference answer, or a
    string)}. Returns encode_clip's dict, plus "answer_ids" [1, A] (answer words + <|im_end|>) when
    an answer is asked for."""
    from sparrow.world.language import describe, make_question

    seed = int(record["seed"])
    scene = make_scene(seed)
    height = int(record.get("height", 112))
    frames = render(scene, int(record.get("frames", 8)), height, int(record.get("width", height)))
    tok = load_tokenizer() if tokenizer is None else tokenizer
    out = encode_clip(frames, record.get("question") or make_question(seed), tok)
    answer = record.get("answer")
    if answer:
        text = describe(scene) if answer is True else str(answer)
        out["answer_ids"] = torch.tensor([tok.encode(text) + [tok.eos_token_id]], dtype=torch.long)
    return out


def collate(items: list[dict], pad_id: int) -> dict:
    """Left-pad a list of batch-1 inputs into one batch (pixel values and grids concatenated)."""
    S = max(x["input_ids"].shape[1] for x in items)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        rows = [torch.nn.functional.pad(x[key], (S - x[key].shape[1], 0), value=fill) for x in items]
        out[key] = torch.cat(rows)
    out["pixel_values_videos"] = torch.cat([x["pixel_values_videos"] for x in items])
    out["video_grid_thw"] = torch.cat([x["video_grid_thw"] for x in items])
    return out
