"""`sparrow export-vllm DRAFT_DIR OUT_DIR`: a trained SparrowDraft as a folder vLLM loads as the
speculative model (`"method": "eagle", "model": OUT_DIR`).

The folder holds config.json, a Llama-type config (what transformers' AutoConfig and vLLM's
EAGLE config wrapper read) whose architecture is "EagleSparrowDraft" (model.py, registered by
the plugin) and whose "sparrow" entry is the draft's own DraftConfig, and model.safetensors with
the draft's tensors under their Sparrow names. Nothing of the target is copied: vLLM shares the
target's embeddings and LM head with the draft.
"""

from __future__ import annotations

import json
import os
import shutil

from sparrow.integrations.vllm.model import ARCHITECTURE


class ExportError(ValueError):
    pass


def vllm_config(cfg) -> dict:
    """The draft's DraftConfig -> the config.json vLLM reads."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "attention_bias": cfg.attention_bias,
        "max_position_embeddings": 1 << 17,
        "tie_word_embeddings": False,
        "sparrow": cfg.to_dict(),
    }


def export_vllm(draft_dir: str, out_dir: str, overwrite: bool = False) -> str:
    """Write `draft_dir` (SparrowDraft.save_pretrained) as a vLLM draft folder; returns out_dir."""
    from sparrow.draft.config import DraftConfig

    weights = os.path.join(draft_dir, "model.safetensors")
    try:
        cfg = DraftConfig.load(draft_dir)
    except FileNotFoundError as e:
        raise ExportError(f"{draft_dir}: not a saved Sparrow draft ({e})") from e
    if not os.path.exists(weights):
        raise ExportError(f"{draft_dir}: no model.safetensors (a Sparrow draft saves one)")
    if cfg.visual_source != "none":
        raise ExportError(f"{draft_dir}: a draft with visual_source={cfg.visual_source!r} reads visual states; "
                          "vLLM serves Sparrow drafts (visual_source 'none': text positions only)")
    if cfg.window:
        raise ExportError(f"{draft_dir}: a VATA window ({cfg.window}) is not supported inside vLLM yet; "
                          "export a draft trained with --window 0")
    if not cfg.feature_after_norm or cfg.feature_layer != -1:
        raise ExportError(f"{draft_dir}: vLLM gives the draft the target's final, normed hidden state; this draft "
                          f"reads layer {cfg.feature_layer} {'after' if cfg.feature_after_norm else 'before'} the norm")
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(vllm_config(cfg), f, indent=2, sort_keys=True)
    shutil.copyfile(weights, os.path.join(out_dir, "model.safetensors"))
    return out_dir
