"""Triton backend of ``supanalysis::interference``: flash-style, never the n x n matrix.

Contract: ``supanalysis/ops/interference.py``. Outputs, in order: norms, sq_interference,
sq_cos, dims (empty when V is given), max_abs_cos [n] float64, argmax [n] int64,
topk_cos [n, topk] float64, topk_index [n, topk] int64.

A program owns BLOCK_M rows of W and sweeps the columns (rows of W, or of V) in BLOCK_N
tiles; each tile of cosines comes from tl.dot and is consumed by a
fused epilogue (squared sums, running max/argmax, running top-k), so memory is
O(n * (m + topk)).

Precision: the dot multiplies the input rows themselves (scaled by an exact power of two
against overflow), and 1/|W_i| * 1/|W_j| is applied in the epilogue, so a cosine carries
only accumulation rounding. float32 uses the full-precision dot
(``input_precision="ieee"``: TF32 would cost 13 bits of every cosine); float16/bfloat16
use the tensor-core dot with float32 accumulation; float64 is multiplied in float64.
Per-tile sums are float32 (float64 for float64 inputs), added into float64 row
accumulators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_dtype

# Larger than any index: the neutral element of the index argmin (a constexpr, so
# kernels may read it as a global).
_NO_INDEX = tl.constexpr(2**62)


@triton.jit
def _interference_kernel(
    sq_ptr,  # [n] float64  sum_j cos^2 * |C_j|^2
    sqcos_ptr,  # [n] float64  sum_j cos^2
    maxabs_ptr,  # [n] float64
    argmax_ptr,  # [n] int64
    tkcos_ptr,  # [n, TOPK] float64, contiguous
    tkidx_ptr,  # [n, TOPK] int64, contiguous
    a_ptr,  # [n, m] rows of W, each scaled by an exact power of two
    b_ptr,  # [nc, m] rows of the columns (W or V), scaled likewise
    ainv_ptr,  # [n] 1 / |scaled row| in the compute dtype (0 for a zero row)
    binv_ptr,  # [nc]
    bnsq_ptr,  # [nc] |C_j|^2 in the compute dtype
    n,
    nc,
    m,
    stride_an,
    stride_am,
    stride_bn,
    stride_bm,
    SELF: tl.constexpr,  # columns are W itself: exclude j == i
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,  # TOPK rounded up to a power of two (>= 2)
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = rows < n
    slot = tl.arange(0, TOPK_P)

    run_sq = tl.zeros([BLOCK_M], dtype=tl.float64)
    run_sqcos = tl.zeros([BLOCK_M], dtype=tl.float64)
    # 0 / -1 is the "nothing interferes" answer; only a strictly positive |cos| replaces it.
    run_max = tl.zeros([BLOCK_M], dtype=ACC)
    run_arg = tl.full([BLOCK_M], -1, dtype=tl.int64)
    # Running top-k, sorted by |cos| descending, ties by index. Empty slots hold |cos| 0
    # (never displaced by a zero cosine); padding slots >= TOPK hold -2 (never selected).
    top_v = tl.where(slot[None, :] < TOPK, 0.0, -2.0) + tl.zeros([BLOCK_M, TOPK_P], dtype=ACC)
    top_c = tl.zeros([BLOCK_M, TOPK_P], dtype=ACC)
    top_i = tl.full([BLOCK_M, TOPK_P], -1, dtype=tl.int64)

    for c0 in range(0, nc, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_c = cols < nc
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, m, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < m
            a = tl.load(
                a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_am,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bm,
                mask=mask_k[:, None] & mask_c[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision="ieee")
        # Normalise in the epilogue: the dot saw the exact input values, so a cosine
        # carries only float32 rounding, never a rounded 16-bit unit row.
        ainv = tl.load(ainv_ptr + rows, mask=mask_r, other=0.0)
        binv = tl.load(binv_ptr + cols, mask=mask_c, other=0.0)
        acc = acc * ainv[:, None] * binv[None, :]

        valid = mask_r[:, None] & mask_c[None, :]
        if SELF:
            valid = valid & (rows[:, None] != cols[None, :])
        g = tl.where(valid, acc, 0.0)
        g2 = g * g
        nsq = tl.load(bnsq_ptr + cols, mask=mask_c, other=0.0)
        run_sq += tl.sum(g2 * nsq[None, :], axis=1).to(tl.float64)
        run_sqcos += tl.sum(g2, axis=1).to(tl.float64)

        cand = tl.where(valid, tl.abs(g), -1.0)
        tmax = tl.max(cand, axis=1)
        targ = tl.min(tl.where(cand == tmax[:, None], cols[None, :], _NO_INDEX), axis=1)
        # Strict >: columns arrive in increasing order, so an earlier tile keeps a tie.
        better = tmax > run_max
        run_max = tl.where(better, tmax, run_max)
        run_arg = tl.where(better, targ, run_arg)

        if TOPK > 0:
            kth = tl.sum(tl.where(slot[None, :] == TOPK - 1, top_v, 0.0), axis=1)
            # Skip the merge when no row's best in this tile beats its k-th: after the
            # first few tiles this is the common case and the epilogue is two reductions.
            if tl.max(tmax - kth, axis=0) > 0:
                new_v = tl.full([BLOCK_M, TOPK_P], -2.0, dtype=ACC)
                new_c = tl.zeros([BLOCK_M, TOPK_P], dtype=ACC)
                new_i = tl.full([BLOCK_M, TOPK_P], -1, dtype=tl.int64)
                rv = top_v
                # A runtime loop, not static_range: unrolling 32 extraction rounds made
                # ptxas take minutes for one kernel.
                for r in range(TOPK):
                    # Best remaining tile candidate (smallest column among ties) against
                    # the best remaining running entry (smaller indices: wins ties).
                    bt = tl.max(cand, axis=1)
                    bt_col = tl.min(tl.where(cand == bt[:, None], cols[None, :], _NO_INDEX), axis=1)
                    br = tl.max(rv, axis=1)
                    br_slot = tl.min(tl.where(rv == br[:, None], slot[None, :], TOPK_P), axis=1)
                    take_t = bt > br
                    hit_t = cols[None, :] == bt_col[:, None]
                    hit_r = slot[None, :] == br_slot[:, None]
                    c_t = tl.sum(tl.where(hit_t, g, 0.0), axis=1)
                    c_r = tl.sum(tl.where(hit_r, top_c, 0.0), axis=1)
                    i_r = tl.sum(tl.where(hit_r, top_i, 0), axis=1)
                    here = slot[None, :] == r
                    new_v = tl.where(here, tl.where(take_t, bt, br)[:, None], new_v)
                    new_c = tl.where(here, tl.where(take_t, c_t, c_r)[:, None], new_c)
                    new_i = tl.where(here, tl.where(take_t, bt_col, i_r)[:, None], new_i)
                    cand = tl.where(hit_t & take_t[:, None], -2.0, cand)
                    rv = tl.where(hit_r & (~take_t)[:, None], -2.0, rv)
                top_v = new_v
                top_c = new_c
                top_i = new_i

    tl.store(sq_ptr + rows, run_sq, mask=mask_r)
    tl.store(sqcos_ptr + rows, run_sqcos, mask=mask_r)
    tl.store(maxabs_ptr + rows, run_max.to(tl.float64), mask=mask_r)
    tl.store(argmax_ptr + rows, run_arg, mask=mask_r)
    if TOPK > 0:
        out = rows[:, None] * TOPK + slot[None, :]
        mask_o = mask_r[:, None] & (slot[None, :] < TOPK)
        tl.store(tkcos_ptr + out, top_c.to(tl.float64), mask=mask_o)
        tl.store(tkidx_ptr + out, top_i, mask=mask_o)


def _scaled_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|X_i| in float64, rows scaled by 2^-e_i in X's dtype, 1 / |scaled row| float64).

    Scaling each row so its largest entry lies in [0.5, 1) is exact (a power of two) and
    keeps float32 dot products of bfloat16/float32/float64 rows from overflowing. Rounding
    unit rows to the input dtype instead would cost 8 bits per cosine in bfloat16.
    float16 rows (|x| <= 65504) cannot overflow a float32 dot and are used as they are.
    """
    nrm = torch.linalg.vector_norm(X, dim=1, dtype=torch.float64)
    if X.dtype == torch.float16 or X.numel() == 0:
        Xs, nrm_s = X, nrm
    else:
        amax = X.abs().amax(dim=1).to(torch.float64)
        e = torch.frexp(amax).exponent.to(torch.float64)  # amax = f * 2^e, f in [0.5, 1)
        scale = torch.exp2(-e)
        Xs = (X.to(torch.float64) * scale[:, None]).to(X.dtype)
        nrm_s = nrm * scale
    inv = torch.where(nrm_s > 0, 1.0 / nrm_s, torch.zeros_like(nrm_s))
    return nrm, Xs, inv


