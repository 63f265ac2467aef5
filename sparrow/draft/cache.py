"""The draft's KV cache: one layer, [B, L, hkv, d], ragged rows.

Row b's committed entries are slots 0 .. lens[b]-1, and slot j holds the entry at draft position j
(text index; with visual_source "mid"/"embed" the visual entries come first and take positions too).
Tree nodes of a proposal are written after lens[b] and simply left there: the next write overwrites
them, so "truncating back" costs nothing. Capacity grows by doubling.
"""

from __future__ import annotations

import torch


class DraftCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 256):
        self.k = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)  # committed entries per row

    @property
    def batch_size(self) -> int:
        return int(self.k.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.k.shape[1])

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots per row (needed = max(lens) + new entries)."""
        if needed <= self.capacity:
            return
        cap = self.capacity
        while cap < needed:
            cap *= 2
        B, _, h, d = self.k.shape
        k = self.k.new_zeros(B, cap, h, d)
        v = self.v.new_zeros(B, cap, h, d)
        k[:, : self.capacity] = self.k
        v[:, : self.capacity] = self.v
        self.k, self.v = k, v

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Write k_new/v_new [B, M, hkv, d] at slots offset[b] .. offset[b]+M-1 of each row; returns
        the slot index [B, M] (which is also each entry's position)."""
        B, M = k_new.shape[:2]
        slots = offset[:, None] + torch.arange(M, device=offset.device)[None]  # [B, M]
        self.reserve(int(slots.max()) + 1 if M else 0)
        rows = torch.arange(B, device=offset.device)[:, None].expand(B, M)
        self.k[rows, slots] = k_new.to(self.k.dtype)
        self.v[rows, slots] = v_new.to(self.v.dtype)
        return slots

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows leave the batch)."""
        self.k = self.k[rows]
        self.v = self.v[rows]
        self.lens = self.lens[rows]
