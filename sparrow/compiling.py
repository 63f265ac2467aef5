"""torch.compile for the decode step: the target's verify forward, the draft's proposal and its commit.

`generate(..., compile=...)` takes
    False            eager (the default)
    True             mode "reduce-overhead" on CUDA (each step a CUDA graph replay), "default" on CPU
    "max-autotune"   (any torch.compile mode string)
    {"backend": "aot_eager", ...}   torch.compile keyword arguments as they are (tests use this)

Every compiled function is traced whole (fullgraph=True: a graph break is an error, not a slow
path) at static shapes (dynamic=False): the tree is padded to its configured size and the caches
are allocated at a capacity rounded up to CAPACITY_STEP, so one generation compiles each
function once per batch size it runs at (rows leaving the batch change it).
"""

from __future__ import annotations

import torch

CAPACITY_STEP = 256  # cache capacities are rounded up to a multiple of this
_COMPILED: dict = {}


def round_capacity(slots: int) -> int:
    """Static shapes across generations: few distinct cache sizes, so few compiles."""
    return -(-slots // CAPACITY_STEP) * CAPACITY_STEP


def compile_options(compile, device) -> tuple | None:
    """generate's `compile` argument -> a hashable, sorted tuple of torch.compile kwargs (None: eager)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        compile = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    if isinstance(compile, str):
        compile = {"mode": compile}
    if not isinstance(compile, dict):
        raise ValueError(f"compile must be a bool, a torch.compile mode or a dict of its options, got {compile!r}")
    return tuple(sorted(compile.items()))


def compiled(fn, options: tuple | None):
    """fn itself when options is None, else torch.compile(fn) at static shapes without graph
    breaks, made once per (function, options) and reused by every later generation."""
    if options is None:
        return fn
    key = (getattr(fn, "__func__", fn), getattr(fn, "__self__", None), options)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, dynamic=False, **dict(options))
    return _COMPILED[key]


def mark_static(*tensors: torch.Tensor) -> None:
    """Caches that a compiled step writes in place keep their address (CUDA graphs would otherwise
    copy them into the graph's own memory at every replay)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
