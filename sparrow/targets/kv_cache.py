"""The target's KV cache for one generation: allocated once, written in place, compacted in place.

Per layer, K and V are [B, C, hkv, d] (text_attention's layout), C = the prompt + max_new_tokens +
the tree, rounded up (compiling.round_capacity: compiled steps then see few distinct shapes). Row b's
committed entries are slots 0 .. lens[b]-1 (the adapter keeps lens): after prefill the rows are
left-aligned, whatever their padding was. A verify writes the root and the N tree nodes of row b
at slots lens[b] .. lens[b]+N; commit moves the accepted ones down behind the root with one
ops.gather_kv_ over every layer. Nothing is concatenated, cropped or reallocated per step.

Hugging Face attention layers call `update(key_states, value_states, layer_idx)` and attend over
what it returns. During prefill (`write_at` None) the prompt's entries go to slots 0..S-1 and are
returned as given, for the model's own attention; during verify they go to slots write_at[b]..,
and the whole cache is returned for sparrow's verify attention (verify_attention.py).
"""

from __future__ import annotations

import torch

from sparrow import ops
from sparrow.compiling import mark_static


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, capacity, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_at: torch.Tensor | None = None  # [B] first slot of the block being verified
        self._static = False  # marked for compiled steps (mark_static)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    # -- what Hugging Face attention layers call ------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states [B, hkv, M, d] of one layer's new block."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.write_at is None:  # prefill: slots 0..M-1, the model attends within the prompt
            M = key_states.shape[2]
            k[:, :M].copy_(key_states.transpose(1, 2))
            v[:, :M].copy_(value_states.transpose(1, 2))
            return key_states, value_states
        ops.write_kv_(k, v, key_states.transpose(1, 2), value_states.transpose(1, 2), self.write_at, 1)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly; nothing should derive them from here

    # -- what the adapter calls ---------------------------------------------------------------------
    def move(self, src_index: torch.Tensor, counts: torch.Tensor, dst_start: torch.Tensor) -> None:
        """Per row b and m < counts[b]: slot dst_start[b]+m takes slot src_index[b, m], in every
        layer's K and V, in one op call (ops.gather_kv_)."""
        ops.gather_kv_(self.keys + self.values, src_index, counts, dst_start, 1)

    def mark_static(self) -> None:
        """For compiled steps: every layer's K and V keep their address (compiling.mark_static)."""
        if not self._static:
            mark_static(*self.keys, *self.values)
            self._static = True

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (rows leaving the batch: once per finished row, not per step)."""
        for i in range(len(self.keys)):  # one layer at a time: the peak is one layer over the cache
            self.keys[i] = self.keys[i][rows]
            self.values[i] = self.values[i][rows]
        self._static = False
