"""Median wall time of a callable: torch.utils.benchmark on the CPU, Triton's do_bench on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SLOW_GPU_CALL_S = 0.1  # longer GPU calls are timed by three repeats instead of do_bench


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    iqr: float  # seconds, spread of the samples (0 when there is one)
    samples: int  # how many measurements the median is taken over
    over_budget: bool = False  # the first call took longer than allowed: one warm call timed


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
    the L2 cache between calls; calls over SLOW_GPU_CALL_S: the median of three. A warm-up
    call longer than ``max_call_s`` is not repeated: one more (warm) call is timed, as one
    sample.
    """
    first = once(fn, device)
    if first > max_call_s:  # the first call may include compiling (Triton JIT): time a warm one
        return Timing(once(fn, device), 0.0, 1, over_budget=True)
    if device.type == "cuda" and first > SLOW_GPU_CALL_S:
        # do_bench would make 7+ calls (5 to estimate, then warm-up and repeats); for calls this
        # long a few synchronised repeats give the median, and the L2 (tens of MB) holds nothing
        # of their data from one call to the next anyway.
        ts = sorted(once(fn, device) for _ in range(3))
        return Timing(ts[1], ts[2] - ts[0], 3)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = sorted(do_bench(fn, return_mode="all"))
        q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        return Timing(statistics.median(ms) / 1e3, (q[2] - q[0]) / 1e3, len(ms))
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr, len(m.times))
