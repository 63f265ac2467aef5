"""Pure-PyTorch ground truth of every sparrow op.

Each function here is the executable form of an op contract in DESIGN.md: the compiled kernels
are tested against it, `sparrow.ops` falls back to it where no compiled kernel exists, and it is
the clearest place to read what an op does. Clarity beats speed in this file.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for every float type but float64 (kept for exact tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_fc(
    token_ids: torch.Tensor,
    embed: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[N, Dout] = cat(embed[token_ids], hidden, -1) @ weight.T + bias."""
    acc = _acc_dtype(embed.dtype)
    x = torch.cat([embed[token_ids], hidden], dim=-1).to(acc)
    out = x @ weight.to(acc).T
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(embed.dtype)


def text_attention_mask(
    new_len: int,
    cache_len: int,
    total_slots: int,
    tree_mask: torch.Tensor | None,
    window: int,
) -> torch.Tensor:
    """[new_len, total_slots] bool: which cache slots each new query of one row may see."""
    prefix_end = cache_len - new_len
    prefix_start = max(0, prefix_end - window) if window > 0 else 0
    allowed = torch.zeros(new_len, total_slots, dtype=torch.bool, device=tree_mask.device if tree_mask is not None else "cpu")
    allowed[:, prefix_start:prefix_end] = True
    if tree_mask is None:
        block = torch.ones(new_len, new_len, dtype=torch.bool, device=allowed.device).tril()
    else:
        block = tree_mask.to(torch.bool)
    allowed[:, prefix_end:cache_len] = block
    return allowed


def text_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor | None,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Attention of the Lq new queries of each row over its text-only KV cache.

    q [B,Lq,hq,d]; k_cache, v_cache [B,L,hkv,d]; cache_lens [B]. The new positions of row b sit at
    slots cache_lens[b]-Lq .. cache_lens[b]-1. Query i sees every earlier (prefix) slot, the last
    `window` of them when window > 0, and new slot m where tree_mask[b,i,m] (causal m <= i without a
    mask). A query that may see nothing returns zeros.
    """
    B, Lq, hq, d = q.shape
    L, hkv = k_cache.shape[1], k_cache.shape[2]
    acc = _acc_dtype(q.dtype)
    group = hq // hkv
    out = torch.zeros(B, Lq, hq, d, dtype=acc, device=q.device)
    for b in range(B):
        n = int(cache_lens[b])
        allowed = text_attention_mask(Lq, n, L, None if tree_mask is None else tree_mask[b], window)
        allowed = allowed.to(q.device)
        k = k_cache[b].to(acc).repeat_interleave(group, dim=1)  # [L, hq, d]
        v = v_cache[b].to(acc).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].to(acc), k) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing -> zeros
        out[b] = torch.einsum("hqk,khd->qhd", probs, v)
    return out.to(q.dtype)


def gather_kv_(
    caches: torch.Tensor | list[torch.Tensor],
    src_index: torch.Tensor,
    counts: torch.Tensor,
    dst_start: torch.Tensor,
    seq_dim: int,
) -> None:
    """In place, for every tensor of `caches` (or the one tensor given): for each row b and
    m < counts[b], slot dst_start[b]+m along seq_dim takes slot src_index[b,m]. Sources ascend and
    never lie before their destination, so a forward copy is safe; this reference copies one slot
    at a time in that order."""
    for cache in [caches] if isinstance(caches, torch.Tensor) else caches:
        dim = seq_dim % cache.dim()
        for b in range(cache.shape[0]):
            row = cache[b]
            for m in range(int(counts[b])):
                src, dst = int(src_index[b, m]), int(dst_start[b]) + m
                if src != dst:
                    row.select(dim - 1, dst).copy_(row.select(dim - 1, src))


def write_kv_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    start: torch.Tensor,
    seq_dim: int,
) -> None:
    """In place: for each row b and m < M = k_new.shape[seq_dim], slot start[b]+m along seq_dim
    of k_cache / v_cache takes entry m of k_new / v_new (caches [B,L,h,d] with seq_dim 1 or
    [B,h,L,d] with seq_dim 2; the new entries in the same layout)."""
    M, L = k_new.shape[seq_dim], k_cache.shape[seq_dim]
    for b in range(k_cache.shape[0]):
        s = int(start[b])
        if not 0 <= s <= L - M:
            raise RuntimeError(f"start[{b}] = {s} must satisfy 0 <= start and start + M <= L with M = {M} and L = {L}")
        k_cache[b].narrow(seq_dim - 1, s, M).copy_(k_new[b])
        v_cache[b].narrow(seq_dim - 1, s, M).copy_(v_new[b])


def _children(tokens: torch.Tensor, parents: torch.Tensor) -> list[list[int]]:
    """children[p] = node ids (1..N) whose parent is p, in node order; padded nodes left out."""
    n = tokens.shape[0]
    kids: list[list[int]] = [[] for _ in range(n + 1)]
    for i in range(1, n + 1):
        if int(tokens[i - 1]) >= 0:
            kids[int(parents[i - 1])].append(i)
    return kids


def _sample_from(p: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from an (unnormalised, non-negative) distribution p with uniform u."""
    cdf = torch.cumsum(p.double(), 0)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    idx = min(idx, p.shape[0] - 1)
    while float(p[idx]) <= 0.0 and idx > 0:  # never land on a zero-probability token
        idx -= 1
    return idx


