"""cross_moments_update: streaming centred co-moments of two models' features.

Anatomy: ``cross_moments_update_reference`` (float64), ``cross_moments_update_cpu``
(csrc/cpu/cross_moments.cpp), ``cross_moments_update_triton`` (supanalysis/kernels/correlation.py),
``cross_moments_update_cuda`` (csrc/cuda/cross_moments.cu), registered as
``supanalysis::cross_moments_update`` (mutates ``comoment``).

comoment [n_a, n_b] float64 is the running Σ_t (xa_t - μa)(xb_t - μb)ᵀ over ``n_prev``
tokens with running means ``mean_a_prev [n_a]``, ``mean_b_prev [n_b]``. One batch
``xa [T, n_a]``, ``xb [T, n_b]`` is merged with Chan's formula,
C += C_batch + (n_prev·T / (n_prev + T)) · (μa_batch − μa)(μb_batch − μb)ᵀ,
and the batch's own moments come back as a :class:`CrossMoments` (float64) for the caller
to merge into its per-feature state. Batches must be finite (the accumulator drops and
counts tokens with non-finite values before calling).

``precision`` (see :data:`PRECISIONS`) sets how the centred values are multiplied: "ieee"
(default) keeps them in the compute precision (float32 for 16/32-bit batches, float64 for
float64 ones) with exact float32 products; "bf16" (16/32-bit batches) rounds each centred
value to bfloat16 (relative error <= 2^-9) and accumulates the exact products in float32:
the GPU's tensor-core GEMM; every backend forms the same products (the CPU rounds too, at
no gain in speed) and the sums agree to float32 summation. The per-feature means and M2
are exact either way; only the co-moment carries the rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._backend import lazy, native
from ._common import check_rank, check_same_device, plant_special
from .registry import Example, entry_from, fake_like, register

#: How the centred batch is multiplied (module docstring).
PRECISIONS = ("ieee", "bf16")


class CrossMoments(NamedTuple):
    """The batch's own per-feature moments, float64: mean_a, m2_a [n_a]; mean_b, m2_b [n_b]."""

    mean_a: torch.Tensor
    m2_a: torch.Tensor
    mean_b: torch.Tensor
    m2_b: torch.Tensor


def check_precision(precision: object, *dtypes: torch.dtype) -> None:
    """ValueError naming ``precision`` unless it is one of PRECISIONS and fits the dtypes."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and torch.float64 in dtypes:
        raise ValueError(
            "precision='bf16' rounds float32 centred values to bfloat16; float64 batches are "
            "multiplied in float64: pass precision='ieee' (or cast the batch to float32)"
        )


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float32, then to the nearest bfloat16 (ties to even), in x's dtype: the
    values a "bf16" cross update multiplies."""
    return x.float().bfloat16().to(x.dtype)


def cross_moments_update_reference(
    comoment: Tensor, n_prev: int, mean_a_prev: Tensor, mean_b_prev: Tensor, xa: Tensor, xb: Tensor, precision="ieee"
) -> list[Tensor]:
    """Float64 ground truth; updates ``comoment`` in place. With precision "bf16" the
    centred values are rounded as the kernels round them and multiplied exactly."""
    check_precision(precision, xa.dtype, xb.dtype)
    T = xa.shape[0]
    a = xa.to(torch.float64)
    b = xb.to(torch.float64)
    if T == 0:
        za = torch.zeros(a.shape[1], dtype=torch.float64, device=xa.device)
        zb = torch.zeros(b.shape[1], dtype=torch.float64, device=xa.device)
        return [za, za.clone(), zb, zb.clone()]
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = a - ma, b - mb
    coef = n_prev * T / (n_prev + T)
    if precision == "bf16":
        comoment += round_to_bf16(ca).T @ round_to_bf16(cb)
    else:
        comoment += ca.T @ cb
    comoment += coef * torch.outer(ma - mean_a_prev.double(), mb - mean_b_prev.double())
    return [ma, (ca * ca).sum(0), mb, (cb * cb).sum(0)]


