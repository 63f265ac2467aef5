"""Typed wrappers of the compiled ops (`torch.ops.sparrow.*`), with their contracts.

The shared library `sparrow/_C*.so` registers the schemas (csrc/torch_bindings.cpp) and the CPU
and CUDA kernels. Each op also gets a fake (meta) implementation here so `torch.compile` can trace
through it. When the library has not been built, every wrapper runs the pure-PyTorch version from
`sparrow.reference` instead and says so once: slower, same results.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

from sparrow import reference

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_library() -> bool:
    if hasattr(torch.ops.sparrow, "verify"):  # loaded already (e.g. by another import path)
        return True
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")))
    if not candidates:
        return False
    torch.ops.load_library(candidates[0])
    return True


HAS_COMPILED_OPS: bool = _load_library()
_warned = False


def _fallback(name: str):
    global _warned
    if not _warned:
        warnings.warn(
            "sparrow: compiled ops not built; using the pure-PyTorch reference (run `make build` or "
            "`pip install --no-build-isolation -e .`)",
            stacklevel=3,
        )
        _warned = True
    return getattr(reference, name)


def fused_fc(
    token_ids: torch.Tensor,
    embed: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The draft's input projection: `cat(embed[token_ids], hidden) @ weight.T + bias`.

    token_ids [N] int64 in [0, V); embed [V, D]; hidden [N, H]; weight [Dout, D+H]; bias [Dout] or
    None. Returns [N, Dout] in embed's dtype, accumulated in float32 (float64 for float64). The
    gathered rows and the concatenation are never materialised.
    """
    if not HAS_COMPILED_OPS:
        return _fallback("fused_fc")(token_ids, embed, hidden, weight, bias)
    return torch.ops.sparrow.fused_fc(token_ids, embed, hidden, weight, bias)


def text_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Attention of Lq new queries per row over a text-only KV cache (the draft's VATA).

    q [B,Lq,hq,d]; k_cache, v_cache [B,L,hkv,d] with hq a multiple of hkv; cache_lens [B] int32 or
    int64. Row b's new positions are already written at slots cache_lens[b]-Lq .. cache_lens[b]-1.
    New query i sees every earlier slot (the last `window` of them if window > 0) and new slot m
    where tree_mask[b,i,m] (bool [B,Lq,Lq]; None: causal). Returns [B,Lq,hq,d].
    """
    if not HAS_COMPILED_OPS:
        return _fallback("text_attention")(q, k_cache, v_cache, cache_lens, tree_mask, scale, window)
    return torch.ops.sparrow.text_attention(q, k_cache, v_cache, cache_lens, tree_mask, float(scale), int(window))


def gather_kv_(
    cache: torch.Tensor,
    src_index: torch.Tensor,
    counts: torch.Tensor,
    dst_start: torch.Tensor,
    seq_dim: int,
) -> None:
    """In place, per row b and m < counts[b]: slot dst_start[b]+m (along seq_dim) takes slot
    src_index[b,m].

    Sources ascend and never lie before their destination. One op serves committing an accepted
    tree path (sources: the accepted nodes' slots, destination: the end of the prefix) and pruning
    (sources: the text slots, destination: 0). cache is [B,L,h,d] (seq_dim=1, the draft's) or
    [B,h,L,d] (seq_dim=2, a Hugging Face cache's); src_index [B,M] int64; counts, dst_start [B].
    """
    if not HAS_COMPILED_OPS:
        return _fallback("gather_kv_")(cache, src_index, counts, dst_start, seq_dim)
    torch.ops.sparrow.gather_kv_(cache, src_index, counts, dst_start, int(seq_dim))


def verify(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept the longest path of a draft tree (or chain) the target agrees with, per row.

    draft_tokens [B,N] int64 (-1: padded node, never accepted); parents [B,N] with node i's parent
    in 0..i-1 (node 0 is the root, the last committed token); target_logits [B,N+1,V] (row i: the
    target's prediction after node i); draft_probs [B,N,V] for sampled drafts, float32 (the q the
    tokens were drawn from, unrounded: exact sampling needs it) or target_logits' dtype, or None
    for deterministic ones; temperature [B] float32 (0: greedy); uniform [B,N+1] float32 in [0,1),
    consumed one per trial and one for the final sample. Sampled output follows the target's
    distribution exactly. Returns (accept_len [B], accepted_nodes [B,N], out_tokens [B,N+1]).
    """
    if not HAS_COMPILED_OPS:
        return _fallback("verify")(draft_tokens, parents, target_logits, draft_probs, temperature, uniform)
    return torch.ops.sparrow.verify(draft_tokens, parents, target_logits, draft_probs, temperature, uniform)


if HAS_COMPILED_OPS:

    @torch.library.register_fake("sparrow::fused_fc")
    def _(token_ids, embed, hidden, weight, bias):
        return embed.new_empty((token_ids.shape[0], weight.shape[0]))

    @torch.library.register_fake("sparrow::text_attention")
    def _(q, k_cache, v_cache, cache_lens, tree_mask, scale, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake("sparrow::gather_kv_")
    def _(cache, src_index, counts, dst_start, seq_dim):
        return None

    @torch.library.register_fake("sparrow::verify")
    def _(draft_tokens, parents, target_logits, draft_probs, temperature, uniform):
        B, N = draft_tokens.shape
        return (
            draft_tokens.new_empty((B,)),
            draft_tokens.new_empty((B, N)),
            draft_tokens.new_empty((B, N + 1)),
        )
