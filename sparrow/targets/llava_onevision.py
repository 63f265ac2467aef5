"""LLaVA-OneVision (SigLIP + Qwen2 decoder, 1D RoPE).

Positions: the decoder uses plain 1D positions; a left-padded row's first real token has position
0 (HF generate's `cumsum(attention_mask) - 1`), so the next token of row b is at n_real_tokens[b]
and tree node i at that + depth(i). Visual input: `pixel_values_videos` [videos, frames, C, H, W]
(one video per row, as the processor gives it) and/or `pixel_values` [images, patches, C, H, W]
with `image_sizes`.
"""

from __future__ import annotations

import torch

from sparrow.targets.base import TargetState
from sparrow.targets.hf import HFTargetAdapter


class LlavaOnevisionAdapter(HFTargetAdapter):
    family = "llava_onevision"
    visual_keys = ("pixel_values_videos", "pixel_values")
    passthrough_keys = ("image_sizes", "image_sizes_videos", "batch_num_images")

    def placeholder_ids(self) -> tuple:
        cfg = self.model.config
        image = getattr(cfg, "image_token_id", None)
        video = getattr(cfg, "video_token_id", None)
        image = image if image is not None else cfg.image_token_index
        video = video if video is not None else cfg.video_token_index
        return (image, video)

    def _check_inputs(self, inputs: dict):
        out = super()._check_inputs(inputs)
        if inputs.get("pixel_values") is not None and inputs.get("image_sizes") is None:
            raise ValueError("llava_onevision: pixel_values needs image_sizes")
        return out

    def _prompt_positions(self, inputs: dict, input_ids, attention_mask):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return position_ids, attention_mask.sum(-1), {}

    def _tree_positions(self, state: TargetState, depth: torch.Tensor) -> torch.Tensor:
        return state.next_position[:, None] + depth
