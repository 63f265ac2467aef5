"""Draft trees, as the loop hands them from the draft to the target and to ops.verify.

A tree for row b has a root (node 0, the last committed token, not part of `tokens`) and N nodes;
node i (1..N) has parent parents[b, i-1] in 0..i-1 (topological order), so a chain is
parents = [0, 1, ..., N-1]. Padded nodes carry token -1 and are never accepted.

Besides tokens and parents, a Tree carries what verify needs and what the proposer already knows:
every node's depth (its position is the root's + depth) and which nodes it may attend to (its
ancestors and itself). `from_parents` derives both with tensor ops (pointer doubling: log2(N)
rounds, no loop over nodes) for trees that come without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # [B, N] int64 draft tokens (-1: padded)
    parents: torch.Tensor  # [B, N] int64: node i's parent in 0..i-1 (0: the root)
    depths: torch.Tensor  # [B, N+1] int64: depth of the root (0) and of every node
    visible: torch.Tensor  # [B, N+1, N+1] bool: node i attends to node j (ancestors, itself)
    draft_probs: torch.Tensor | None = None  # [B, N, V] the draft's q (sampled drafts): float32 (float64 drafts: float64)
    max_depth: int | None = None  # a static bound on every node's depth (None: N)

    @property
    def size(self) -> int:
        """N, the number of draft nodes (the root not counted)."""
        return self.tokens.shape[1]

    @property
    def longest_path(self) -> int:
        """The most tokens one step can commit: the accepted nodes (at most the depth) + the new one."""
        return (self.size if self.max_depth is None else self.max_depth) + 1

    @classmethod
    def empty(cls, batch: int, device) -> "Tree":
        """No draft node: an autoregressive step verifies the root alone."""
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(none, none, torch.zeros(batch, 1, dtype=torch.long, device=device),
                   torch.ones(batch, 1, 1, dtype=torch.bool, device=device), max_depth=0)

    @classmethod
    def chain(cls, tokens: torch.Tensor, draft_probs: torch.Tensor | None = None) -> "Tree":
        """tokens [B, k] in a chain: node i hangs under node i-1, so it sees every earlier node."""
        B, k = tokens.shape
        dev = tokens.device
        steps = torch.arange(k + 1, device=dev)
        return cls(tokens, steps[:k].expand(B, k), steps.expand(B, k + 1),
                   torch.ones(k + 1, k + 1, dtype=torch.bool, device=dev).tril().expand(B, k + 1, k + 1),
                   draft_probs, max_depth=k)

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor,
                     draft_probs: torch.Tensor | None = None) -> "Tree":
        """Depths and ancestor masks from parents alone, for trees built elsewhere."""
        B, N = tokens.shape
        dev = tokens.device
        root = torch.zeros(B, 1, dtype=torch.long, device=dev)
        jump = torch.cat([root, parents.to(torch.long).clamp(min=0)], 1)  # [B, N+1]; the root is its own parent
        eye = torch.eye(N + 1, dtype=torch.bool, device=dev).expand(B, N + 1, N + 1)
        seen = eye | torch.nn.functional.one_hot(jump, N + 1).bool()
        # After round r, seen[i] holds the ancestors within 2^r steps and jump[i] the one 2^r up.
        for _ in range(math.ceil(math.log2(N)) if N > 1 else 0):
            seen = seen | seen.gather(1, jump[..., None].expand(B, N + 1, N + 1))
            jump = jump.gather(1, jump)
        depths = seen.sum(-1) - 1
        padded = torch.cat([torch.zeros_like(root, dtype=torch.bool), tokens < 0], 1)  # [B, N+1]
        visible = torch.where(padded[:, None, :], eye, seen)  # a padded node is seen by itself only
        return cls(tokens, parents, depths, visible, draft_probs)
