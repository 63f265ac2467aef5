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
    """Inverse-CDF draw from p [..., V] with uniforms u [...] in [0, 1); never a zero-probability
    token. No host read: the rounding guard is applied unconditionally."""
    cdf = p.double().cumsum(-1)
    target = (u.double() * cdf[..., -1])[..., None]
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=p.shape[-1] - 1)
    # searchsorted can land on a zero-width step only through rounding: fall back to the argmax.
    return torch.where(p.gather(-1, idx) > 0, idx, p.argmax(-1, keepdim=True)).squeeze(-1)


# splitmix64 (Steele et al.): constants as signed int64, the form torch's integer ops take.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _splitmix64_int(x: int) -> int:
    """The same on a Python int (the seeds are mixed on the host once per generation)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


class RowUniforms:
    """Uniforms in [0, 1) drawn on the device from one counter-based stream per request row.

    Row r reads splitmix64(key_r + (counter << 20) + j) for draw `counter` and element j, with key_r
    a mix of (seed, r) made on the host once (or of (seed[r], 0) for a list of per-row seeds, so
    seed=[s] for a batch of one is row r of seed=[.., s, ..]). Every draw advances the
    counter of every row alike, and a row's numbers depend only on its own key, so its sampled
    output does not depend on which rows share its batch, and rows leaving the batch is a row
    selection. The same seed gives the same numbers on every device. No host read, no Python loop
    over rows; the counter is a device tensor, so a compiled step does not recompile per draw.
    """

    def __init__(self, seed, rows: int, device):
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        if isinstance(seed, int):
            pairs = [(seed, r) for r in range(rows)]
        elif len(seed) == rows:
            pairs = [(int(s), 0) for s in seed]
        else:
            raise ValueError(f"seed: an int or one seed per row ({rows}), got {len(seed)} seeds")
        keys = [_splitmix64_int(_splitmix64_int(s) ^ r) for s, r in pairs]
        self.keys = torch.tensor(keys, dtype=torch.long, device=device)  # [B]
        self.counter = torch.zeros((), dtype=torch.long, device=device)

    def draw(self, n: int) -> torch.Tensor:
        """[B, n] float32 uniforms (24 random bits each: exact in float32, never 1.0)."""
        j = torch.arange(n, device=self.keys.device)
        bits = splitmix64(self.keys[:, None] + (self.counter << 20) + j)
        self.counter += 1
        return _shr(bits, 40).to(torch.float32) * (1.0 / (1 << 24))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.keys = self.keys[rows]
