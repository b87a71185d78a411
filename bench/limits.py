"""The machine's own limits, measured in the same run as the ops.

Read bandwidth: one ``x.sum()`` over a large float32 tensor (bytes read / time).
Matmul rate: ``torch.mm`` of two square matrices (2 n^3 FLOPs / time) per dtype. The size
doubles from 256 while one product stays short, so a dtype without fast matmul here (e.g.
bfloat16 on a CPU without AMX) costs seconds rather than minutes.
"""

from __future__ import annotations

import torch

from bench.timing import Timing, median_time, once


def read_bandwidth(device: torch.device, nbytes: int, min_run_time: float) -> tuple[str, Timing]:
    """(shape label, timing) of ``x.sum()`` over ``nbytes`` of float32."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    timing = median_time(x.sum, device, min_run_time)
    return f"x.sum() {nbytes / 2**20:,.0f} MiB", timing


def matmul_size(device: torch.device, dtype: torch.dtype, max_size: int, target_s: float) -> int:
    """Largest power-of-two edge <= max_size whose next doubling would take over target_s."""
    size = 256
    while size < max_size:
        a = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, a)
        if once(lambda a=a: torch.mm(a, a), device) * 8 > target_s:
            break
        size *= 2
    return size


def matmul_rate(
    device: torch.device, dtype: torch.dtype, max_size: int, target_s: float, min_run_time: float
) -> tuple[int, Timing]:
    """(edge n, timing) of ``torch.mm`` of two n x n matrices of ``dtype``."""
    n = matmul_size(device, dtype, max_size, target_s)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return n, median_time(lambda: torch.mm(a, b), device, min_run_time)
