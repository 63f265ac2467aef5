"""Sampling settings shared by the loop and the draft: temperature, top-k / top-p masking (as -inf,
the form ops.verify takes), seeded uniforms, inverse-CDF draws.

Order as in Hugging Face generate: logits / temperature, then top-k, then top-p. The mask is
computed on the tempered logits and applied to the raw ones, so softmax(masked / T) is exactly the
distribution HF samples from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] -> the same logits with the tokens outside top-k / top-p set to -inf (greedy or
    no filtering: unchanged)."""
    if cfg.greedy or (cfg.top_k == 0 and cfg.top_p >= 1.0):
        return logits
    scaled = logits.float() / cfg.temperature if logits.dtype != torch.float64 else logits / cfg.temperature
    remove = torch.zeros_like(scaled, dtype=torch.bool)
    V = scaled.shape[-1]
    if 0 < cfg.top_k < V:
        kth = torch.topk(scaled, cfg.top_k, dim=-1).values[..., -1:]
        remove |= scaled < kth
        scaled = scaled.masked_fill(remove, float("-inf"))
    if cfg.top_p < 1.0:
        # HF TopPLogitsWarper: sort ascending, drop the tokens whose cumulative mass is <= 1 - top_p,
        # always keep the most likely one.
        sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - cfg.top_p)
        drop_sorted[..., -1] = False
        remove |= drop_sorted.scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(remove, float("-inf"))


def probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampling distribution softmax(mask(logits) / T) (float32, float64 for float64)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(mask_logits(logits, cfg).to(acc) / cfg.temperature, dim=-1)


def sample_from(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from p [..., V] with uniforms u [...] in [0, 1); never a zero-probability token."""
    cdf = p.double().cumsum(-1)
    target = (u.double() * cdf[..., -1])[..., None]
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=p.shape[-1] - 1)
    # Land on a token with mass (searchsorted can hit a zero-width step only through rounding).
    bad = p.gather(-1, idx) <= 0
    if bool(bad.any()):
        idx = torch.where(bad, p.argmax(-1, keepdim=True), idx)
    return idx.squeeze(-1)


class UniformSource:
    """Seeded uniforms for ops.verify and first-token draws: one generator per generation, on the
    CPU so that the same seed gives the same numbers on every device."""

    def __init__(self, seed: int | None, device):
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(int(seed))
        self.device = device

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float32).to(self.device)
