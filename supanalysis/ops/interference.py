"""interference: how feature directions overlap, without the n x n Gram matrix.

Anatomy: ``interference_reference`` (float64, row blocks), ``interference_cpu``
(csrc/cpu/interference.cpp), ``interference_triton`` (supanalysis/kernels/interference.py),
``interference_cuda`` (csrc/cuda/interference.cu), registered as ``supanalysis::interference``.

For directions ``W [n, m]`` (rows are features) and, optionally, ``V [k, m]``:
  norms           |W_i|
  sq_interference sum_{j != i} (Ŵ_i . W_j)^2        (with V: sum_j (Ŵ_i . V_j)^2)
  sq_cos          sum_{j != i} cos(W_i, W_j)^2        (with V: against every V_j)
  dims            D_i = |W_i|^4 / sum_j (W_i . W_j)^2, 0 for a zero row (without V only)
  max_abs_cos     max_{j != i} |cos(W_i, W_j)|, 0 when no partner interferes
  argmax          that partner, -1 when max_abs_cos is 0; ties go to the smallest index
  topk_cos        [n, topk] signed cosines of the topk partners by |cos| (0 when empty)
  topk_index      [n, topk] their indices, -1 when fewer than topk partners interfere
Zero rows have cosine 0 with everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._backend import lazy, native
from ._common import check_float, check_rank, check_same_device, clamp_topk, plant_special
from .registry import Example, entry_from, fake_like, register

PRECISIONS = ("ieee", "tf32")
DEFAULT_MAX_BYTES = 1 << 30  # dense interference_matrix refuses beyond 1 GiB


@dataclass(frozen=True)
class InterferenceResult:
    """Per-feature interference of ``W [n, m]`` (see the module docstring) and summaries."""

    norms: torch.Tensor
    sq_interference: torch.Tensor
    sq_cos: torch.Tensor
    dims: torch.Tensor | None
    max_abs_cos: torch.Tensor
    argmax: torch.Tensor
    topk_cos: torch.Tensor
    topk_index: torch.Tensor
    m: int

    @property
    def n(self) -> int:
        return self.norms.numel()

    @property
    def sum_dims(self) -> float:
        """Σ_i D_i: equals m for a tight frame, n for orthogonal features (n ≤ m)."""
        if self.dims is None:
            raise ValueError("dims are defined for interference(W) without V")
        return float(self.dims.sum())

    @property
    def d_star(self) -> float:
        """Elhage's mean dimensionality D* = m / |W|_F^2 (inf for an all-zero W)."""
        fro2 = float((self.norms.double() ** 2).sum())
        return self.m / fro2 if fro2 > 0 else math.inf

    @property
    def total_sq_cos(self) -> float:
        """Σ_{i≠j} cos^2 over ordered pairs (compare with :attr:`welch_bound`)."""
        return float(self.sq_cos.sum())

    @property
    def welch_bound(self) -> float:
        """Lower bound on Σ_{i≠j} cos^2 for n unit vectors in R^m: max(n^2/m - n, 0)."""
        return max(self.n * self.n / self.m - self.n, 0.0) if self.m else 0.0


# ----------------------------------------------------------------------------- reference
def _unit_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X64 = X.to(torch.float64)
    nrm = X64.norm(dim=1)
    inv = torch.where(nrm > 0, 1.0 / nrm, torch.zeros_like(nrm))
    return nrm, X64 * inv[:, None]


def interference_reference(
    W: torch.Tensor, V: torch.Tensor | None, topk: int, block: int, precision: str = "ieee"
) -> list[torch.Tensor]:
    """Float64 ground truth in row blocks of ``block`` (memory O(block * n)); exact at any precision."""
    n = W.shape[0]
    nrm, Wn = _unit_rows(W)
    if V is None:
        col_nrm, Cn = nrm, Wn
    else:
        col_nrm, Cn = _unit_rows(V)
    col_nsq = col_nrm**2
    f64 = dict(dtype=torch.float64, device=W.device)
    sq = torch.zeros(n, **f64)
    sqcos = torch.zeros(n, **f64)
    maxabs = torch.zeros(n, **f64)
    argmax = torch.full((n,), -1, dtype=torch.int64, device=W.device)
    tk_cos = torch.zeros(n, topk, **f64)
    tk_idx = torch.full((n, topk), -1, dtype=torch.int64, device=W.device)
    bs = block if block > 0 else 1024
    k_eff = min(topk, Cn.shape[0])
    for r0 in range(0, n, bs):
        r1 = min(n, r0 + bs)
        G = Wn[r0:r1] @ Cn.T  # cosines, (rows, cols)
        valid = torch.ones_like(G, dtype=torch.bool)
        if V is None:
            rows = torch.arange(r0, r1, device=W.device)
            valid[rows - r0, rows] = False
        G = torch.where(valid, G, 0.0)
        sq[r0:r1] = (G * G * col_nsq).sum(1)
        sqcos[r0:r1] = (G * G).sum(1)
        A = torch.where(valid, G.abs(), -1.0)
        if A.shape[1]:
            mx, am = A.max(1)
            pos = mx > 0
            maxabs[r0:r1] = torch.where(pos, mx, 0.0)
            argmax[r0:r1] = torch.where(pos, am, -1)
        if k_eff:
            tv, ti = A.topk(k_eff, dim=1)
            pos = tv > 0
            tk_cos[r0:r1, :k_eff] = torch.where(pos, G.gather(1, ti), 0.0)
            tk_idx[r0:r1, :k_eff] = torch.where(pos, ti, -1)
    if V is None:
        nsq = nrm**2
        dims = torch.where(nsq > 0, nsq / (nsq + sq), 0.0)
    else:
        dims = torch.empty(0, **f64)
    return [nrm, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx]