def cross_moments_update_cpu(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision: str = "ieee"):
    check_precision(precision, xa.dtype, xb.dtype)
    bf16 = precision == "bf16"
    return native().cross_moments_update_cpu(comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, bf16)


def cross_moments_update_cuda(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision: str = "ieee"):
    """precision "bf16": centred values rounded to bfloat16 and multiplied on the tensor cores."""
    check_precision(precision, xa.dtype, xb.dtype)
    bf16 = precision == "bf16"
    return native().cross_moments_update_cuda(comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, bf16)


cross_moments_update_triton = lazy("supanalysis.kernels.correlation", "cross_moments_update_triton")


# Four tensors, not Tensor[]: functionalization (torch.compile) refuses a mutating op whose
# output is a list, which the schema cannot mark as fresh.
def _cross_moments_update_fake(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, backend, precision):
    na, nb = xa.shape[1], xb.shape[1]
    return tuple(fake_like(xa, *[(torch.float64, na)] * 2, *[(torch.float64, nb)] * 2))


def _cross_moments_update_check(backend: str, comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision) -> None:
    check_precision(precision, xa.dtype, xb.dtype)
    check_rank("xa", xa, 2, "[tokens, n_a]")
    check_rank("xb", xb, 2, "[tokens, n_b]")
    na, nb = xa.shape[1], xb.shape[1]
    if xb.shape[0] != xa.shape[0]:
        raise ValueError(f"xa and xb must have the same tokens, got {xa.shape[0]} and {xb.shape[0]}")
    if comoment.shape != (na, nb) or comoment.dtype != torch.float64:
        raise ValueError(f"comoment must be [{na}, {nb}] float64, got {tuple(comoment.shape)} {comoment.dtype}")
    if mean_a_prev.shape != (na,) or mean_b_prev.shape != (nb,):
        raise ValueError(f"mean_a_prev, mean_b_prev must be [{na}], [{nb}]")
    if n_prev < 0:
        raise ValueError(f"n_prev must be >= 0, got {n_prev}")
    check_same_device(comoment=comoment, mean_a_prev=mean_a_prev, mean_b_prev=mean_b_prev, xa=xa, xb=xb)


def _cross_moments_update_example(e: Example) -> tuple:
    g = e.generator()
    xa = plant_special(torch.randn(e.T, e.n, generator=g).to(e.dtype), e.special)
    xb = torch.randn(e.T, e.k, generator=g).to(e.dtype)
    f64 = dict(dtype=torch.float64, device=e.device)
    C = torch.randn(e.n, e.k, generator=g, dtype=torch.float64).to(e.device)
    ma = torch.randn(e.n, generator=g, dtype=torch.float64).to(e.device)
    return C, 10, ma, torch.zeros(e.k, **f64), xa.to(e.device), xb.to(e.device), "ieee"


_SCHEMA = (
    "(Tensor(a0!) comoment, int n_prev, Tensor mean_a_prev, Tensor mean_b_prev, Tensor xa, Tensor xb, "
    "str backend, str precision) -> (Tensor, Tensor, Tensor, Tensor)"
)

# Batches must be finite (the accumulator filters them; not checked here): no special value has a result.
ENTRY = register(
    entry_from(globals(), "cross_moments_update", _SCHEMA, "xa", bench_cases=("cross",), special_values=())
)


def cross_moments_update(
    comoment: torch.Tensor,
    n_prev: int,
    mean_a_prev: torch.Tensor,
    mean_b_prev: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    backend: str | None = None,
    precision: str = "ieee",
) -> CrossMoments:
    """Merge one finite batch (xa [T, n_a], xb [T, n_b]) into ``comoment [n_a, n_b]`` in
    place; returns the batch's own moments. See the module docstring."""
    check_precision(precision, xa.dtype, xb.dtype)  # before dispatch: the message names the argument
    out = torch.ops.supanalysis.cross_moments_update(
        comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, backend or "", precision
    )
    return CrossMoments(*out)
