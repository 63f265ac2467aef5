"""Counting what the host does: ATen dispatches and host reads of device values.

On a GPU every dispatch costs a few microseconds of launch overhead and every read of a device value
(`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `.cpu()`, a data-dependent shape such as `nonzero`)
stalls the host until the GPU has caught up. Both can be counted on a CPU, on the code path a CUDA
run takes, which is how the decode step is measured here without a GPU (DESIGN.md, "The decode
step on a GPU"):

    with HostCounter() as c:
        sparrow.generate(...)
    c.dispatches, c.host_reads, c.reads_by_kind

A compiled op (`torch.ops.sparrow.*`) counts as one dispatch: the ATen calls it makes inside its
kernel do not reach Python.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must wait for: a scalar read, or an output shape that depends on values.
_SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.equal",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.bincount",  # CUDA: finds the maximum first
}
_READ_METHODS = ("tolist", "cpu", "numpy")


class HostCounter(TorchDispatchMode):
    """Counts ATen dispatches and host reads while active (not re-entrant)."""

    def __init__(self):
        super().__init__()
        self.dispatches = 0
        self.host_reads = 0
        self.reads_by_kind: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.calls: list[str] = []  # every dispatch's op, in order
        self._saved: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        self.dispatches += 1
        self.ops[name] += 1
        self.calls.append(str(func))
        if name in _SYNC_OPS:
            self._read(name)
        return func(*args, **(kwargs or {}))

    def _read(self, kind: str) -> None:
        self.host_reads += 1
        self.reads_by_kind[kind] += 1

    def __enter__(self):
        for name in _READ_METHODS:
            plain = getattr(torch.Tensor, name)
            self._saved[name] = plain

            def counted(t, *a, _plain=plain, _name=name, **k):
                self._read(f"Tensor.{_name}")
                return _plain(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, plain in self._saved.items():
            setattr(torch.Tensor, name, plain)
        self._saved.clear()
        return super().__exit__(*exc)


def count(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) under a HostCounter; returns (result, counter)."""
    with HostCounter() as c:
        out = fn(*args, **kwargs)
    return out, c
