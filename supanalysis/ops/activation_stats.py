"""activation_stats: per-feature moments and per-token L0 of one batch, in one read.

Anatomy (the same for every op): ``activation_stats_reference`` (float64 PyTorch, the
ground truth), ``activation_stats_cpu`` (csrc/cpu/activation_stats.cpp),
``activation_stats_triton`` (supanalysis/kernels/activation_stats.py), ``activation_stats_cuda``
(csrc/cuda/activation_stats.cu), registered once as ``supanalysis::activation_stats``.

Batch outputs (a :class:`StatsBatch`), for ``x [T, n]``:
  finite_count [n] int64   finite entries per feature (non-finite ones are excluded from
                           every moment and counted as ``T - finite_count``)
  fire_count   [n] int64   finite entries with ``x > threshold``
  mean, m2     [n] float64 mean and centred second moment of the finite entries
  max, min     [n] float64 extrema of the finite entries (-inf / +inf when none)
  active_sum   [n] float64 sum of ``x`` over firing entries
  l0           [T] int64   firing features per token

The sparse variant takes top-k codes ``indices [T, k]`` (int, -1 = padding) and
``values [T, k]``; every unlisted (token, feature) pair counts as an explicit 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import NATIVE, lazy
from ._common import (
    check_float,
    check_index,
    check_index_bounds,
    check_indices_range,
    check_rank,
    check_same_device,
    check_threshold,
    flatten_tokens,
    plant_special,
)
from .registry import Example, entry_from, fake_like, register


class StatsBatch(NamedTuple):
    """One batch's statistics (shapes in the module docstring), float64 / int64."""

    finite_count: torch.Tensor
    fire_count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor
    active_sum: torch.Tensor
    l0: torch.Tensor


# ----------------------------------------------------------------------------- reference
def activation_stats_reference(x: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    """Float64 ground truth. x: (T, n)."""
    T, n = x.shape
    x64 = x.to(torch.float64)
    fin = torch.isfinite(x64)
    xf = torch.where(fin, x64, 0.0)
    finite_count = fin.sum(0)
    mean = xf.sum(0) / finite_count.clamp_min(1)
    d = torch.where(fin, x64 - mean, 0.0)
    m2 = (d * d).sum(0)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=x.device)
    vmax = (
        torch.where(fin, x64, -inf).amax(0)
        if T
        else torch.full((n,), -inf.item(), dtype=torch.float64, device=x.device)
    )
    vmin = (
        torch.where(fin, x64, inf).amin(0) if T else torch.full((n,), inf.item(), dtype=torch.float64, device=x.device)
    )
    fire = fin & (x64 > threshold)
    fire_count = fire.sum(0)
    active_sum = torch.where(fire, x64, 0.0).sum(0)
    l0 = fire.sum(1)
    return [finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0]


