"""DraftConfig: everything that defines a Sparrow draft, JSON-serialisable (config.json)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

VISUAL_SOURCES = ("none", "mid", "embed")

# Text-config model types whose decoder layers carry q/k/v biases (the Qwen2 family; LLaVA-OneVision's
# language model is a Qwen2 too).
_QKV_BIAS_TYPES = ("qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")


@dataclass
class DraftConfig:
    """Shape and behaviour of the draft.

    target: the target's identity (TargetAdapter.identity()); checked when a draft is loaded.
    hidden_size .. vocab_size: the single decoder layer's shape, derived from the target's text
        config (hidden = the target's hidden, so the predicted feature lives in its feature space).
    feature_layer / feature_after_norm: which target state h is (FeatureSpec). When the features are
        taken before the final norm, logits = lm_head(final_norm(h_hat)); after it, lm_head(h_hat).
    window: VATA window: a new query sees the last `window` cached entries (0: every text entry).
    visual_source: "none" (Sparrow, VATA: the draft's cache holds text positions only), "mid"
        (no-VATA ablation: the target's layer-`mid_layer` visual states go in front of the text in
        the draft's cache) or "embed" (MSD-style baseline: the visual input embeddings instead).
    mid_layer: the target layer whose visual states "mid" uses (default num_hidden_layers // 2).
    attention_bias: q/k/v projections with bias (as the Qwen2 family's decoder layers).
    initializer_range: std of the normal init of the trained weights.
    """

    target: dict = field(default_factory=dict)
    hidden_size: int = 0
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    vocab_size: int = 0
    feature_layer: int = -1
    feature_after_norm: bool = True
    window: int = 0
    visual_source: str = "none"
    mid_layer: int | None = None
    attention_bias: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.visual_source not in VISUAL_SOURCES:
            raise ValueError(f"DraftConfig.visual_source must be one of {VISUAL_SOURCES}, got {self.visual_source!r}")
        if self.window < 0:
            raise ValueError(f"DraftConfig.window must be >= 0 (0: all text), got {self.window}")
        if self.feature_after_norm and self.feature_layer != -1:
            raise ValueError("DraftConfig.feature_after_norm=True needs feature_layer=-1 (the final norm follows the last layer)")
        if self.hidden_size and self.num_attention_heads:
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"DraftConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )

    @classmethod
    def from_text_config(cls, text_config, identity: dict, **overrides) -> "DraftConfig":
        """Derive the draft's layer shape from a Hugging Face text config."""
        tc = text_config
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        rope = getattr(tc, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", None) if isinstance(rope, dict) else None
        if rope_theta is None:
            rope_theta = getattr(tc, "rope_theta", 10000.0)
        bias = getattr(tc, "attention_bias", None)
        if bias is None:
            bias = getattr(tc, "model_type", "") in _QKV_BIAS_TYPES
        values = dict(
            target=dict(identity),
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            vocab_size=tc.vocab_size,
            mid_layer=tc.num_hidden_layers // 2,
            attention_bias=bool(bias),
            initializer_range=float(getattr(tc, "initializer_range", 0.02)),
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"DraftConfig: unknown settings {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DraftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"DraftConfig: unknown keys in config {sorted(unknown)}")
        return cls(**d)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> "DraftConfig":
        path = os.path.join(directory, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no draft config at {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))
