"""One way to time device work for the benchmarks: medians, with CUDA events on a GPU.

On CUDA a call is asynchronous, so a host clock around it measures the launch, not the work:
`median_seconds` brackets `per_event` calls with a pair of events (launches queue back to back,
as in a decode loop) and takes the median over rounds. On CPU it times each call with a host clock.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, reps: int = 20, warmup: int = 2, per_event: int = 1) -> float:
    """Median seconds of one fn() over `reps` rounds of `per_event` calls each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_event):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / per_event)
        else:
            t0 = time.perf_counter()
            for _ in range(per_event):
                fn()
            samples.append((time.perf_counter() - t0) / per_event)
    return statistics.median(samples)


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> float:
    """Bytes per second of a device-to-device copy of `nbytes`, counting bytes read plus written
    (the ceiling a memory-bound kernel is measured against, taken in the same run)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, reps=reps)
    return 2 * src.numel() * src.element_size() / t
