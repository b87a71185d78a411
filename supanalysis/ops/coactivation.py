"""Co-activation counts: how often two features fire on the same token.

Anatomy: ``coactivation_update_reference`` / ``coactivation_update_sparse_reference``
(float64 / int64 PyTorch), ``*_cpu`` (csrc/cpu/coactivation.cpp), ``*_triton``
(supanalysis/kernels/coactivation.py), ``*_cuda`` (csrc/cuda/coactivation.cu), registered once as
``supanalysis::coactivation_update`` and ``supanalysis::coactivation_update_sparse``.

Both mutate ``counts [n, n] int64`` in place: counts[i, j] += #tokens where features i
and j are both active (the diagonal is each feature's firing count). Dense input
``x [T, n]``: active means finite and ``x > threshold`` compared in float64 (as in
activation_stats, so the diagonal equals ``fire_count``). Sparse input
``indices [T, k]``: the listed features are active (-1 = padding, no duplicates per row;
the range is checked before any kernel runs, duplicates are the caller's to refuse).
Both return a :class:`CoactivationCounts`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import NATIVE, lazy
from ._common import (
    check_index,
    check_index_bounds,
    check_rank,
    check_same_device,
    check_threshold,
    plant_special,
)
from .registry import INDEX_DTYPES, Example, entry_from, register


def coactivation_update_reference(counts: torch.Tensor, x: torch.Tensor, threshold: float) -> None:
    x64 = x.to(torch.float64)  # compare in float64, like activation_stats_reference
    B = (torch.isfinite(x64) & (x64 > threshold)).to(torch.float64)
    counts += (B.T @ B).round().long()


def coactivation_update_sparse_reference(counts: torch.Tensor, indices: torch.Tensor) -> None:
    n = counts.shape[0]
    T = indices.shape[0]
    B = torch.zeros(T, n + 1, dtype=torch.float64, device=indices.device)
    B.scatter_(1, torch.where(indices < 0, n, indices).long(), 1.0)
    B = B[:, :n]
    counts += (B.T @ B).round().long()


coactivation_update_cpu = lazy(NATIVE, "coactivation_update_cpu")


coactivation_update_sparse_cpu = lazy(NATIVE, "coactivation_update_sparse_cpu")

coactivation_update_cuda = lazy(NATIVE, "coactivation_update_cuda")

coactivation_update_sparse_cuda = lazy(NATIVE, "coactivation_update_sparse_cuda")

coactivation_update_triton = lazy("supanalysis.kernels.coactivation", "coactivation_update_triton")
coactivation_update_sparse_triton = lazy("supanalysis.kernels.coactivation", "coactivation_update_sparse_triton")


class CoactivationCounts(NamedTuple):
    """counts [n, n] int64: the updated co-firing counts (the tensor passed in)."""

    counts: torch.Tensor


def _check_counts(counts: torch.Tensor, n: int | None = None) -> None:
    n = counts.shape[0] if n is None and counts.dim() else n
    if counts.dim() != 2 or counts.shape != (n, n) or counts.dtype != torch.int64:
        raise ValueError(f"counts must be [n, n] int64 with n={n}, got {tuple(counts.shape)} {counts.dtype}")


def _coactivation_update_check(backend: str, counts: torch.Tensor, x: torch.Tensor, threshold: float) -> None:
    check_rank("x", x, 2, "[tokens, features]")
    _check_counts(counts, x.shape[1])
    check_threshold("threshold", threshold)
    check_same_device(counts=counts, x=x)


def _coactivation_update_sparse_check(backend: str, counts: torch.Tensor, indices: torch.Tensor) -> None:
    _check_counts(counts)
    check_index("indices", indices)
    check_rank("indices", indices, 2, "[tokens, k]")
    check_index_bounds("indices", indices, counts.shape[0])
    check_same_device(counts=counts, indices=indices)


def _coactivation_update_example(e: Example) -> tuple:
    x = plant_special(torch.randn(e.T, e.n, generator=e.generator()).to(e.dtype), e.special)
    return torch.zeros(e.n, e.n, dtype=torch.int64, device=e.device), x.to(e.device), 0.0


def _coactivation_update_sparse_example(e: Example) -> tuple:
    k, g = min(e.k, e.n), e.generator()
    idx = torch.zeros(e.T, k, dtype=e.dtype if e.dtype in INDEX_DTYPES else torch.int64)
    for t in range(e.T):
        idx[t] = torch.randperm(e.n, generator=g)[:k]
    if e.T and k:
        idx[:, -1] = torch.where(torch.rand(e.T, generator=g) < 0.3, -1, idx[:, -1])
    if e.bad_index is not None and idx.numel():
        idx = idx.long() if abs(e.bad_index) >= 2**31 else idx
        idx.view(-1)[0] = e.bad_index
    return torch.zeros(e.n, e.n, dtype=torch.int64, device=e.device), idx.to(e.device)


_DENSE_SCHEMA = "(Tensor(a!) counts, Tensor x, float threshold, str backend) -> ()"
_SPARSE_SCHEMA = "(Tensor(a!) counts, Tensor indices, str backend) -> ()"

DENSE = register(entry_from(globals(), "coactivation_update", _DENSE_SCHEMA, "x", bench_cases=("coact",)))
# Index width does not change the kernel's cost class: one measured entry (int64) covers all.
_INDEX = {"dtypes": dict.fromkeys(("reference", "cpp", "triton", "cuda"), INDEX_DTYPES)}
_INDEX["dispatch_dtype"] = torch.int64
_SPARSE_CASES = {"bench_cases": ("coact_sparse",), "special_values": ()}
SPARSE = register(
    entry_from(globals(), "coactivation_update_sparse", _SPARSE_SCHEMA, "indices", **_INDEX, **_SPARSE_CASES)
)


def coactivation_update(
    counts: torch.Tensor, x: torch.Tensor, threshold: float = 0.0, backend: str | None = None
) -> CoactivationCounts:
    """counts [n, n] int64 += co-firing pairs of x [T, n], in place; see the module docstring."""
    threshold = check_threshold("threshold", threshold)
    torch.ops.supanalysis.coactivation_update(counts, x, threshold, backend or "")
    return CoactivationCounts(counts)


def coactivation_update_sparse(
    counts: torch.Tensor, indices: torch.Tensor, backend: str | None = None
) -> CoactivationCounts:
    """counts [n, n] int64 += co-listed pairs of top-k indices [T, k] (int, in [-1, n)), in place."""
    torch.ops.supanalysis.coactivation_update_sparse(counts, indices, backend or "")
    return CoactivationCounts(counts)