def interference_triton(W: torch.Tensor, V: torch.Tensor | None, topk: int, block: int) -> list[torch.Tensor]:
    """W: (n, m); V: (k, m) or None; topk >= 0; block: tile edge hint (0 = default 64)."""
    n, m = W.shape
    device = W.device
    topk = int(topk)
    f64 = dict(dtype=torch.float64, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    if V is not None and V.dtype != W.dtype:
        # One dot dtype for both operands: the wider of the two.
        common = torch.promote_types(W.dtype, V.dtype)
        W, V = W.to(common), V.to(common)
    nrm, Wn, w_inv = _scaled_rows(W)
    if V is None:
        col_nrm, Cn, c_inv = nrm, Wn, w_inv
    else:
        col_nrm, Cn, c_inv = _scaled_rows(V)
    nc = Cn.shape[0]
    sq = torch.zeros(n, **f64)
    sqcos = torch.zeros(n, **f64)
    maxabs = torch.zeros(n, **f64)
    argmax = torch.full((n,), -1, **i64)
    tk_cos = torch.zeros(n, topk, **f64)
    tk_idx = torch.full((n, topk), -1, **i64)
    if n > 0 and nc > 0:
        acc = compute_dtype(W.dtype)
        acc_torch = torch.float64 if acc == tl.float64 else torch.float32
        bnsq = (col_nrm * col_nrm).to(acc_torch)
        # Square tiles; tl.dot needs every edge >= 16. 64 balances the register cost of
        # the top-k epilogue ([BLOCK_M, BLOCK_N] candidates) against column reuse.
        edge = 64 if block <= 0 else max(16, min(128, triton.next_power_of_2(int(block))))
        BLOCK_K = max(16, min(64, triton.next_power_of_2(max(m, 1))))
        _interference_kernel[(triton.cdiv(n, edge),)](
            sq, sqcos, maxabs, argmax, tk_cos, tk_idx,
            Wn, Cn, w_inv.to(acc_torch), c_inv.to(acc_torch), bnsq, n, nc, m,
            Wn.stride(0), Wn.stride(1), Cn.stride(0), Cn.stride(1),
            SELF=V is None, TOPK=topk, TOPK_P=max(2, triton.next_power_of_2(max(topk, 1))),
            ACC=acc, BLOCK_M=edge, BLOCK_N=edge, BLOCK_K=BLOCK_K,
        )  # fmt: skip
    if V is None:
        nsq = nrm * nrm
        dims = torch.where(nsq > 0, nsq / (nsq + sq), 0.0)
    else:
        dims = torch.empty(0, **f64)
    return [nrm, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx]
