"""Target adapters: the only place that knows a model family (base.py: the contract; hf.py: its
Hugging Face implementation; one small file per family)."""

from __future__ import annotations

from sparrow.targets.base import FeatureSpec, PrefillOutput, TargetAdapter, TargetState, VerifyOutput
from sparrow.targets.hf import HFTargetAdapter

SUPPORTED = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


def load_target(model, feature: FeatureSpec = FeatureSpec()) -> TargetAdapter:
    """The adapter for a loaded Hugging Face model, picked by `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        from sparrow.targets.qwen2_vl import QwenVLAdapter

        return QwenVLAdapter(model, feature)
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
