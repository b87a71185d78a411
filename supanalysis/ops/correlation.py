"""Cross-model correlation: streaming centred co-moments and the fused best match.

Two ops, each with the full anatomy:

``cross_moments_update`` (``supanalysis::cross_moments_update``, mutates ``comoment``)
  comoment [n_a, n_b] float64 is the running Σ_t (xa_t - μa)(xb_t - μb)ᵀ over ``n_prev``
  tokens with running means ``mean_a_prev [n_a]``, ``mean_b_prev [n_b]``. One batch
  ``xa [T, n_a]``, ``xb [T, n_b]`` is merged with Chan's formula,
  C += C_batch + (n_prev·T / (n_prev + T)) · (μa_batch − μa)(μb_batch − μb)ᵀ,
  and the batch's own (mean_a, m2_a, mean_b, m2_b) are returned (float64) for the caller
  to merge into its per-feature state. Batches must be finite (the accumulator drops
  and counts tokens with non-finite values before calling).
  ``precision`` (see :data:`PRECISIONS`) sets how the centred values are multiplied:
  "ieee" (default) keeps them in the compute precision (float32 for 16/32-bit batches,
  float64 for float64 ones) with exact float32 products; "bf16" (16/32-bit batches) rounds
  each centred value to bfloat16 (relative error <= 2^-9) and accumulates the exact
  products in float32: the GPU's tensor-core GEMM; every backend forms the same products
  (the CPU rounds too, at no gain in speed) and the sums agree to float32 summation. The per-feature
  means and M2 are exact either way; only the co-moment carries the rounding.

``sparse_outer_update`` (``supanalysis::sparse_outer_update``, mutates ``out``)
  out [n_a, n_b] float64 += Σ_t Σ_p Σ_q va[t,p]·vb[t,q] at (ia[t,p], ib[t,q]): the raw
  cross-product of two sets of top-k codes (ia [T, k_a], ib [T, k_b]; -1 = padding),
  k_a·k_b float64 products per token instead of an n_a·n_b GEMM. The accumulator turns it
  into the batch's centred co-moment (see ``CrossCorrelation.update_sparse``).

``best_match`` (``supanalysis::best_match``)
  corr_ij = C_ij · inv_std_a_i · inv_std_b_j, clamped to [-1, 1]; a feature with
  inv_std 0 (constant) has correlation 0 with everything and is nobody's match. Returns
  max_corr_a [n_a], match_a [n_a] (best partner in B, -1 if none), max_corr_b, match_b.
  The maximum is the signed maximum (anti-correlation is not a match); ties go to the
  smallest index. The correlation matrix is never materialised. Inputs must be finite (a
  ``CrossCorrelation`` state always is); with a NaN correlation the backends differ (the
  C++ kernel skips it, the float64 reference reports no match for its row and column).
  Checking would cost a second read of C, so it is not done.
"""

from __future__ import annotations

import torch

from .._backend import lazy, native, resolve

IMPLEMENTED = ("reference", "cpp", "triton", "cuda")
#: How the centred batch is multiplied in ``cross_moments_update`` (module docstring).
PRECISIONS = ("ieee", "bf16")
PREFERRED = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


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


# ----------------------------------------------------------------------------- references
def cross_moments_update_reference(
    comoment: torch.Tensor,
    n_prev: int,
    mean_a_prev: torch.Tensor,
    mean_b_prev: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    precision: str = "ieee",
) -> list[torch.Tensor]:
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


# ----------------------------------------------------------------------------- native
def cross_moments_update_cpu(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision: str = "ieee"):
    check_precision(precision, xa.dtype, xb.dtype)
    bf16 = precision == "bf16"
    return native().cross_moments_update_cpu(comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, bf16)


def cross_moments_update_cuda(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision: str = "ieee"):
    """precision "bf16": centred values rounded to bfloat16 and multiplied on the tensor cores."""
    check_precision(precision, xa.dtype, xb.dtype)
    bf16 = precision == "bf16"
    return native().cross_moments_update_cuda(comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, bf16)


def sparse_outer_update_cpu(out, ia, va, ib, vb):
    native().sparse_outer_update_cpu(out, ia, va, ib, vb)


def sparse_outer_update_cuda(out, ia, va, ib, vb):
    native().sparse_outer_update_cuda(out, ia, va, ib, vb)


def best_match_cpu(comoment, inv_std_a, inv_std_b):
    return native().best_match_cpu(comoment, inv_std_a, inv_std_b)


