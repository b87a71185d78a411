"""Helpers shared by the Triton launchers: compute dtypes, thresholds, launch sizes."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where programs run one after another on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(dtype: torch.dtype):
    """The in-kernel arithmetic type for an input dtype.

    float16/bfloat16/float32 are widened to float32 (exact for the 16-bit types); float64
    inputs stay float64 so a float64 caller gets float64-grade results (the reference's
    precision), at the cost of fp64 throughput on the GPU.
    """
    return tl.float64 if dtype == torch.float64 else tl.float32


def threshold_for(threshold: float, dtype: torch.dtype) -> float:
    """A threshold t' in the compute dtype with ``v > t'`` iff ``float64(v) > threshold``.

    The reference compares in float64. Rounding the threshold to float32 to the nearest
    can flip entries equal to that float32 (e.g. v = float32(0.1) > 0.1 is true in float64
    but 0.1f > 0.1f is false), so for float32 compute round *down*: every float32 v is
    then > t' exactly when it exceeds the float64 threshold.
    """
    thr = float(threshold)
    if dtype == torch.float64 or math.isnan(thr):
        return thr
    t32 = torch.tensor(thr, dtype=torch.float64).to(torch.float32)
    if float(t32) > thr:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf, dtype=torch.float32))
    return float(t32)


def next_pow2(v: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(v), 1)))
    return min(p, hi) if hi is not None else p


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (1 under the interpreter: programs run serially)."""
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def chan_merge_splits(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-split (count, mean, M2) partials along dim 0 in float64.

    The many-group form of Chan's formula: M2 = Σ_s M2_s + Σ_s c_s (mean_s - mean)^2 with
    mean = Σ_s c_s mean_s / Σ_s c_s. Every term is a centred quantity, so there is no
    cancellation, and the order is fixed, so the result is deterministic.
    """
    c = count.to(torch.float64)
    total = count.sum(0)
    tot_f = total.to(torch.float64)
    mu = (c * mean).sum(0) / tot_f.clamp_min(1.0)
    d = torch.where(count > 0, mean - mu, 0.0)
    return total, mu, m2.sum(0) + (c * d * d).sum(0)
