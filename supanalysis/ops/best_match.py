"""best_match: every feature's most correlated partner, without the correlation matrix.

Anatomy: ``best_match_reference`` (float64, dense), ``best_match_cpu``
(csrc/cpu/best_match.cpp), ``best_match_triton`` (supanalysis/kernels/correlation.py),
``best_match_cuda`` (csrc/cuda/best_match.cu), registered as ``supanalysis::best_match``.

corr_ij = C_ij · inv_std_a_i · inv_std_b_j for comoment C [n_a, n_b] float64 and
inv_std_a [n_a], inv_std_b [n_b], clamped to [-1, 1]; a feature with inv_std 0 (constant)
has correlation 0 with everything and is nobody's match. The result is a
:class:`MatchResult`. The maximum is the signed maximum (anti-correlation is not a match);
ties go to the smallest index. Inputs must be finite (a ``CrossCorrelation`` state always
is); with a NaN correlation the backends differ (the C++ kernel skips it, the float64
reference reports no match for its row and column). Checking would cost a second read of
C, so it is not done.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import NATIVE, lazy
from ._common import check_rank, check_same_device
from .registry import Example, entry_from, fake_like, register


class MatchResult(NamedTuple):
    """max_corr_a [n_a] float64, match_a [n_a] int64 (best partner in B, -1 if none), and
    max_corr_b [n_b], match_b [n_b] the other way."""

    max_corr_a: torch.Tensor
    match_a: torch.Tensor
    max_corr_b: torch.Tensor
    match_b: torch.Tensor


def best_match_reference(
    comoment: torch.Tensor, inv_std_a: torch.Tensor, inv_std_b: torch.Tensor
) -> list[torch.Tensor]:
    """Float64 ground truth through the dense correlation matrix (small sizes only)."""
    ia, ib = inv_std_a.double(), inv_std_b.double()
    corr = (comoment.double() * ia[:, None] * ib[None, :]).clamp(-1.0, 1.0)
    valid = (ia[:, None] != 0) & (ib[None, :] != 0)
    neg = torch.tensor(-float("inf"), dtype=torch.float64, device=corr.device)
    masked = torch.where(valid, corr, neg)

    def reduce(m: torch.Tensor, dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if m.shape[dim] == 0:
            return (
                torch.zeros(n, dtype=torch.float64, device=m.device),
                torch.full((n,), -1, dtype=torch.int64, device=m.device),
            )
        val, arg = m.max(dim)  # first occurrence on ties
        ok = torch.isfinite(val)
        return torch.where(ok, val, 0.0), torch.where(ok, arg, -1)

    ma, aa = reduce(masked, 1, masked.shape[0])
    mb, ab = reduce(masked, 0, masked.shape[1])
    return [ma, aa, mb, ab]


best_match_cpu = lazy(NATIVE, "best_match_cpu")

best_match_cuda = lazy(NATIVE, "best_match_cuda")

best_match_triton = lazy("supanalysis.kernels.correlation", "best_match_triton")


def _best_match_fake(comoment, inv_std_a, inv_std_b, backend):
    na, nb = comoment.shape
    return fake_like(comoment, (torch.float64, na), (torch.int64, na), (torch.float64, nb), (torch.int64, nb))


def _best_match_check(backend: str, comoment, inv_std_a, inv_std_b) -> None:
    check_rank("comoment", comoment, 2, "[n_a, n_b]")
    na, nb = comoment.shape
    if inv_std_a.shape != (na,) or inv_std_b.shape != (nb,):
        raise ValueError(
            f"inv_std_a, inv_std_b must be [{na}], [{nb}], got {tuple(inv_std_a.shape)}, {tuple(inv_std_b.shape)}"
        )
    check_same_device(comoment=comoment, inv_std_a=inv_std_a, inv_std_b=inv_std_b)


def _best_match_example(e: Example) -> tuple:
    g = e.generator()
    f64 = dict(dtype=torch.float64, generator=g)
    C = torch.randn(e.n, e.k, **f64) * 0.3
    ia, ib = torch.rand(e.n, **f64) + 0.5, torch.rand(e.k, **f64) + 0.5
    if e.n > 1:
        ia[-1] = 0  # a constant feature: nobody's match
    return C.to(e.device), ia.to(e.device), ib.to(e.device)


# The kernels read the float64 state; the reference casts any float.
_F64_KERNELS = dict.fromkeys(("cpp", "triton", "cuda"), (torch.float64,))
_SCHEMA = "(Tensor comoment, Tensor inv_std_a, Tensor inv_std_b, str backend) -> Tensor[]"

ENTRY = register(
    entry_from(
        globals(),
        "best_match",
        _SCHEMA,
        "comoment",
        dtypes=_F64_KERNELS,
        bench_cases=("best_match",),
        special_values=(),
    )
)  # finite by contract (module docstring): no special value has a defined result


def best_match(
    comoment: torch.Tensor, inv_std_a: torch.Tensor, inv_std_b: torch.Tensor, backend: str | None = None
) -> MatchResult:
    """Best partner of every feature of A in B and back; see the module docstring."""
    return MatchResult(*torch.ops.supanalysis.best_match(comoment, inv_std_a, inv_std_b, backend or ""))
