"""Verification attention for Hugging Face decoders through sparrow.ops.text_attention.

A verify step feeds N+1 tree nodes to the target. Through SDPA that needs a [B,1,N+1,L+N+1] mask
over the whole cache, which on CPU sends SDPA to its slow masked path and repeats the key/value
heads for GQA. When every row's live prefix is the whole cache (batch 1, or rows of equal length
without left padding) the mask is "all of the prefix, plus the tree's ancestors" - exactly
text_attention's contract - so the decoder's attention can run through that op instead, on the
cache as HF stores it (no copy, GQA shared). The adapters use this for every such verify call
on CPU (HFTargetAdapter.use_tree_attention), autoregressive steps (N = 0) included, so a speed-up
figure compares like with like.

    with tree_attention(text_config):
        language_model(..., attention_mask={layer_type: TreeBlock(ancestors)}, ...)

Any other mask (prefill, a ragged batch) is passed on to transformers' own SDPA function.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparrow import ops

NAME = "sparrow_tree"


@dataclass
class TreeBlock:
    """The mask of a verify block whose rows all see the whole cache before it:
    ancestors [B, N+1, N+1] bool, True where node i may attend to node m."""

    ancestors: torch.Tensor


def _tree_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function signature: query [B,hq,Q,d], key/value [B,hkv,K,d]
    (the whole cache, the new block last); returns ([B,Q,hq,d], None)."""
    if not isinstance(attention_mask, TreeBlock):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    B, _, Q, d = query.shape
    lens = torch.full((B,), key.shape[2], dtype=torch.long, device=query.device)
    scale = d ** -0.5 if scaling is None else scaling
    out = ops.text_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), lens,
                             attention_mask.ancestors, scale)
    return out, None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _tree_attention_forward)
        _registered = True


@contextmanager
def tree_attention(text_config):
    """Route the decoder's attention through _tree_attention_forward for the duration."""
    _register()
    previous = text_config._attn_implementation
    text_config._attn_implementation = NAME
    try:
        yield
    finally:
        text_config._attn_implementation = previous
