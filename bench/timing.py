"""Median wall time of a callable: torch.utils.benchmark on the CPU, Triton's do_bench on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    iqr: float  # seconds, spread of the samples (0 when there is one)
    samples: int  # how many measurements the median is taken over


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call (after the caller's warm-up); used to estimate costs."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_time(
    fn: Callable[[], object], device: torch.device, min_run_time: float, max_call_s: float = float("inf")
) -> Timing:
    """Warm up once, then time ``fn`` and return the median over repeated runs.

    CPU: ``Timer.blocked_autorange`` with torch's current thread count (Timer would
    otherwise pin one thread). GPU: ``triton.testing.do_bench`` median, which also flushes
    the L2 cache between calls. A warm-up call longer than ``max_call_s`` is not repeated:
    its own (cold) time comes back, as one sample.
    """
    first = once(fn, device)
    if first > max_call_s:
        return Timing(first, 0.0, 1)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = sorted(do_bench(fn, return_mode="all"))
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        return Timing(statistics.median(ms) / 1e3, (q[2] - q[0]) / 1e3, len(ms))
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr, len(m.times))
