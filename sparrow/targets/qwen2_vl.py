"""Qwen2-VL and Qwen2.5-VL: one adapter class for both (they differ only in the vision tower and
in Qwen2.5-VL's time-scaled temporal positions).

Positions (M-RoPE). A prompt's position ids are [3, B, S] (temporal, height, width): visual
tokens get 3D positions, text tokens three equal ones. Tree node i of row b gets
next_position[b] + depth(i) on all three axes. We pass 3-row position ids everywhere; the 4-row
form of transformers 5.x (text positions first, used only to build packed-sequence masks) is never
needed because we always give the mask ourselves. `positions=` chooses the rule (positions.py):

  * "release" (default): the rule the models were released and trained with, computed by
    positions.py without the installed transformers: text after a visual block starts after the
    block's largest position on every axis; decoding continues after the prompt's largest.
  * "generate": exactly what the installed transformers' generate does: the model's own
    get_rope_index (in 5.x text after a video starts at its start + max(h, w) / merge,
    transformers#45381) and decoding after the prompt's LAST position (position_ids[..., -1] + 1).
  * "forward": the installed get_rope_index, decoding after the largest position, as the model's
    cached forward continues through rope_deltas; the rule the world target was trained with.

A target records the rule it was trained under in its config (`sparrow_positions`); positions=None
takes it (else "release"). The model's cached `rope_deltas` attribute is neither read nor written.

Calling the installed get_rope_index: it takes `mm_token_type_ids` (0 text, 1 image, 2 video) in
transformers 5.x and ignores it silently when absent (falling back to 1D positions!), while 4.x
derives the types from input_ids. We call it with whatever its signature takes and build
`mm_token_type_ids` from the placeholder ids when the processor did not return it; Qwen2.5-VL's
`second_per_grid_ts` is forwarded when given (1 s per grid otherwise, in both rules).

Training data (prefill(continuation=A)) places the answer where decoding will. Under "release"
and "generate" that is where one forward over prompt + answer puts it (the answer is text that
continues the prompt's last text run), under "forward" it is not (continue_positions in hf.py).
"""

from __future__ import annotations

import inspect

import torch

from sparrow.targets import positions as rules
from sparrow.targets.base import TargetState
from sparrow.targets.hf import HFTargetAdapter


class QwenVLAdapter(HFTargetAdapter):
    """Adapter for `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`."""

    family = "qwen2_vl"  # set per instance to the model's model_type
    families = ("qwen2_vl", "qwen2_5_vl")
    visual_keys = ("pixel_values_videos", "pixel_values")
    passthrough_keys = ("video_grid_thw", "image_grid_thw")

    def __init__(self, model, feature=None, positions: str | None = None):
        mt = model.config.model_type
        if mt not in self.families:
            raise ValueError(f"QwenVLAdapter serves {self.families}, not {mt!r}")
        self.family = mt
        self.positions = rules.resolve_rule(model, positions)
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

    def _visual_token_counts(self, inputs: dict, input_ids: torch.Tensor) -> list:
        """Per grid given: t*h*w/merge^2 tokens, against the placeholders of its kind."""
        cfg, merge = self.model.config, self.model.config.vision_config.spatial_merge_size
        counts = []
        for key, token_id, kind in (("video_grid_thw", cfg.video_token_id, "video"),
                                    ("image_grid_thw", cfg.image_token_id, "image")):
            grid = inputs.get(key)
            if grid is None:
                continue

            def mismatch(expected, found, key=key, grid=grid, token_id=token_id, kind=kind):
                return (f"{self.family}: {key} {grid.tolist()} gives {expected} {kind} tokens (t*h*w/{merge}^2) but "
                        f"input_ids hold {found} {kind} placeholder tokens (id {token_id}); build input_ids and "
                        "the pixels in one processor call")

            counts.append((mismatch, (grid.long().prod(-1) // merge**2).sum(), (input_ids == token_id).sum()))
        return counts

    def _answer_positions(self, position_ids, next_position, attention_mask, continuation: int):
        if self.positions != "forward":
            return position_ids, next_position  # one forward already puts the answer where decoding does
        return super()._answer_positions(position_ids, next_position, attention_mask, continuation)

    def _prompt_positions(self, inputs: dict, input_ids, attention_mask):
        if self.positions == "release":
            position_ids = self._release_positions(inputs, input_ids, attention_mask)
            return position_ids, rules.after_largest(position_ids, attention_mask), {}
        position_ids = self._installed_positions(inputs, input_ids, attention_mask)
        if self.positions == "generate":
            return position_ids, rules.after_last(position_ids, attention_mask), {}
        return position_ids, rules.after_largest(position_ids, attention_mask), {}

    def _release_positions(self, inputs: dict, input_ids, attention_mask):
        cfg = self.model.config
        tokens_per_second = None
        if self.family == "qwen2_5_vl":
            tokens_per_second = cfg.vision_config.tokens_per_second
        return rules.release_position_ids(
            input_ids, attention_mask,
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision_config.spatial_merge_size,
            image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"), tokens_per_second=tokens_per_second,
        )

    def _installed_positions(self, inputs: dict, input_ids, attention_mask):
        """The installed transformers' get_rope_index, called as its generate calls it."""
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
        return position_ids.to(input_ids.device)

    def _tree_positions(self, state: TargetState, depth: torch.Tensor) -> torch.Tensor:
        pos = state.next_position[:, None] + depth  # [B, N+1]
        return pos[None].expand(3, *pos.shape)  # text: the three M-RoPE axes agree


Qwen2VLAdapter = QwenVLAdapter
Qwen2_5_VLAdapter = QwenVLAdapter
