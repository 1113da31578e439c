"""The clock the kernel benches share: CUDA events around each run, after warm-up runs (which
also compile), the median of the timed runs and the memory they allocate beyond what was held."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def timed(run: Callable[[], object], clear: Callable[[], None], warmup: int, reps: int) -> tuple[float, float]:
    """(median milliseconds of `run()`, GiB it allocates beyond what was held before). `clear()`
    drops the previous run's gradients before each run, so they count in neither the time nor the
    memory held before."""
    for _ in range(warmup):
        clear()
        run()
    clear()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - held) / 2**30
