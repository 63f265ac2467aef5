"""The target's attention during verify: each row sees its committed prefix whole, and inside the
tree block only its ancestors and itself.

The Hugging Face decoder layers run unchanged; for the duration of a verify forward their attention
implementation is sparrow's (registered with transformers' AttentionInterface), which receives the
whole static cache (kv_cache.py: [B, C, hkv, d] per layer, the block already written) and a
VerifyBlock as the attention mask. Two backends, chosen per adapter
(`target = sparrow.load_target(model); target.verify_attention = "sdpa"`):

- "sparrow" (the default, CPU and CUDA): ops.text_attention, whose contract is exactly this mask:
  one op call per layer, the K/V heads shared by their query group (no repeat), no mask tensor over
  the cache, every row's work clipped to its own length.
- "sdpa": torch's scaled_dot_product_attention with enable_gqa over a [B, 1, N+1, C] bool mask built
  once per step (prefix + tree block) and shared by every layer. Kept as a cross-check and a
  fallback: with a mask, CUDA SDPA (torch 2.11, the GPU machines' version) has no fused kernel that
  takes grouped heads and falls back to its math path, which repeats the K/V heads and
  materialises the scores.

Why not flex_attention: it needs torch.compile for every call to be fast, builds its block mask per
step, and on CPU compiles slowly; a GPU measurement (`make gpu-check`) decides between the kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparrow import ops

NAME = "sparrow_verify"
BACKENDS = ("sparrow", "sdpa")


@dataclass
class VerifyBlock:
    """The attention mask of one verify forward, shared by every layer."""

    cache_lens: torch.Tensor  # [B]: lens + N + 1, the slots each row attends over
    visible: torch.Tensor  # [B, N+1, N+1] bool: node i sees node j (ancestors and itself)
    dense: torch.Tensor | None = None  # [B, 1, N+1, C] bool, the same as one mask ("sdpa" only)

    @classmethod
    def build(cls, lens: torch.Tensor, visible: torch.Tensor, capacity: int, backend: str) -> "VerifyBlock":
        n1 = visible.shape[-1]
        block = cls(lens + n1, visible.contiguous())  # a chain's is expanded: copy it once, not per layer
        if backend == "sdpa":
            slots = torch.arange(capacity, device=lens.device)
            rel = slots[None] - lens[:, None]  # [B, C]: slot's index inside the block
            in_block = (rel >= 0) & (rel < n1)
            tree = visible.gather(2, rel.clamp(0, n1 - 1)[:, None, :].expand(-1, n1, -1)) & in_block[:, None]
            block.dense = ((rel < 0)[:, None] | tree)[:, None]
        return block


def _verify_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query [B, hq, N+1, d]; key, value: the whole
    cache [B, C, hkv, d]; returns ([B, N+1, hq, d], None)."""
    block: VerifyBlock = attention_mask
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if block.dense is None:
        out = ops.text_attention(query.transpose(1, 2), key, value, block.cache_lens, block.visible, scale)
        return out, None
    out = F.scaled_dot_product_attention(query, key.transpose(1, 2), value.transpose(1, 2), attn_mask=block.dense,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2), None


_registered = False


@contextmanager
def verify_attention(text_config):
    """Route the decoder's attention through _verify_attention for the duration of a forward."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _verify_attention)
        _registered = True
    previous = text_config._attn_implementation
    text_config._attn_implementation = NAME
    try:
        yield
    finally:
        text_config._attn_implementation = previous
