"""``python -m bench.memory``: peak extra memory (and the time) of one tiled interference call
against the n×n matrix it avoids.

For each op the inputs are built first; then the peak is reset and one call runs. On the
CPU the peak is the process's high-water resident set (VmHWM, reset through
/proc/self/clear_refs), so it counts every allocation, ATen's and the kernels' own; on a
GPU it is ``torch.cuda.max_memory_allocated``. "extra" = peak − resident before the call.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from supanalysis.ops.interference import ENTRY as INTERFERENCE


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above the current level while ``fn`` runs once."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--backend", default=None, help="default: cpp on cpu, cuda on a GPU")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backend = args.backend or ("cuda" if dev.type == "cuda" else "cpp")
    W = torch.randn(args.n, args.m, device=dev, dtype=dtype)
    INTERFERENCE.implementation(backend)(W[:64], None, args.topk, 0)  # warm-up: one-time allocations, thread pools, JIT
    nn_bytes = args.n * args.n * W.element_size()
    t0 = time.perf_counter()
    extra = peak_extra_bytes(lambda: INTERFERENCE.implementation(backend)(W, None, args.topk, 0), dev)
    seconds = time.perf_counter() - t0  # one call, synchronised (wall clock, not a median)
    print(
        f"interference {backend} n={args.n:,} m={args.m} topk={args.topk} {args.dtype} on {dev}: "
        f"peak extra {extra / 2**20:.1f} MiB = {100 * extra / nn_bytes:.2f}% of the n×n matrix "
        f"({nn_bytes / 2**20:,.0f} MiB); one call {seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
