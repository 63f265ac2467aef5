"""torch.compile for the decode step: the target's verify forward, the draft's proposal and its commit.

`generate(..., compile=...)` takes
    False            eager (the default)
    True             mode "reduce-overhead" on CUDA (each step a CUDA graph replay), "default" on CPU
    "max-autotune"   (any torch.compile mode string)
    {"backend": "aot_eager", ...}   torch.compile keyword arguments as they are (tests use this)

Every compiled function is traced whole (fullgraph=True: a graph break is an error, not a slow
path). Shapes: the tree is padded to its configured size, the caches are allocated at a capacity
rounded up to CAPACITY_STEP, and the first generation compiles at static shapes. A dimension that
then changes (another cache capacity for another prompt length, a smaller batch when rows leave)
becomes symbolic in one recompile (dynamo's automatic dynamic shapes) rather than one graph per
size: past dynamo's recompile limit, fullgraph would otherwise fail outright. On CUDA with
reduce-overhead, the graphs are still recorded per concrete shape, and re-recorded when a cache of
a new generation lives at another address (the caches are marked static, without a guard).
"""

from __future__ import annotations

import torch

CAPACITY_STEP = 256  # cache capacities are rounded up to a multiple of this
_COMPILED: dict = {}  # (function, options) -> compiled function


def round_capacity(slots: int) -> int:
    """Few distinct cache sizes across generations, so few shapes to compile for."""
    return -(-slots // CAPACITY_STEP) * CAPACITY_STEP


def compile_options(compile, device) -> dict | None:
    """generate's `compile` argument -> torch.compile keyword arguments (None: eager)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        compile = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    if isinstance(compile, str):
        compile = {"mode": compile}
    if not isinstance(compile, dict):
        raise ValueError(f"compile must be a bool, a torch.compile mode or a dict of its options, got {compile!r}")
    return dict(compile)


def compiled(fn, options: dict | None):
    """fn itself when options is None, else torch.compile(fn, fullgraph=True, **options), made
    once per (function, options) and reused by every later generation. Pass plain functions (a
    method as Class.method, its object as the first argument): nothing here then keeps a model
    alive, and dynamo does not specialise on which draft or target it is given."""
    if options is None:
        return fn
    key = (fn, repr(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True, **options)
    return _COMPILED[key]


def mark_static(*tensors: torch.Tensor) -> None:
    """Caches that a compiled step reads or writes in place keep their address: CUDA graphs copy
    other inputs into their own memory at every replay, and skip a graph that writes into one."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
