"""Typed wrappers of the compiled ops (`torch.ops.sparrow.*`), with their contracts.

The shared library `sparrow/_C*.so` registers the schemas (csrc/torch_bindings.cpp) and the CPU
and CUDA kernels. Each op also gets a fake (meta) implementation here so `torch.compile` can trace
through it. When the library has not been built, every wrapper runs the pure-PyTorch version from
`sparrow.reference` instead and says so once: slower, same results.

Bad index values (a token id past the vocabulary, a cache length past the cache...) raise a
RuntimeError that names the argument. On CPU at once. On CUDA the kernels check the values they
read and record the first bad one in an error word (csrc/error_codes.h): called directly, an op
reads the word back (one sync) and raises at once; inside `deferred_checks(device)` nothing is
read, and the decode loop raises with `raise_if_error` after its one device-to-host copy per step.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

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
    caches: torch.Tensor | Sequence[torch.Tensor],
    src_index: torch.Tensor,
    counts: torch.Tensor,
    dst_start: torch.Tensor,
    seq_dim: int,
) -> None:
    """In place, for every tensor of `caches`, per row b and m < counts[b]: slot dst_start[b]+m
    (along seq_dim) takes slot src_index[b,m].

    caches: one tensor or a list (all layers' K and V: one dispatch, one CUDA launch per 64
    tensors), each [B,L,h,d] (seq_dim=1, the draft's) or [B,h,L,d] (seq_dim=2, a Hugging Face
    cache's); all of one shape, dtype and device, any strides (views of a larger buffer too), no
    two the same memory. src_index [B,M], counts [B], dst_start [B]: int64 or int32. Sources ascend
    and never lie before their destination, so the move is safe in place. One op serves committing
    an accepted tree path (sources: the accepted nodes' slots, destination: the end of the prefix)
    and pruning (sources: the text slots, destination: 0). A call with a bad value moves nothing
    (on CUDA with checks on; see the module docstring for when it raises).
    """
    if isinstance(caches, torch.Tensor):
        caches = [caches]
    if not HAS_COMPILED_OPS:
        return _fallback("gather_kv_")(caches, src_index, counts, dst_start, seq_dim)
    torch.ops.sparrow.gather_kv_(caches, src_index, counts, dst_start, seq_dim)


def write_kv_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start: torch.Tensor,
    seq_dim: int,
) -> None:
    """In place, per row b and m < M: slot start[b]+m (along seq_dim) of k_cache / v_cache takes
    entry m of k_new / v_new. One dispatch (one CUDA launch) for both caches of a layer.

    k_cache, v_cache: [B,L,h,d] (seq_dim=1) or [B,h,L,d] (seq_dim=2), one shape; k_new, v_new: the
    same layout with M entries along seq_dim, any strides (e.g. a transposed view), k and v each
    their own; one dtype for all four (any dtype: copied by element size). start [B] int64 or
    int32 with 0 <= start[b] and start[b] + M <= L. The new entries must not share memory with the
    caches. A call with a bad start writes nothing (on CUDA with checks on).
    """
    if not HAS_COMPILED_OPS:
        return _fallback("write_kv_")(k_cache, v_cache, k_new, v_new, start, seq_dim)
    torch.ops.sparrow.write_kv_(k_cache, v_cache, k_new, v_new, start, seq_dim)


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


# ----------------------------------------------------------------------------- deferred checks

# Outermost scopes reuse one word per (thread, device) for good: a CUDA graph captured inside a
# scope keeps writing the word it was captured with, so that word must outlive every scope.
_persistent_words: dict[tuple[int, int], torch.Tensor] = {}
_scopes = threading.local()


@contextlib.contextmanager
def deferred_checks(device: torch.device | str | int) -> Iterator[torch.Tensor]:
    """Scope in which the compiled ops on a CUDA `device` check index values without syncing.

    Yields the scope's error word, an int64 tensor [code, i0, i1, i2] on `device`, zeroed on
    entry (this thread only). Inside the scope the CUDA kernels record the first bad value they
    meet in it and skip or clamp the bad item (never touching memory out of bounds); nothing is
    read on the host. Copy the word to the host with the step's other outputs and pass the copy
    to `raise_if_error`, which raises the very RuntimeError the op raises when called directly.
    Checks stay on while a CUDA graph is captured in the scope (they are device-only); a graph
    captured in an outermost scope writes the same per-thread word in every later scope. A nested
    scope on the same device gets a fresh word; on exit the previous word is restored. On CPU
    (and without compiled ops) the scope changes nothing: ops raise at once, and the yielded word
    stays zero.
    """
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not HAS_COMPILED_OPS:
        yield torch.zeros(4, dtype=torch.int64, device=device)
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    active = _scopes.__dict__.setdefault("words", {})
    previous = active.get(index)
    if previous is None:
        key = (threading.get_ident(), index)
        word = _persistent_words.get(key)
        if word is None:
            word = _persistent_words[key] = torch.zeros(4, dtype=torch.int64, device=torch.device("cuda", index))
        else:
            word.zero_()
    else:
        word = torch.zeros(4, dtype=torch.int64, device=torch.device("cuda", index))
    torch.ops.sparrow._set_error_word(index, word)
    active[index] = word
    try:
        yield word
    finally:
        torch.ops.sparrow._set_error_word(index, previous)
        if previous is None:
            del active[index]
        else:
            active[index] = previous


def raise_if_error(word: torch.Tensor | Sequence[int]) -> None:
    """Raise the RuntimeError recorded in an error word's host copy, if any (code != 0).

    word: the CPU copy of a `deferred_checks` word (an int64 CPU tensor of 4 elements) or its 4
    values as ints. The message is formatted by the same C++ table the ops raise from, so it equals
    the message of calling the op directly with the same bad value. A list costs no dispatch when
    it holds no error; a tensor costs one. A device tensor is refused: reading it here would be a
    hidden sync.
    """
    if isinstance(word, torch.Tensor):
        if word.device.type != "cpu":
            raise ValueError(
                f"raise_if_error takes the error word's host copy (a CPU tensor or 4 ints), got a tensor on "
                f"{word.device}: copy it with the step's other outputs first"
            )
        if HAS_COMPILED_OPS:
            torch.ops.sparrow._raise_error_word(word)
            return
        word = word.tolist()
    values = [int(v) for v in word]
    if len(values) != 4:
        raise ValueError(f"an error word has 4 values [code, i0, i1, i2], got {len(values)}")
    if values[0] == 0:
        return
    if not HAS_COMPILED_OPS:  # no word is ever written without the compiled ops
        raise RuntimeError(f"sparrow: error word {values}")
    torch.ops.sparrow._raise_error_word(torch.tensor(values, dtype=torch.int64))


if HAS_COMPILED_OPS:

    @torch.library.register_fake("sparrow::fused_fc")
    def _(token_ids, embed, hidden, weight, bias):
        return embed.new_empty((token_ids.shape[0], weight.shape[0]))

    @torch.library.register_fake("sparrow::text_attention")
    def _(q, k_cache, v_cache, cache_lens, tree_mask, scale, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake("sparrow::gather_kv_")
    def _(caches, src_index, counts, dst_start, seq_dim):
        return None

    @torch.library.register_fake("sparrow::write_kv_")
    def _(k_cache, v_cache, k_new, v_new, start, seq_dim):
        return None

    @torch.library.register_fake("sparrow::verify")
    def _(draft_tokens, parents, target_logits, draft_probs, temperature, uniform):
        B, N = draft_tokens.shape
        return (
            draft_tokens.new_empty((B,)),
            draft_tokens.new_empty((B, N)),
            draft_tokens.new_empty((B, N + 1)),
        )
