"""A draft that knows the answer: proposals from each row's known greedy continuation, so that the
loop accepts many tokens per step (deep tree nodes included) while the real draft still runs its
prefill, commit and row selection. Greedy only. Tests that use it route the loop's proposals here
with the `route_proposals(monkeypatch)` of an autouse fixture."""

from __future__ import annotations

import dataclasses

import torch

from sparrow.draft import SparrowDraft
from sparrow.tree import Tree
from tiny_models import TEXT_LO


class OracleDraft(SparrowDraft):
    """refs[row]: the row's known greedy tokens, the root (first generated token) first. Per row and
    step, a path whose first `a` tokens are right (a drawn in 0..depth from `rng`, per row) and whose
    rest is wrong, plus a wrong sibling at every depth."""

    refs: dict | list = {}
    rng: torch.Generator | None = None

    def prefill(self, pre, root_tokens, decode_slots=256):
        cache, root_hidden = super().prefill(pre, root_tokens, decode_slots)
        cache.rows = list(range(len(root_tokens)))
        cache.done = [1] * len(root_tokens)  # tokens of each row's answer so far (the root's included)
        plain = cache.select_rows

        def select_rows(idx):
            plain(idx)
            cache.rows = [cache.rows[i] for i in idx.tolist()]
            cache.done = [cache.done[i] for i in idx.tolist()]

        cache.select_rows = select_rows
        return cache, root_hidden

    def commit(self, cache, tokens, features, counts):
        cache.done = [d + c for d, c in zip(cache.done, counts.tolist())]
        return super().commit(cache, tokens, features, counts)

    def oracle_tree(self, cache, depth: int) -> Tree:
        """Node 2d+1 (d = 0..depth-1): the path's token at depth d+1; node 2d+2: its wrong sibling."""
        B = len(cache.rows)
        tokens = torch.zeros(B, 2 * depth, dtype=torch.long)
        parents = torch.zeros(B, 2 * depth, dtype=torch.long)
        for b, (r, g) in enumerate(zip(cache.rows, cache.done)):
            right = (list(self.refs[r]) + [-1] * (g + depth))[g : g + depth]
            a = int(torch.randint(0, depth + 1, (1,), generator=self.rng))
            for d in range(depth):
                wrong = [t for t in range(TEXT_LO, TEXT_LO + 3) if t != right[d]]
                path_tok = right[d] if d < a and right[d] >= 0 else wrong[0]
                parent = 0 if d == 0 else 2 * d - 1  # the path node one level up (node ids from 1)
                tokens[b, 2 * d], parents[b, 2 * d] = path_tok, parent
                tokens[b, 2 * d + 1], parents[b, 2 * d + 1] = wrong[1], parent
        return dataclasses.replace(Tree.from_parents(tokens, parents), max_depth=depth)


def route_proposals(monkeypatch) -> None:
    """The loop asks sparrow.drafting for proposals; an OracleDraft answers them itself."""
    from sparrow import drafting

    plain_tree, plain_chain = drafting.propose_tree, drafting.propose_chain

    def propose_tree(draft, cache, root_hidden, tree):
        if isinstance(draft, OracleDraft):
            return draft.oracle_tree(cache, tree.depth)
        return plain_tree(draft, cache, root_hidden, tree)

    def propose_chain(draft, cache, root_hidden, k, sampling, uniforms=None):
        if isinstance(draft, OracleDraft):
            return Tree.chain(draft.oracle_tree(cache, k).tokens[:, 0::2].contiguous())
        return plain_chain(draft, cache, root_hidden, k, sampling, uniforms)

    monkeypatch.setattr(drafting, "propose_tree", propose_tree)
    monkeypatch.setattr(drafting, "propose_chain", propose_chain)
