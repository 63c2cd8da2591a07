"""Timing helpers shared by the benchmarks: medians of repeated runs, CUDA events on GPUs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn` over `reps` runs after `warmup` runs. On CUDA, each run is
    bracketed by events on the current stream, so only device time is counted."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median time of each function, timed round-robin (one run of each per round) so that
    drift in a shared machine's speed affects every variant alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(median_seconds(fn, device, reps=1, warmup=0))
    return {name: statistics.median(ts) for name, ts in times.items()}