def verify(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept a path of the draft tree per row; see DESIGN.md ("verify") for the contract.

    draft_probs (sampled drafts) may be float32 whatever the logits' dtype: q is read as float32.

    Returns accept_len [B] (draft tokens accepted), accepted_nodes [B,N] (node ids in path order,
    -1 padded) and out_tokens [B,N+1] (accepted tokens then the new token, -1 padded).
    """
    B, N = draft_tokens.shape
    device = draft_tokens.device
    accept_len = torch.zeros(B, dtype=torch.long)
    accepted_nodes = torch.full((B, N), -1, dtype=torch.long)
    out_tokens = torch.full((B, N + 1), -1, dtype=torch.long)
    for b in range(B):
        tokens, kids = draft_tokens[b].cpu(), _children(draft_tokens[b].cpu(), parents[b].cpu())
        logits = target_logits[b].float().cpu()
        temp = float(temperature[b])
        u = uniform[b].double().cpu()
        used = 0
        node, path = 0, []
        if temp == 0.0:
            while True:
                best = int(torch.argmax(logits[node]))
                nxt = next((c for c in kids[node] if int(tokens[c - 1]) == best), None)
                if nxt is None:
                    new_token = best
                    break
                path.append(nxt)
                node = nxt
        else:
            p = torch.softmax(logits[node] / temp, dim=-1)
            while True:
                accepted = None
                for c in kids[node]:
                    x = int(tokens[c - 1])
                    # One-hot q for deterministic drafts; the draft's distribution for sampled ones.
                    if draft_probs is not None:
                        q = draft_probs[b, c - 1].float().cpu()
                    else:
                        q = torch.zeros_like(p)
                        q[x] = 1.0
                    ok = float(u[used]) * float(q[x]) < float(p[x])  # u < min(1, p(x)/q(x))
                    used += 1
                    if ok:
                        accepted = c
                        break
                    residual = torch.clamp(p - q, min=0.0)
                    total = float(residual.sum())
                    if total > 0.0:  # all zero only when p equalled q up to rounding: keep p
                        p = residual / total
                if accepted is None:
                    new_token = _sample_from(p, float(u[used]))
                    break
                path.append(accepted)
                node = accepted
                p = torch.softmax(logits[node] / temp, dim=-1)
        k = len(path)
        accept_len[b] = k
        if k:
            accepted_nodes[b, :k] = torch.tensor(path)
            out_tokens[b, :k] = tokens[torch.tensor(path) - 1]
        out_tokens[b, k] = new_token
    return accept_len.to(device), accepted_nodes.to(device), out_tokens.to(device)
