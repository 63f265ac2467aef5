"""What a generation measured: GenerationStats, and the recorder the loop feeds.

The recorder reads only what the loop already has on the host (each step's accepted counts come
with the step's one device-to-host copy), so recording costs no device read. Wall-clock stage
times need the device to have finished each stage: they are taken only when asked for
(`time_stages=True`, as the demo and the benchmarks do), since every such timer synchronises.
Without them a generation is timed at its natural sync points: the copy of the first tokens after
prefill and the step copies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class GenerationStats:
    mode: str = ""  # "sparrow-tree", "sparrow-chain", "autoregressive"
    steps: int = 0  # verify steps (batched)
    row_steps: int = 0  # sum over steps of the rows in the batch
    accepted_per_step: float = 0.0  # mean draft tokens accepted per row per verify step
    tokens_per_step: float = 0.0  # accepted_per_step + 1 (EAGLE's tau)
    accept_histogram: list = field(default_factory=list)  # [n]: row-steps that accepted n draft tokens
    new_tokens: int = 0  # tokens returned, all rows (after trimming at EOS / max_new_tokens)
    prefill_s: float = 0.0  # target prefill + first token + draft prefill
    draft_prefill_s: float = 0.0  # the draft's share of prefill_s (time_stages only)
    draft_s: float = 0.0  # proposing + committing the accepted path (time_stages only)
    verify_s: float = 0.0  # target verify forward + ops.verify + commit (time_stages only)
    decode_s: float = 0.0  # everything after prefill
    total_s: float = 0.0
    tokens_per_s: float = 0.0  # new_tokens / total_s
    decode_tokens_per_s: float = 0.0  # (new_tokens - first tokens) / decode_s

    def as_dict(self) -> dict:
        return asdict(self)


class StatsRecorder:
    """Timers and counters of one generation. `lap(stage)` charges the time since the previous
    lap to `stage` when stage times are on, and does nothing (no sync) otherwise."""

    def __init__(self, mode: str, device, time_stages: bool = False):
        self.stats = GenerationStats(mode=mode)
        self.time_stages = time_stages
        self._cuda = torch.device(device).type == "cuda"
        self._hist: list[int] = []
        self._t0 = self._last = time.perf_counter()
        self._decode_start = self._t0

    def _now(self, sync: bool) -> float:
        if sync and self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self) -> None:
        """Start the next lap here (stage times only)."""
        if self.time_stages:
            self._last = self._now(sync=True)

    def lap(self, stage: str) -> None:
        if not self.time_stages:
            return
        now = self._now(sync=True)
        name = f"{stage}_s"
        setattr(self.stats, name, getattr(self.stats, name) + now - self._last)
        self._last = now

    def prefill_done(self) -> None:
        """Called right after the host copy of the first tokens (the device is idle then)."""
        self._decode_start = self._last = self._now(sync=False)
        self.stats.prefill_s = self._decode_start - self._t0

    def step(self, accepted: list[int]) -> None:
        """One verify step: the accepted draft-token count of every row in the batch (host ints)."""
        s = self.stats
        s.steps += 1
        s.row_steps += len(accepted)
        for a in accepted:
            if a >= len(self._hist):
                self._hist += [0] * (a + 1 - len(self._hist))
            self._hist[a] += 1
        self._last = self._now(sync=False)  # after the step's host copy: the device has caught up

    def finish(self, outputs: list[list[int]]) -> GenerationStats:
        s = self.stats
        end = self._now(sync=True)
        s.decode_s, s.total_s = end - self._decode_start, end - self._t0
        s.new_tokens = sum(len(o) for o in outputs)
        s.accept_histogram = list(self._hist)
        if s.row_steps:
            s.accepted_per_step = sum(n * c for n, c in enumerate(self._hist)) / s.row_steps
            s.tokens_per_step = s.accepted_per_step + 1
        s.tokens_per_s = s.new_tokens / s.total_s if s.total_s > 0 else 0.0
        decode_tokens = s.new_tokens - len(outputs)
        s.decode_tokens_per_s = decode_tokens / s.decode_s if s.decode_s > 0 else 0.0
        return s
