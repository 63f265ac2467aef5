"""Proposing drafts: a chain (k greedy or sampled steps) or an EAGLE-2-style dynamic tree.

Both start from the draft's output at each row's last committed pair (`root_hidden` [B, H], the
predicted feature of the root) and leave the draft cache's committed part untouched: tree-node K/V
entries are written after lens[b] and are overwritten by the next pending block.

Proposals come back as sparrow.tree.Tree: ops.verify's layout (tokens [B, N], -1 padded; parents
[B, N], node i's parent in 0..i-1, 0 = the root; draft_probs [B, N, V] for sampled chains, float32,
float64 for float64 drafts)
plus every node's depth and ancestor mask, which the target's verify needs and which the proposer
knows already (no loop over nodes anywhere). Everything here runs inside the decode step: no host
read, static shapes, so the whole proposal compiles into one graph.

Dynamic tree (EAGLE-2): depth-1 candidates are the root's top_k tokens. At each depth d < depth,
the top_k candidates of depth d by cumulative log-prob (the frontier) run through the draft, and each
contributes its top_k children as depth-(d+1) candidates. Finally all candidates (top_k +
(depth-1)*top_k^2 of them) are reranked by cumulative log-prob and the best total_nodes kept, in
creation order so parents precede children. A child's cumulative log-prob never exceeds its
parent's, and ties are broken by creation order, so every kept node's parent is kept too.

Tree expansion vs ops.text_attention's contract (the prefix is fully visible to new queries): the
frontier's ancestors are earlier tree nodes, but so are other branches, which must stay hidden. So
the whole tree-so-far is passed as the new block with its ancestor mask; earlier nodes' K/V are
written once and their queries are kept from the depth that created them (no recomputation of the
projections); only the attention of the kept queries is redone (cheap: <= depth*top_k queries over
a text-only cache), and only the new frontier's outputs go through o_proj and the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow.sampling import SamplingConfig, probs as sampling_probs, sample_from
from sparrow.tree import Tree


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 dynamic tree: `depth` levels (the deepest node's depth), `top_k` children per
    expanded node and `top_k` expanded nodes per level, `total_nodes` kept after the rerank."""

    depth: int = 6
    top_k: int = 10
    total_nodes: int = 60

    def max_nodes(self) -> int:
        return self.top_k + (self.depth - 1) * self.top_k * self.top_k

    def validate(self, vocab_size: int | None = None) -> None:
        for name in ("depth", "top_k", "total_nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TreeConfig.{name} must be an integer >= 1, got {v!r}")
        if self.total_nodes > self.max_nodes():
            raise ValueError(
                f"TreeConfig.total_nodes={self.total_nodes} exceeds the {self.max_nodes()} candidates a tree "
                f"of depth {self.depth} and top_k {self.top_k} has (top_k + (depth-1)*top_k^2)"
            )
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"TreeConfig.top_k={self.top_k} exceeds the vocabulary ({vocab_size})")


def proposal_width(tree: TreeConfig | None, chain: int | None) -> int:
    """Draft cache entries a proposal writes past the committed ones (and the pending block after it)."""
    if chain is not None:
        return chain + 1
    return max((tree.depth - 1) * tree.top_k, tree.depth + 1)


def propose_chain(draft, cache, root_hidden: torch.Tensor, k: int, sampling: SamplingConfig,
                  uniforms: torch.Tensor | None = None) -> Tree:
    """k draft tokens in a chain. Greedy: argmax; temperature > 0: drawn from the draft's (masked,
    tempered) distribution q with uniforms [B, k], whose rows come back as the tree's draft_probs
    [B, k, V] in float32 (ops.verify's exact sampling needs q as it was drawn from)."""
    h = root_hidden
    tokens, qs = [], []
    for i in range(k):
        logits = draft.logits(h)  # [B, V]
        if sampling.greedy:
            t = logits.argmax(-1)
        else:
            q = sampling_probs(logits, sampling)
            t = sample_from(q, uniforms[:, i])
            qs.append(q)
        tokens.append(t)
        if i + 1 < k:
            x = draft.input_states(t[:, None], h[:, None])
            h = draft.chain_step(cache, x, i)[:, 0]
    return Tree.chain(torch.stack(tokens, 1), torch.stack(qs, 1) if qs else None)


def _log_probs(draft, h: torch.Tensor) -> torch.Tensor:
    """float32 (float64 for float64 models) log-probs <= 0, so cumulative scores never grow."""
    logits = draft.logits(h)
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)


