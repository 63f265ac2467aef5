"""The draft's KV cache: one layer, [B, C, hkv, d], ragged rows, allocated once per generation.

Row b's committed entries are slots 0 .. lens[b]-1, and slot j holds the entry at draft position j
(text index; with visual_source "mid"/"embed" the visual entries come first and take positions too).
Tree nodes of a proposal are written after lens[b] and simply left there: the next write overwrites
them, so "truncating back" costs nothing. The capacity is fixed when the cache is made (the prompt,
max_new_tokens and the widest proposal): no step reads the device to size it, none grows it. A
write past the capacity is an error of ops.write_kv_ (checked on the device). It also holds the
rotary angles of its slots, so that a compiled step sees them as inputs of the cache's size.
"""

from __future__ import annotations

import torch

from sparrow import ops


class DraftCache:
    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype, device, capacity: int, rotary: tuple):
        self.k = torch.zeros(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(batch, dtype=torch.long, device=device)  # committed entries per row
        self.rotary = rotary  # (cos, signed sin) [capacity, 1, d]: the rotary angle of every slot

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, offset: torch.Tensor) -> None:
        """Write k_new/v_new [B, M, hkv, d] at slots offset[b] .. offset[b]+M-1 of each row."""
        ops.write_kv_(self.k, self.v, k_new, v_new, offset, 1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows leave the batch)."""
        self.k = self.k[rows]
        self.v = self.v[rows]
        self.lens = self.lens[rows]
