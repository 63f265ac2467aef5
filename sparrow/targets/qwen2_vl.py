"""Qwen2-VL and Qwen2.5-VL: one adapter class for both (they differ only in the vision tower and
in Qwen2.5-VL's time-scaled temporal positions, both handled by the model's own get_rope_index).

Positions (M-RoPE). A prompt's position ids are [3, B, S] (temporal, height, width), computed by
the model's `get_rope_index`, so visual tokens get 3D positions and text tokens three equal ones.
The next token of row b continues at max(positions of row b) + 1 (= n_real_tokens + rope_delta),
which is what a batch-1 `generate` uses. Tree node i of row b gets next_position[b] + depth(i) on
all three axes. We pass 3-row position ids everywhere; the 4-row form of transformers 5.x
(text positions first, used only to build packed-sequence masks) is never needed because we always
give the mask ourselves.

Version differences handled:
  * `get_rope_index` takes `mm_token_type_ids` (0 text, 1 image, 2 video) in transformers 5.x and
    ignores it silently when absent (falling back to 1D positions!), while 4.x derives the types
    from input_ids. We call it with whatever its signature takes and build `mm_token_type_ids`
    from the placeholder ids when the processor did not return it.
  * Qwen2.5-VL's `second_per_grid_ts` is forwarded when given (defaults to 1 s per grid as in HF).
  * The model's cached `rope_deltas` attribute is neither read nor written: next_position is ours.
  * transformers 5.x (get_rope_index) starts text that follows a video at (video start) +
    max(h, w) / merge, 4.x at one past the video's largest position (transformers#45381); in both,
    decoding continues one past the prompt's largest position. We follow the installed version, so
    generation stays identical to its `generate`; training data (prefill(continuation=A)) places
    the answer where decoding will, not where a whole-sequence forward would.
"""

from __future__ import annotations

import inspect

import torch

from sparrow.targets.base import TargetState
from sparrow.targets.hf import HFTargetAdapter


class QwenVLAdapter(HFTargetAdapter):
    """Adapter for `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`."""

    family = "qwen2_vl"  # set per instance to the model's model_type
    families = ("qwen2_vl", "qwen2_5_vl")
    visual_keys = ("pixel_values_videos", "pixel_values")
    passthrough_keys = ("video_grid_thw", "image_grid_thw")

    def __init__(self, model, feature=None):
        mt = model.config.model_type
        if mt not in self.families:
            raise ValueError(f"QwenVLAdapter serves {self.families}, not {mt!r}")
        self.family = mt
        super().__init__(model, *(() if feature is None else (feature,)))

    def placeholder_ids(self) -> tuple:
        cfg = self.model.config
        return (cfg.image_token_id, cfg.video_token_id)

    def _check_inputs(self, inputs: dict):
        out = super()._check_inputs(inputs)
        for pix, grid in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
            if inputs.get(pix) is not None and inputs.get(grid) is None:
                raise ValueError(f"{self.family}: {pix} needs {grid}")
        return out

    def _prompt_positions(self, inputs: dict, input_ids, attention_mask):
        cfg = self.model.config
        get_rope_index = self.vlm.get_rope_index
        params = inspect.signature(get_rope_index).parameters
        kw = {
            "image_grid_thw": inputs.get("image_grid_thw"),
            "video_grid_thw": inputs.get("video_grid_thw"),
            "attention_mask": attention_mask,
        }
        if "second_per_grid_ts" in params and inputs.get("second_per_grid_ts") is not None:
            kw["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        if "mm_token_type_ids" in params:  # transformers 5.x
            tt = inputs.get("mm_token_type_ids")
            if tt is None:
                tt = torch.zeros_like(input_ids, dtype=torch.int)
                tt[input_ids == cfg.image_token_id] = 1
                tt[input_ids == cfg.video_token_id] = 2
            kw["mm_token_type_ids"] = tt
        kw = {k: v for k, v in kw.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}
        position_ids, _ = get_rope_index(input_ids, **kw)
        position_ids = position_ids.to(input_ids.device)
        live = attention_mask.bool()[None].expand_as(position_ids)
        next_position = position_ids.masked_fill(~live, -1).amax(dim=(0, 2)) + 1  # [B]
        return position_ids, next_position, {}

    def _tree_positions(self, state: TargetState, depth: torch.Tensor) -> torch.Tensor:
        pos = state.next_position[:, None] + depth  # [B, N+1]
        return pos[None].expand(3, *pos.shape)  # text: the three M-RoPE axes agree


Qwen2VLAdapter = QwenVLAdapter
Qwen2_5_VLAdapter = QwenVLAdapter