# ----------------------------------------------------------------------------- native
# The C++ and CUDA backends multiply at full precision whatever `precision` asks (CPU BLAS
# has no TF32; the CUDA tiles run at.mm under torch's own float32 matmul setting).
def interference_cpu(
    W: torch.Tensor, V: torch.Tensor | None, topk: int, block: int, precision: str = "ieee"
) -> list[torch.Tensor]:
    return native().interference_cpu(W, V, int(topk), int(block))


def interference_cuda(
    W: torch.Tensor,
    V: torch.Tensor | None,
    topk: int,
    block: int,
    precision: str = "ieee",
    symmetric: bool | None = None,
) -> list[torch.Tensor]:
    """symmetric: None = half the GEMM wherever it applies (V None, topk 0); False = row sweeps."""
    sym = -1 if symmetric is None else int(bool(symmetric))
    return native().interference_cuda(W, V, int(topk), int(block), sym)


interference_triton = lazy("supanalysis.kernels.interference", "interference_triton")


# ----------------------------------------------------------------------------- registration
def _interference_fake(W, V, topk, block, backend, precision):
    n, f64, i64 = W.shape[0], torch.float64, torch.int64
    dims = n if V is None else 0
    return fake_like(
        W, (f64, n), (f64, n), (f64, n), (f64, dims), (f64, n), (i64, n), (f64, (n, topk)), (i64, (n, topk))
    )


def _interference_check(
    backend: str, W: torch.Tensor, V: torch.Tensor | None, topk: int, block: int, precision: str
) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_directions("W", W)
    if V is not None:
        _check_directions("V", V)
        if V.shape[1] != W.shape[1]:
            raise ValueError(f"V must have W's dim m={W.shape[1]}, got shape {tuple(V.shape)}")
        check_same_device(W=W, V=V)
    partners = W.shape[0] - 1 if V is None else V.shape[0]
    if topk != clamp_topk(topk, partners):
        raise ValueError(f"topk must be in [0, {max(partners, 0)}] (the partners a row has), got {topk}")
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}")


def _interference_example(e: Example) -> tuple:
    g = e.generator()
    m = e.k + 3  # in one or two dimensions every pair ties in |cos|
    W = plant_special(torch.randn(e.n, m, generator=g).to(e.dtype), e.special)
    V = torch.randn(e.T, m, generator=g).to(e.dtype) if e.T % 2 else None
    topk = min(2, e.n - 1 if V is None else V.shape[0])
    return W.to(e.device), None if V is None else V.to(e.device), max(topk, 0), 0, "ieee"


# Directions must be finite: every special value is refused.
_CASES = {"bench_cases": ("interference", "interference_topk"), "special_values": ()}
_SCHEMA = "(Tensor W, Tensor? V, int topk, int block, str backend, str precision) -> Tensor[]"

ENTRY = register(entry_from(globals(), "interference", _SCHEMA, "W", **_CASES))


# ----------------------------------------------------------------------------- public
def _check_directions(name: str, X: torch.Tensor) -> None:
    check_float(name, X)
    check_rank(name, X, 2, "[features, dim]")
    if X.numel() and not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf); directions must be finite")


def _check_rank_only(name: str, X: torch.Tensor) -> None:
    check_float(name, X)
    check_rank(name, X, 2, "[features, dim]")


def interference(
    W: torch.Tensor,
    V: torch.Tensor | None = None,
    topk: int = 0,
    *,
    block: int = 0,
    backend: str | None = None,
    precision: str = "ieee",
) -> InterferenceResult:
    """Interference of feature directions. W: (n, m); V: (k, m) or None; see module doc.

    ``block`` sets the tile edge (0 = the backend's default); memory stays O(block * n).
    ``topk`` is clamped to the partners a row has (n - 1, or k with V).
    ``precision="tf32"`` (opt-in, float32 inputs, Triton backend on a GPU) multiplies on
    TF32 tensor cores: max_abs_cos, argmax and top-k stay exact (candidates are rescored in
    float64), the sums (sq_interference, sq_cos, dims) carry ~1e-3 relative error. Other
    backends and dtypes compute at full precision either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_rank_only("W", W)  # the rest is checked at the op boundary (_check)
    if V is not None:
        _check_rank_only("V", V)
    topk = clamp_topk(topk, W.shape[0] - 1 if V is None else V.shape[0])
    out = torch.ops.supanalysis.interference(W, V, topk, block, backend or "", precision)
    norms, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx = out
    return InterferenceResult(
        norms=norms,
        sq_interference=sq,
        sq_cos=sqcos,
        dims=dims if V is None else None,
        max_abs_cos=maxabs,
        argmax=argmax,
        topk_cos=tk_cos,
        topk_index=tk_idx,
        m=W.shape[1],
    )


def interference_matrix(W: torch.Tensor, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """The dense float64 cosine matrix of W's rows, for small n only. W: (n, m) -> (n, n)."""
    _check_directions("W", W)
    need = W.shape[0] ** 2 * 8
    if need > max_bytes:
        raise MemoryError(
            f"interference_matrix would hold {need / 2**30:.2f} GiB (n={W.shape[0]}), over "
            f"max_bytes={max_bytes / 2**30:.2f} GiB; use supanalysis.interference(W), which "
            "computes every per-feature reduction tile by tile in O(n) memory"
        )
    _, Wn = _unit_rows(W)
    return Wn @ Wn.T
