"""Proposing drafts: a chain (k greedy or sampled steps) or an EAGLE-2-style dynamic tree.

Both start from the draft's output at each row's last committed pair (`root_hidden` [B, H], the
predicted feature of the root) and leave the draft cache's committed part untouched: tree-node K/V
entries are written after lens[b] and are overwritten by the next pending block.

Returned drafts follow ops.verify's layout: tokens [B, N] (-1: padded), parents [B, N] (node i's
parent in 0..i-1, 0 = the root), and draft_probs [B, N, V] for sampled chains (None otherwise).

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


def propose_chain(draft, cache, root_hidden: torch.Tensor, k: int, sampling: SamplingConfig, uniforms=None):
    """k draft tokens in a chain. Greedy: argmax; temperature > 0: sampled from the draft's
    (masked, tempered) distribution q, whose rows are returned as draft_probs [B, k, V]."""
    B = root_hidden.shape[0]
    h = root_hidden
    tokens, qs = [], []
    for i in range(k):
        logits = draft.logits(h)  # [B, V]
        if sampling.greedy:
            t = logits.argmax(-1)
        else:
            q = sampling_probs(logits, sampling)
            t = sample_from(q, uniforms(B))
            qs.append(q)
        tokens.append(t)
        if i + 1 < k:
            x = draft.input_states(t[:, None], h[:, None])
            h = draft.chain_step(cache, x, i)[:, 0]
    tokens = torch.stack(tokens, 1)
    parents = torch.arange(k, device=tokens.device).expand(B, k).clone()
    return tokens, parents, (torch.stack(qs, 1) if qs else None)


def propose_tree(draft, cache, root_hidden: torch.Tensor, tree: TreeConfig):
    """EAGLE-2 dynamic tree with deterministic top-k children (module docstring). Returns tokens
    [B, N], parents [B, N], None (deterministic drafts carry no draft_probs)."""
    B, H = root_hidden.shape
    K, D, N = tree.top_k, tree.depth, tree.total_nodes
    dev = root_hidden.device
    rows = torch.arange(B, device=dev)

    def log_probs(h):  # float32 (float64 for float64 models): log-probs <= 0, so scores never grow
        logits = draft.logits(h)
        return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)

    logp = log_probs(root_hidden)  # [B, V]
    score, tok = logp.topk(K, dim=-1)  # [B, K]
    # Candidates, appended level by level: token, cumulative log-prob, parent candidate (-1: root).
    cand_tok, cand_score, cand_parent = [tok], [score], [torch.full((B, K), -1, device=dev, dtype=torch.long)]
    n_cand = K
    # The frontier: candidate ids, tokens, scores, the hidden of their parent (their h input) and the
    # index of their parent among the run nodes (-1: root).
    f_ids = torch.arange(K, device=dev).expand(B, K)
    f_tok, f_score = tok, score
    f_hidden = root_hidden[:, None].expand(B, K, H)
    f_run_parent = torch.full((B, K), -1, device=dev, dtype=torch.long)
    q_all, anc = None, None  # kept queries; ancestor mask among run nodes [B, n_run, n_run]
    for d in range(1, D):
        n_run = 0 if anc is None else anc.shape[1]
        # Ancestor rows of the new nodes: their parent's row (the root is in the prefix) plus self.
        new = torch.zeros(B, K, n_run + K, dtype=torch.bool, device=dev)
        if n_run:
            par = f_run_parent.clamp(min=0)
            prow = anc[rows[:, None], par]  # [B, K, n_run]
            new[:, :, :n_run] = prow & (f_run_parent >= 0)[..., None]
        new[:, torch.arange(K, device=dev), n_run + torch.arange(K, device=dev)] = True
        if anc is None:
            anc = new
        else:
            anc = torch.cat([torch.nn.functional.pad(anc, (0, K)), new], dim=1)
        x = draft.input_states(f_tok, f_hidden)
        depth = torch.full((B, K), d, device=dev, dtype=torch.long)
        out, q_all = draft.tree_block(cache, x, depth, q_all, anc)  # out [B, K, H]
        child_logp = log_probs(out)  # [B, K, V]
        c_lp, c_tok = child_logp.topk(K, dim=-1)  # [B, K, K]
        c_score = (f_score[..., None] + c_lp).reshape(B, K * K)
        c_tok = c_tok.reshape(B, K * K)
        c_parent = f_ids[..., None].expand(B, K, K).reshape(B, K * K)
        cand_tok.append(c_tok)
        cand_score.append(c_score)
        cand_parent.append(c_parent)
        if d + 1 < D:  # choose the next frontier among these children
            best = c_score.topk(K, dim=-1).indices  # [B, K]
            f_ids = n_cand + best
            f_tok = c_tok.gather(1, best)
            f_score = c_score.gather(1, best)
            from_node = best // K  # which frontier node (run node n_run + that) is the parent
            f_hidden = out.gather(1, from_node[..., None].expand(B, K, H))
            f_run_parent = n_run + from_node
        n_cand += K * K

    tok_all = torch.cat(cand_tok, 1)  # [B, C]
    score_all = torch.cat(cand_score, 1)
    parent_all = torch.cat(cand_parent, 1)
    # Rerank: best total_nodes by score; stable sort keeps creation order among ties (parent first).
    order = torch.sort(-score_all, dim=1, stable=True).indices[:, :N]
    keep = order.sort(dim=1).values  # [B, N] candidate ids in creation order
    node_of = torch.full_like(tok_all, -1)  # candidate id -> node id (1..N)
    node_of.scatter_(1, keep, torch.arange(1, N + 1, device=dev).expand(B, N).contiguous())
    tokens = tok_all.gather(1, keep)
    pc = parent_all.gather(1, keep)  # parent candidate id or -1
    parents = torch.where(pc < 0, torch.zeros_like(pc), node_of.gather(1, pc.clamp(min=0)))
    if bool((parents < 0).any()):  # cannot happen (see module docstring); fail loudly if it does
        raise RuntimeError("propose_tree: a kept node's parent was dropped")
    return tokens, parents, None
