"""Target adapters: the only place that knows a model family (base.py: the contract; hf.py: its
Hugging Face implementation; one small file per family)."""

from __future__ import annotations

from sparrow.targets.base import FeatureSpec, PrefillOutput, TargetAdapter, TargetState, VerifyOutput
from sparrow.targets.hf import HFTargetAdapter

SUPPORTED = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


def load_target(model, feature: FeatureSpec = FeatureSpec(), positions: str | None = None) -> TargetAdapter:
    """The adapter for a loaded Hugging Face model, picked by `model.config.model_type`.

    positions (Qwen2-VL / Qwen2.5-VL M-RoPE; positions.py): "release", the rule the models were
    released and trained with, or "generate", exactly what the installed transformers' generate
    does. None (the default): the rule the target records in its config (`sparrow_positions`, e.g.
    the world target's), else "release". LLaVA-OneVision has 1D positions: accepted, no effect."""
    from sparrow.targets.positions import resolve_rule

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    positions = resolve_rule(model, positions)
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        from sparrow.targets.qwen2_vl import QwenVLAdapter

        return QwenVLAdapter(model, feature, positions)
    if model_type == "llava_onevision":
        from sparrow.targets.llava_onevision import LlavaOnevisionAdapter

        return LlavaOnevisionAdapter(model, feature)
    raise ValueError(
        f"sparrow: unsupported target model_type {model_type!r} ({type(model).__name__}); "
        f"supported: {', '.join(SUPPORTED)}"
    )


__all__ = [
    "FeatureSpec",
    "HFTargetAdapter",
    "PrefillOutput",
    "TargetAdapter",
    "TargetState",
    "VerifyOutput",
    "load_target",
    "SUPPORTED",
]
