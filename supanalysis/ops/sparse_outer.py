"""sparse_outer_update: the raw cross-product of two sets of top-k codes.

Anatomy: ``sparse_outer_update_reference`` (float64), ``sparse_outer_update_cpu``
(csrc/cpu/sparse_outer.cpp), ``sparse_outer_update_triton`` (supanalysis/kernels/correlation.py),
``sparse_outer_update_cuda`` (csrc/cuda/sparse_outer.cu), registered as
``supanalysis::sparse_outer_update`` (mutates ``out``).

out [n_a, n_b] float64 += Σ_t Σ_p Σ_q va[t,p]·vb[t,q] at (ia[t,p], ib[t,q]): ia [T, k_a],
ib [T, k_b] int (-1 = padding), va, vb of their shapes; k_a·k_b float64 products per token
instead of an n_a·n_b GEMM. The accumulator turns it into the batch's centred co-moment
(see ``CrossCorrelation.update_sparse``). Indices are checked against [-1, n) before any
kernel runs: the kernels write ``out`` at them.
"""

from __future__ import annotations

import torch

from .._backend import NATIVE, lazy
from ._common import check_index, check_index_bounds, check_rank, check_same_device, plant_special
from .registry import Example, entry_from, register


def sparse_outer_update_reference(
    out: torch.Tensor, ia: torch.Tensor, va: torch.Tensor, ib: torch.Tensor, vb: torch.Tensor
) -> None:
    """Float64 ground truth: every pair's product, accumulated with index_put_."""
    T, ka = ia.shape
    kb = ib.shape[1]
    rows = ia.long()[:, :, None].expand(T, ka, kb)
    cols = ib.long()[:, None, :].expand(T, ka, kb)
    prod = va.double()[:, :, None] * vb.double()[:, None, :]
    ok = (rows >= 0) & (cols >= 0)
    out.index_put_((rows[ok], cols[ok]), prod[ok], accumulate=True)


sparse_outer_update_cpu = lazy(NATIVE, "sparse_outer_update_cpu")

sparse_outer_update_cuda = lazy(NATIVE, "sparse_outer_update_cuda")

sparse_outer_update_triton = lazy("supanalysis.kernels.correlation", "sparse_outer_update_triton")


def _sparse_outer_update_check(backend: str, out, ia, va, ib, vb) -> None:
    if out.dim() != 2 or out.dtype != torch.float64:
        raise ValueError(f"out must be [n_a, n_b] float64, got {tuple(out.shape)} {out.dtype}")
    for iname, vname, idx, val, n in (("ia", "va", ia, va, out.shape[0]), ("ib", "vb", ib, vb, out.shape[1])):
        check_index(iname, idx)
        check_rank(iname, idx, 2, "[tokens, k]")
        if val.shape != idx.shape:
            raise ValueError(f"{vname} must have the shape of {iname} {tuple(idx.shape)}, got {tuple(val.shape)}")
        check_index_bounds(iname, idx, n)
    if ia.shape[0] != ib.shape[0]:
        raise ValueError(f"ia and ib must have the same tokens, got {ia.shape[0]} and {ib.shape[0]}")
    check_same_device(out=out, ia=ia, va=va, ib=ib, vb=vb)


def _codes(e: Example, n: int, g: torch.Generator) -> torch.Tensor:
    k = min(e.k, n)
    if not e.T or not k:
        return torch.zeros(e.T, k, dtype=torch.int64)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(e.T)])


def _sparse_outer_update_example(e: Example) -> tuple:
    g = e.generator()
    nb = max(1, e.n // 2 + 1)
    ia, ib = _codes(e, e.n, g), _codes(e, nb, g)
    if e.bad_index is not None and ia.numel():
        ia.view(-1)[0] = e.bad_index
    va = plant_special(torch.rand(ia.shape, generator=g).to(e.dtype), e.special)
    vb = torch.rand(ib.shape, generator=g).to(e.dtype)
    out = torch.zeros(e.n, nb, dtype=torch.float64)
    return tuple(t.to(e.device) for t in (out, ia, va, ib, vb))


_SCHEMA = "(Tensor(a!) out, Tensor ia, Tensor va, Tensor ib, Tensor vb, str backend) -> ()"

ENTRY = register(entry_from(globals(), "sparse_outer_update", _SCHEMA, "va"))


def sparse_outer_update(
    out: torch.Tensor,
    ia: torch.Tensor,
    va: torch.Tensor,
    ib: torch.Tensor,
    vb: torch.Tensor,
    backend: str | None = None,
) -> None:
    """out [n_a, n_b] += the raw cross-product of two sets of top-k codes, in place
    (ia, va [T, k_a]; ib, vb [T, k_b]; indices in [-1, n)); see the module docstring."""
    torch.ops.supanalysis.sparse_outer_update(out, ia, va, ib, vb, backend or "")