def densify_codes(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Top-k codes -> dense [T, n] float64 (padding -1 dropped). For references and tests."""
    T = indices.shape[0]
    dense = torch.zeros(T, n + 1, dtype=torch.float64, device=indices.device)
    idx = torch.where(indices < 0, n, indices).long()
    dense.scatter_(1, idx, values.to(torch.float64))
    return dense[:, :n]


def activation_stats_sparse_reference(
    indices: torch.Tensor, values: torch.Tensor, n: int, threshold: float
) -> list[torch.Tensor]:
    """Float64 ground truth for top-k codes: densify, then the dense reference."""
    return activation_stats_reference(densify_codes(indices, values, n), threshold)


# ----------------------------------------------------------------------------- native
activation_stats_cpu = lazy(NATIVE, "activation_stats_cpu")

activation_stats_sparse_cpu = lazy(NATIVE, "activation_stats_sparse_cpu")

activation_stats_cuda = lazy(NATIVE, "activation_stats_cuda")

activation_stats_sparse_cuda = lazy(NATIVE, "activation_stats_sparse_cuda")

activation_stats_triton = lazy("supanalysis.kernels.activation_stats", "activation_stats_triton")
activation_stats_sparse_triton = lazy("supanalysis.kernels.activation_stats", "activation_stats_sparse_triton")


# ----------------------------------------------------------------------------- registration
def _fake_outputs(like: torch.Tensor, n: int, T: int) -> list[torch.Tensor]:
    i64, f64 = torch.int64, torch.float64
    return fake_like(like, (i64, n), (i64, n), *[(f64, n)] * 5, (i64, T))


def _activation_stats_check(backend: str, x: torch.Tensor, threshold: float) -> None:
    check_rank("x", x, 2, "[tokens, features]")
    check_threshold("threshold", threshold)


def _activation_stats_sparse_check(
    backend: str, indices: torch.Tensor, values: torch.Tensor, n: int, threshold: float
) -> None:
    check_threshold("threshold", threshold)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_rank("indices", indices, 2, "[tokens, k]")
    if values.shape != indices.shape:
        raise ValueError(f"values must have the shape of indices {tuple(indices.shape)}, got {tuple(values.shape)}")
    check_index_bounds("indices", indices, n)


def _activation_stats_example(e: Example) -> tuple:
    x = torch.randn(e.T, e.n, generator=e.generator()).to(e.dtype)
    return plant_special(x, e.special).to(e.device), 0.0


def _activation_stats_sparse_example(e: Example) -> tuple:
    k = min(e.k, e.n)
    g = e.generator()
    idx = torch.stack([torch.randperm(e.n, generator=g)[:k] for _ in range(e.T)]) if e.T else torch.zeros(0, k)
    idx = idx.long()
    if e.bad_index is not None and idx.numel():
        idx = idx.long() if abs(e.bad_index) >= 2**31 else idx
        idx.view(-1)[0] = e.bad_index
    val = plant_special(torch.rand(e.T, k, generator=g).to(e.dtype), e.special)
    return idx.to(e.device), val.to(e.device), e.n, 0.0


def _activation_stats_fake(x, threshold, backend):
    return _fake_outputs(x, x.shape[1], x.shape[0])


def _activation_stats_sparse_fake(indices, values, n, threshold, backend):
    return _fake_outputs(values, n, indices.shape[0])


_DENSE_SCHEMA = "(Tensor x, float threshold, str backend) -> Tensor[]"
_SPARSE_SCHEMA = "(Tensor indices, Tensor values, int n, float threshold, str backend) -> Tensor[]"

DENSE = register(entry_from(globals(), "activation_stats", _DENSE_SCHEMA, "x", bench_cases=("stats",)))
SPARSE = register(
    entry_from(globals(), "activation_stats_sparse", _SPARSE_SCHEMA, "values", bench_cases=("stats_sparse",))
)


# ----------------------------------------------------------------------------- public
def activation_stats(x: torch.Tensor, threshold: float = 0.0, backend: str | None = None) -> StatsBatch:
    """Statistics of one batch. x: (..., n) float16/bfloat16/float32/float64.

    Leading dims are flattened into tokens (a view when possible). Rows may be strided;
    a tensor whose last dim is not contiguous is copied once.
    """
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a feature dimension, got a scalar")
    threshold = check_threshold("threshold", threshold)
    x2 = flatten_tokens(x)
    return StatsBatch(*torch.ops.supanalysis.activation_stats(x2, threshold, backend or ""))


def check_sparse_codes(
    indices: torch.Tensor, values: torch.Tensor, n: int, iname: str = "indices", vname: str = "values"
) -> None:
    """Validate top-k codes (shapes, dtypes, device, index range, no duplicates per row)."""
    check_index(iname, indices)
    check_float(vname, values)
    check_rank(iname, indices, 2, "[tokens, k]")
    if values.shape != indices.shape:
        raise ValueError(f"{vname} must have the shape of {iname} {tuple(indices.shape)}, got {tuple(values.shape)}")
    check_same_device(**{iname: indices, vname: values})
    check_indices_range(iname, indices, n)


def activation_stats_sparse(
    indices: torch.Tensor,
    values: torch.Tensor,
    n: int,
    threshold: float = 0.0,
    backend: str | None = None,
    *,
    validated: bool = False,
) -> StatsBatch:
    """Statistics of one batch of top-k codes. indices, values: (T, k); n features.

    ``validated=True`` skips :func:`check_sparse_codes` for callers that already ran it.
    """
    if not validated:
        check_sparse_codes(indices, values, n)
    threshold = check_threshold("threshold", threshold)
    return StatsBatch(
        *torch.ops.supanalysis.activation_stats_sparse(
            indices.contiguous(), values.contiguous(), int(n), threshold, backend or ""
        )
    )
