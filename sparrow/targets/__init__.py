"""Target adapters: the only place that knows a model family (base.py: the contract; hf.py: its
Hugging Face implementation; one small file per family)."""

from __future__ import annotations

from sparrow.targets.base import FeatureSpec, PrefillOutput, TargetAdapter, TargetState, VerifyOutput
from sparrow.targets.hf import HFTargetAdapter

SUPPORTED = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


# attn_implementation per part: Sparrow's short names -> the sub-config keys transformers takes
ATTN_PARTS = {"vision": "vision_config", "text": "text_config"}


def attn_by_subconfig(attn):
    """"sdpa" stays a name; {"vision": "sdpa", "text": "eager"} (or the sub-config keys themselves)
    -> {"vision_config": ..., "text_config": ...}, a part left out keeping sdpa."""
    if attn is None or isinstance(attn, str):
        return attn
    out = dict.fromkeys(ATTN_PARTS.values(), "sdpa")
    for part, impl in attn.items():
        key = ATTN_PARTS.get(part, part)
        if key not in out:
            raise ValueError(f"attn_implementation part {part!r}: one of {', '.join(ATTN_PARTS)}")
        out[key] = impl
    return out


def _as_dtype(dtype):
    """A torch dtype, its name, or None / "auto" (keep as saved) -> a torch dtype or None."""
    import torch

    if dtype in (None, "auto"):
        return None
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r}: not a torch dtype (float32, bfloat16, float16, ...)")
        return getattr(torch, dtype)
    return dtype


def load_model(path, device=None, dtype=None, attn_implementation=None):
    """A saved Hugging Face folder -> the model, offline, in eval mode and frozen. dtype: a torch
    dtype, its name, or None / "auto" (as saved); attn_implementation: a name or one per part
    (attn_by_subconfig), default "sdpa"."""
    import os

    import torch
    import transformers

    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: not a Hugging Face model folder (no config.json)")
    kw = {"local_files_only": True, "dtype": _as_dtype(dtype) or "auto",
          "attn_implementation": attn_by_subconfig(attn_implementation) or "sdpa"}
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kw)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model.requires_grad_(False)


def load_target(model, feature: FeatureSpec = FeatureSpec(), positions: str | None = None, *, device=None,
                dtype=None, attn_implementation=None) -> TargetAdapter:
    """The adapter for a Hugging Face model, picked by `model.config.model_type`. `model` is a
    loaded model, or a saved folder that load_model loads on `device` in `dtype` with
    `attn_implementation` (for a loaded model these move, cast or switch it).

    positions (Qwen2-VL / Qwen2.5-VL M-RoPE; positions.py): "release", the rule the models were
    released and trained with, or "generate", exactly what the installed transformers' generate
    does. None (the default): the rule the target records in its config (`sparrow_positions`, e.g.
    the world target's), else "release". LLaVA-OneVision has 1D positions: accepted, no effect."""
    import os

    from sparrow.targets.positions import resolve_rule

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device, dtype, attn_implementation)
    else:
        if attn_implementation is not None:
            model.set_attn_implementation(attn_by_subconfig(attn_implementation))
        if device is not None or _as_dtype(dtype) is not None:
            model = model.to(device=device, dtype=_as_dtype(dtype))
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
    "ATTN_PARTS",
    "attn_by_subconfig",
    "FeatureSpec",
    "HFTargetAdapter",
    "PrefillOutput",
    "TargetAdapter",
    "TargetState",
    "VerifyOutput",
    "load_model",
    "load_target",
    "SUPPORTED",
]
