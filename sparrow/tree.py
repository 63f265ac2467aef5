"""Tree bookkeeping shared by the draft, the target adapters and the loop.

A draft tree for one row has a root (node 0, the last committed token) and N nodes; node i (1..N)
has parent parents[i-1] in 0..i-1 (topological order), so a chain is parents = [0, 1, ..., N-1].
Padded nodes carry token -1.
"""

from __future__ import annotations

import torch


def chain_parents(batch: int, n: int, device=None) -> torch.Tensor:
    """[B, n] parents of a chain of n draft tokens: node i hangs under node i-1."""
    return torch.arange(n, device=device).expand(batch, n).clone()


def depths(parents: torch.Tensor) -> torch.Tensor:
    """[B, N+1] depth of every node (root = 0) from parents [B, N]."""
    B, N = parents.shape
    depth = torch.zeros(B, N + 1, dtype=torch.long, device=parents.device)
    for i in range(1, N + 1):  # parents precede children, so one pass suffices
        depth[:, i] = depth.gather(1, parents[:, i - 1 : i].clamp(min=0)).squeeze(1) + 1
    return depth


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[B, N+1, N+1] bool: mask[b, i, j] is True when node j is node i or one of its ancestors."""
    B, N = parents.shape
    mask = torch.zeros(B, N + 1, N + 1, dtype=torch.bool, device=parents.device)
    mask[:, 0, 0] = True
    rows = torch.arange(B, device=parents.device)
    for i in range(1, N + 1):
        mask[:, i] = mask[rows, parents[:, i - 1].clamp(min=0)]
        mask[:, i, i] = True
    return mask