def best_match_cuda(comoment, inv_std_a, inv_std_b):
    return native().best_match_cuda(comoment, inv_std_a, inv_std_b)


cross_moments_update_triton = lazy("supanalysis.kernels.correlation", "cross_moments_update_triton")
best_match_triton = lazy("supanalysis.kernels.correlation", "best_match_triton")
sparse_outer_update_triton = lazy("supanalysis.kernels.correlation", "sparse_outer_update_triton")

UPDATE_IMPLS = {
    "reference": cross_moments_update_reference,
    "cpp": cross_moments_update_cpu,
    "triton": cross_moments_update_triton,
    "cuda": cross_moments_update_cuda,
}
SPARSE_OUTER_IMPLS = {
    "reference": sparse_outer_update_reference,
    "cpp": sparse_outer_update_cpu,
    "triton": sparse_outer_update_triton,
    "cuda": sparse_outer_update_cuda,
}
BEST_MATCH_IMPLS = {
    "reference": best_match_reference,
    "cpp": best_match_cpu,
    "triton": best_match_triton,
    "cuda": best_match_cuda,
}


# ----------------------------------------------------------------------------- registration
@torch.library.custom_op("supanalysis::cross_moments_update", mutates_args=("comoment",))
def _cross_moments_update_op(
    comoment: torch.Tensor,
    n_prev: int,
    mean_a_prev: torch.Tensor,
    mean_b_prev: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    backend: str,
    precision: str,
) -> list[torch.Tensor]:
    name = resolve("cross_moments_update", xa.device, backend or None, IMPLEMENTED, PREFERRED, xa.dtype)
    return list(UPDATE_IMPLS[name](comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, precision))


@_cross_moments_update_op.register_fake
def _(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, backend, precision):
    f64 = dict(dtype=torch.float64, device=xa.device)
    na, nb = xa.shape[1], xb.shape[1]
    return [xa.new_empty(na, **f64), xa.new_empty(na, **f64), xb.new_empty(nb, **f64), xb.new_empty(nb, **f64)]


@torch.library.custom_op("supanalysis::sparse_outer_update", mutates_args=("out",))
def _sparse_outer_update_op(
    out: torch.Tensor, ia: torch.Tensor, va: torch.Tensor, ib: torch.Tensor, vb: torch.Tensor, backend: str
) -> None:
    name = resolve("sparse_outer_update", out.device, backend or None, IMPLEMENTED, PREFERRED, va.dtype)
    SPARSE_OUTER_IMPLS[name](out, ia, va, ib, vb)


@_sparse_outer_update_op.register_fake
def _(out, ia, va, ib, vb, backend):
    return None


@torch.library.custom_op("supanalysis::best_match", mutates_args=())
def _best_match_op(
    comoment: torch.Tensor, inv_std_a: torch.Tensor, inv_std_b: torch.Tensor, backend: str
) -> list[torch.Tensor]:
    name = resolve("best_match", comoment.device, backend or None, IMPLEMENTED, PREFERRED, comoment.dtype)
    return list(BEST_MATCH_IMPLS[name](comoment, inv_std_a, inv_std_b))


@_best_match_op.register_fake
def _(comoment, inv_std_a, inv_std_b, backend):
    na, nb = comoment.shape
    f64 = dict(dtype=torch.float64, device=comoment.device)
    i64 = dict(dtype=torch.int64, device=comoment.device)
    return [
        comoment.new_empty(na, **f64),
        comoment.new_empty(na, **i64),
        comoment.new_empty(nb, **f64),
        comoment.new_empty(nb, **i64),
    ]


def cross_moments_update(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, backend=None, precision="ieee"):
    """Merge one finite batch into ``comoment`` in place; see the module docstring."""
    check_precision(precision, xa.dtype, xb.dtype)  # before dispatch: the message names the argument
    return torch.ops.supanalysis.cross_moments_update(
        comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, backend or "", precision
    )


def sparse_outer_update(out, ia, va, ib, vb, backend=None):
    """out += the raw cross-product of two sets of top-k codes, in place (validated inputs:
    int64 indices in [-1, n), values of one float dtype); see the module docstring."""
    torch.ops.supanalysis.sparse_outer_update(out, ia, va, ib, vb, backend or "")


def best_match(comoment, inv_std_a, inv_std_b, backend=None):
    """(max_corr_a, match_a, max_corr_b, match_b); see the module docstring."""
    return torch.ops.supanalysis.best_match(comoment, inv_std_a, inv_std_b, backend or "")
