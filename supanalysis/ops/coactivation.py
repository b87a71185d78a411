"""Co-activation counts: how often two features fire on the same token.

Anatomy: ``coactivation_update_reference`` / ``coactivation_update_sparse_reference``
(float64 / int64 PyTorch), ``*_cpu`` (csrc/cpu/coactivation.cpp), ``*_triton``
(kernels/coactivation.py), ``*_cuda`` (csrc/cuda/coactivation.cu), registered once as
``supanalysis::coactivation_update`` and ``supanalysis::coactivation_update_sparse``.

Both mutate ``counts [n, n] int64`` in place: counts[i, j] += #tokens where features i
and j are both active (the diagonal is each feature's firing count). Dense input
``x [T, n]``: active means finite and ``x > threshold`` compared in float64 (as in
activation_stats, so the diagonal equals ``fire_count``). Sparse input
``indices [T, k]``: the listed features are active (-1 = padding, no duplicates per row).
"""

from __future__ import annotations

import torch

from .._backend import lazy, native, resolve

IMPLEMENTED = ("reference", "cpp", "triton", "cuda")
PREFERRED = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


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


def coactivation_update_cpu(counts, x, threshold):
    native().coactivation_update_cpu(counts, x, float(threshold))


def coactivation_update_sparse_cpu(counts, indices):
    native().coactivation_update_sparse_cpu(counts, indices)


def coactivation_update_cuda(counts, x, threshold):
    native().coactivation_update_cuda(counts, x, float(threshold))


def coactivation_update_sparse_cuda(counts, indices):
    native().coactivation_update_sparse_cuda(counts, indices)


coactivation_update_triton = lazy("supanalysis.kernels.coactivation", "coactivation_update_triton")
coactivation_update_sparse_triton = lazy("supanalysis.kernels.coactivation", "coactivation_update_sparse_triton")

IMPLS = {
    "reference": coactivation_update_reference,
    "cpp": coactivation_update_cpu,
    "triton": coactivation_update_triton,
    "cuda": coactivation_update_cuda,
}
SPARSE_IMPLS = {
    "reference": coactivation_update_sparse_reference,
    "cpp": coactivation_update_sparse_cpu,
    "triton": coactivation_update_sparse_triton,
    "cuda": coactivation_update_sparse_cuda,
}


@torch.library.custom_op("supanalysis::coactivation_update", mutates_args=("counts",))
def _coactivation_update_op(counts: torch.Tensor, x: torch.Tensor, threshold: float, backend: str) -> None:
    name = resolve("coactivation_update", x.device, backend or None, IMPLEMENTED, PREFERRED, x.dtype)
    IMPLS[name](counts, x, threshold)


@_coactivation_update_op.register_fake
def _(counts, x, threshold, backend):
    return None


@torch.library.custom_op("supanalysis::coactivation_update_sparse", mutates_args=("counts",))
def _coactivation_update_sparse_op(counts: torch.Tensor, indices: torch.Tensor, backend: str) -> None:
    # Index width does not change the kernel's cost class: one measured entry (int64) covers all.
    name = resolve("coactivation_update_sparse", indices.device, backend or None, IMPLEMENTED, PREFERRED, torch.int64)
    SPARSE_IMPLS[name](counts, indices)


@_coactivation_update_sparse_op.register_fake
def _(counts, indices, backend):
    return None


def coactivation_update(
    counts: torch.Tensor, x: torch.Tensor, threshold: float = 0.0, backend: str | None = None
) -> None:
    """counts [n, n] int64 += co-firing pairs of x [T, n]; see the module docstring."""
    torch.ops.supanalysis.coactivation_update(counts, x, float(threshold), backend or "")


def coactivation_update_sparse(counts: torch.Tensor, indices: torch.Tensor, backend: str | None = None) -> None:
    """counts [n, n] int64 += co-listed pairs of top-k indices [T, k]."""
    torch.ops.supanalysis.coactivation_update_sparse(counts, indices, backend or "")