def propose_tree(draft, cache, root_hidden: torch.Tensor, cfg: TreeConfig) -> Tree:
    """EAGLE-2 dynamic tree with deterministic top-k children (module docstring): a Tree of
    cfg.total_nodes nodes. Every candidate carries its path, the candidate ids of its ancestors at
    depths 1..D and itself (-1 below), from which the expansion's attention masks, the kept nodes'
    parents, depths and ancestor masks all follow with a few tensor ops."""
    B, H = root_hidden.shape
    K, D = cfg.top_k, cfg.depth
    dev = root_hidden.device
    level = torch.arange(D, device=dev)
    children = torch.arange(K * K, device=dev)

    score, tok = _log_probs(draft, root_hidden).topk(K, dim=-1)  # [B, K]: depth-1 candidates 0..K-1
    f_ids = children[:K].expand(B, K)  # the frontier: candidate ids, tokens, scores, paths and the
    f_tok, f_score = tok, score  # hidden of their parent (their h input)
    f_paths = torch.where(level == 0, f_ids[..., None], -1)  # [B, K, D]
    f_hidden = root_hidden[:, None].expand(B, K, H)
    cand_tok, cand_score, cand_paths = [tok], [score], [f_paths]
    run_ids, run_paths = [], []  # the expanded nodes so far (their K/V sit after the cache's lens)
    q_all, n_cand = None, K
    root_position = (cache.lens - 1)[:, None]  # [B, 1]: a node's position is this + its depth
    for d in range(1, D):
        run_ids.append(f_ids)
        run_paths.append(f_paths)
        ids, paths = torch.cat(run_ids, 1), torch.cat(run_paths, 1)  # [B, n], [B, n, D]
        sees = (paths[:, :, :, None] == ids[:, None, None, :]).any(2)  # [B, n, n]: ancestors and self
        x = draft.input_states(f_tok, f_hidden)
        out, q_all = draft.tree_block(cache, x, root_position + d, q_all, sees)
        c_lp, c_tok = _log_probs(draft, out).topk(K, dim=-1)  # [B, K, K]
        c_score = (f_score[..., None] + c_lp).reshape(B, K * K)
        c_tok = c_tok.reshape(B, K * K)
        c_paths = f_paths[:, :, None].expand(B, K, K, D).reshape(B, K * K, D)
        c_paths = torch.where(level == d, (n_cand + children)[:, None], c_paths)
        cand_tok.append(c_tok)
        cand_score.append(c_score)
        cand_paths.append(c_paths)
        if d + 1 < D:  # the next frontier: the best K of these children
            best = c_score.topk(K, dim=-1).indices  # [B, K]
            f_ids, f_tok, f_score = n_cand + best, c_tok.gather(1, best), c_score.gather(1, best)
            f_paths = c_paths.gather(1, best[..., None].expand(B, K, D))
            f_hidden = out.gather(1, (best // K)[..., None].expand(B, K, H))
        n_cand += K * K
    return _keep_best(torch.cat(cand_tok, 1), torch.cat(cand_score, 1), torch.cat(cand_paths, 1), cfg)


def _keep_best(tok_all: torch.Tensor, score_all: torch.Tensor, paths: torch.Tensor, cfg: TreeConfig) -> Tree:
    """Rerank: the best N candidates by score, in creation order (a stable sort keeps the parent
    before its children among ties, so every kept node's parent is kept: module docstring)."""
    B, N = tok_all.shape[0], cfg.total_nodes
    dev = tok_all.device
    keep = torch.sort(-score_all, dim=1, stable=True).indices[:, :N].sort(dim=1).values  # [B, N] candidate ids
    kept_paths = paths.gather(1, keep[..., None].expand(-1, -1, cfg.depth))  # [B, N, D]
    depth = (kept_paths >= 0).sum(-1)  # [B, N], 1..D
    parent_cand = kept_paths.gather(2, (depth - 2).clamp(min=0)[..., None]).squeeze(-1)  # the path one up
    node_of = torch.zeros_like(tok_all).scatter_(1, keep, torch.arange(1, N + 1, device=dev).expand(B, N))
    parents = torch.where(depth > 1, node_of.gather(1, parent_cand), 0)
    ancestors = (kept_paths[:, :, :, None] == keep[:, None, None, :]).any(2)  # [B, N, N], self included
    visible = torch.cat([torch.ones(B, N, 1, dtype=torch.bool, device=dev), ancestors], 2)
    root = (torch.arange(N + 1, device=dev) == 0).expand(B, 1, N + 1)  # the root sees itself only
    visible = torch.cat([root, visible], 1)
    depths = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), depth], 1)
    return Tree(tok_all.gather(1, keep), parents, depths, visible, max_depth=cfg.depth)
