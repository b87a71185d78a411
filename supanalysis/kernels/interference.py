"""Triton backend of ``supanalysis::interference``: flash-style, never the n x n matrix.

Contract: ``supanalysis/ops/interference.py``. Outputs, in order: norms, sq_interference,
sq_cos, dims (empty when V is given), max_abs_cos [n] float64, argmax [n] int64,
topk_cos [n, topk] float64, topk_index [n, topk] int64.

Two kernels. The row-sweeping one: a program owns BLOCK_M rows of W and sweeps the columns
(rows of W, or of V) in BLOCK_N tiles; each tile of cosines comes from tl.dot and is
consumed by a fused epilogue (squared sums, running max/argmax, running top-k), so memory
is O(n * (m + topk)). The symmetric one (W against itself, no top-k): a program per tile
of the upper triangle, whose cosines feed both their rows' and their columns' reductions
through atomics, so the GEMM work halves.

Precision: the dot multiplies the input rows themselves (scaled by an exact power of two
against overflow), and 1/|W_i| * 1/|W_j| is applied in the epilogue, so a cosine carries
only accumulation rounding. float32 uses the full-precision dot
(``input_precision="ieee"``: TF32 would cost 13 bits of every cosine) unless the caller
opts in with ``precision="tf32"``; float16/bfloat16 use the tensor-core dot with float32
accumulation (their products are exact in float32, so nothing is lost but accumulation
rounding); float64 is multiplied in float64. Per-tile sums are float32 (float64 for
float64 inputs), added into float64 row accumulators.

TF32 (float32 inputs, opt-in): a cosine then carries up to about 2^-10 + m 2^-24 of error,
enough to swap near-duplicate partners. So the kernel keeps ``_TF32_SPARE`` more
candidates than asked, and :func:`rescore_partners` recomputes their cosines exactly in
float64 and re-ranks them; a row whose candidate list might have missed a partner (its
k-th exact |cos| is within the error bound of the weakest candidate's TF32 score) is
recomputed exactly against every column. max_abs_cos, argmax and the top-k are therefore
exact; the sums (sq_interference, sq_cos, dims) keep TF32's ~1e-3 relative error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_dtype, interpreting

# Larger than any index: the neutral element of the index argmin (a constexpr, so
# kernels may read it as a global).
_NO_INDEX = tl.constexpr(2**62)


@triton.jit
def _tile_dot(
    a_ptr, b_ptr, rows, cols, mask_r, mask_c, m, stride_an, stride_am, stride_bn, stride_bm,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """[rows, cols] tile of A B^T (rows of A against rows of B), accumulated in ACC."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
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
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


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
    bnsq_ptr,  # [nc] |C_j|^2 float64 (|C_j| up to 3e38 would overflow a float32 square)
    n,
    nc,
    m,
    stride_an,
    stride_am,
    stride_bn,
    stride_bm,
    SELF: tl.constexpr,  # columns are W itself: exclude j == i
    DOT_PRECISION: tl.constexpr,  # "ieee", or "tf32" for float32 inputs (opt-in)
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
        acc = _tile_dot(
            a_ptr, b_ptr, rows, cols, mask_r, mask_c, m, stride_an, stride_am, stride_bn, stride_bm,
            ACC, DOT_PRECISION, BLOCK_K,
        )  # fmt: skip
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
        run_sq += tl.sum(g2.to(tl.float64) * nsq[None, :], axis=1)
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


# Packed (|cos|, index) keys: a non-negative float32's bits order like the float, so
# (bits << 32) | (_KEY_LOW - index) orders by |cos| and then by the smaller index, and one
# integer atomic_max merges running maxima from many programs with the tie rule intact.
_KEY_LOW = tl.constexpr(2**31 - 1)


@triton.jit
def _packed_key(absval, index):
    bits = absval.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | (_KEY_LOW - index)


@triton.jit
def _interference_sym_kernel(
    sq_ptr,  # [n] float64, zero-initialised: sum_j cos^2 * |W_j|^2, accumulated atomically
    sqcos_ptr,  # [n] float64, zero-initialised: sum_j cos^2
    key_ptr,  # [n] int64, zero-initialised: packed (max |cos|, argmax)
    a_ptr,  # [n, m] rows of W, each scaled by an exact power of two
    ainv_ptr,  # [n] 1 / |scaled row| (0 for a zero row)
    nsq_ptr,  # [n] |W_j|^2 float64
    n,
    m,
    stride_an,
    stride_am,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (bi, bj) owns the tile of row block bi against row block bj, for bj >= bi
    # only: each off-diagonal cosine is computed once and feeds both its row's and its
    # column's reductions (half the GEMM of the row-sweeping kernel). Programs below the
    # diagonal exit at once.
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bj >= bi:
        rows = bi.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        cols = bj.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask_r = rows < n
        mask_c = cols < n
        acc = _tile_dot(
            a_ptr, a_ptr, rows, cols, mask_r, mask_c, m, stride_an, stride_am, stride_an, stride_am,
            tl.float32, "ieee", BLOCK_K,
        )  # fmt: skip
        ainv_r = tl.load(ainv_ptr + rows, mask=mask_r, other=0.0)
        ainv_c = tl.load(ainv_ptr + cols, mask=mask_c, other=0.0)
        valid = mask_r[:, None] & mask_c[None, :] & (rows[:, None] != cols[None, :])
        g = tl.where(valid, acc * ainv_r[:, None] * ainv_c[None, :], 0.0)
        g2 = g * g
        absg = tl.where(valid, tl.abs(g), -1.0)
        nsq_c = tl.load(nsq_ptr + cols, mask=mask_c, other=0.0)
        # Row side: this tile's columns are row i's partners.
        tl.atomic_add(sq_ptr + rows, tl.sum(g2.to(tl.float64) * nsq_c[None, :], axis=1), mask=mask_r, sem="relaxed")
        tl.atomic_add(sqcos_ptr + rows, tl.sum(g2, axis=1).to(tl.float64), mask=mask_r, sem="relaxed")
        rmax = tl.max(absg, axis=1)
        rarg = tl.min(tl.where(absg == rmax[:, None], cols[None, :], _NO_INDEX), axis=1)
        tl.atomic_max(key_ptr + rows, _packed_key(rmax, rarg), mask=mask_r & (rmax > 0), sem="relaxed")
        # Column side: the same cosines seen from the other end (a diagonal tile already
        # holds both orders of each of its pairs).
        if bj != bi:
            nsq_r = tl.load(nsq_ptr + rows, mask=mask_r, other=0.0)
            tl.atomic_add(sq_ptr + cols, tl.sum(g2.to(tl.float64) * nsq_r[:, None], axis=0), mask=mask_c, sem="relaxed")
            tl.atomic_add(sqcos_ptr + cols, tl.sum(g2, axis=0).to(tl.float64), mask=mask_c, sem="relaxed")
            cmax = tl.max(absg, axis=0)
            carg = tl.min(tl.where(absg == cmax[None, :], rows[:, None], _NO_INDEX), axis=0)
            tl.atomic_max(key_ptr + cols, _packed_key(cmax, carg), mask=mask_c & (cmax > 0), sem="relaxed")


def _unpack_keys(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |cos| float64, argmax int64) from packed keys; 0 / -1 where nothing interferes."""
    bits = (key >> 32).to(torch.int32)
    value = bits.view(torch.float32).to(torch.float64)
    index = (2**31 - 1) - (key & 0xFFFFFFFF)
    none = bits == 0
    return torch.where(none, 0.0, value), torch.where(none, -1, index)


def _scaled_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|X_i| in float64, rows scaled by 2^-e_i in X's dtype, 1 / |scaled row| float64).

    Scaling each row so its largest entry lies in [0.5, 1) is exact (a power of two) and
    keeps float32 dot products of bfloat16/float32/float64 rows from overflowing. Rounding
    unit rows to the input dtype instead would cost 8 bits per cosine in bfloat16.
    float16 rows (|x| <= 65504) cannot overflow a float32 dot and are used as they are.
    Rows go in chunks of _PREP_ELEMS elements, so the float64 temporaries stay bounded (a
    whole-matrix float64 copy of a million 4096-d rows would be 32 GiB).
    """
    n = X.shape[0]
    nrm = torch.empty(n, dtype=torch.float64, device=X.device)
    keep = X.dtype == torch.float16 or X.numel() == 0
    Xs = X if keep else torch.empty_like(X)
    scale = torch.ones(n, dtype=torch.float64, device=X.device)
    step = max(1, _PREP_ELEMS // max(1, X.shape[1]))
    for a in range(0, n, step):
        x64 = X[a : a + step].to(torch.float64)
        nrm[a : a + step] = torch.linalg.vector_norm(x64, dim=1)
        if not keep:
            amax = x64.abs().amax(dim=1)
            e = torch.frexp(amax).exponent.to(torch.float64)  # amax = f * 2^e, f in [0.5, 1)
            scale[a : a + step] = torch.exp2(-e)
            Xs[a : a + step] = (x64 * scale[a : a + step, None]).to(X.dtype)
    nrm_s = nrm * scale
    inv = torch.where(nrm_s > 0, 1.0 / nrm_s, torch.zeros_like(nrm_s))
    return nrm, Xs, inv


_PREP_ELEMS = 1 << 24  # float64 elements per chunk of row preparation (128 MiB)
_TF32_SPARE = 8  # candidates kept beyond max(topk, 1) for the exact rescoring
_RESCORE_ELEMS = 1 << 25  # float64 elements per rescoring chunk (256 MiB)


def tf32_cos_error(m: int) -> float:
    """Bound on |TF32 cosine - exact cosine| for unit rows of length m.

    Each input rounds to TF32's 10-bit mantissa (relative 2^-11), so each product is off by
    at most ~2^-10 of |w_k c_k|, and sum |w_k c_k| <= 1 for unit rows; float32 accumulation
    adds at most m 2^-24. Doubled for safety: the bound is only used to decide when to
    recompute a row, so erring high costs time, never correctness.
    """
    return 2.0 * (2.0**-10 + m * 2.0**-24)


def _rank_order(absc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-row permutation: |cos| descending, ties to the smaller index, -1 slots last."""
    key_idx = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx)
    by_index = torch.argsort(key_idx, dim=1, stable=True)
    by_value = torch.argsort(-absc.gather(1, by_index), dim=1, stable=True)
    return by_index.gather(1, by_value)


def _exact_rows(
    W: torch.Tensor, C: torch.Tensor, w_nrm: torch.Tensor, c_nrm: torch.Tensor, rows: torch.Tensor, k: int, self_: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (|cos| descending, ties to the smaller index) of W[rows] against all of C."""
    nc = C.shape[0]
    inv_c = torch.where(c_nrm > 0, 1.0 / c_nrm, 0.0)
    out_v = torch.zeros(rows.numel(), k, dtype=torch.float64, device=W.device)
    out_i = torch.full((rows.numel(), k), -1, dtype=torch.int64, device=W.device)
    step = max(1, _RESCORE_ELEMS // max(nc * 2, 1))
    for s0 in range(0, rows.numel(), step):
        r = rows[s0 : s0 + step]
        inv_w = torch.where(w_nrm[r] > 0, 1.0 / w_nrm[r], 0.0)
        G = (W[r].double() @ C.double().T) * inv_w[:, None] * inv_c[None, :]
        A = G.abs()
        if self_:
            A[torch.arange(r.numel(), device=W.device), r] = -1.0
        A = torch.where(A > 0, A, -1.0)
        # Descending |cos|, then ascending column: a stable sort on -|cos| of columns in order.
        kk = min(k, nc)
        order = torch.argsort(-A, dim=1, stable=True)[:, :kk]
        v = G.gather(1, order)
        ok = A.gather(1, order) > 0
        out_v[s0 : s0 + r.numel(), :kk] = torch.where(ok, v, 0.0)
        out_i[s0 : s0 + r.numel(), :kk] = torch.where(ok, order, -1)
    return out_v, out_i


def rescore_partners(
    W: torch.Tensor,
    C: torch.Tensor,
    w_nrm: torch.Tensor,
    c_nrm: torch.Tensor,
    cand_cos: torch.Tensor,
    cand_idx: torch.Tensor,
    topk: int,
    err: float,
    self_: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (max_abs_cos, argmax, topk_cos, topk_index) from approximate candidates.

    cand_cos/cand_idx [n, K]: each row's K best partners by an approximate |cos| whose error
    is at most ``err`` (index -1: an empty slot, i.e. fewer partners scored above 0). Their
    cosines are recomputed in float64 from W and C and re-ranked. A partner outside the list
    scored at most the weakest candidate's approximate |cos| (0 when the list is not full),
    so its exact |cos| is at most that + err: a row whose t-th exact value (t = max(topk, 1))
    does not beat this is recomputed against every column.
    """
    n, K = cand_idx.shape
    t = max(topk, 1)
    if K < t:
        raise ValueError(f"need at least max(topk, 1) = {t} candidates per row, got {K}")
    f64 = dict(dtype=torch.float64, device=W.device)
    exact_abs = torch.full((n, K), -1.0, **f64)
    exact_cos = torch.zeros(n, K, **f64)
    inv_c = torch.where(c_nrm > 0, 1.0 / c_nrm, 0.0)
    step = max(1, _RESCORE_ELEMS // max(K * W.shape[1], 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        idx = cand_idx[r0:r1]
        safe = idx.clamp_min(0)
        inv_w = torch.where(w_nrm[r0:r1] > 0, 1.0 / w_nrm[r0:r1], 0.0)
        dots = torch.einsum("rm,rkm->rk", W[r0:r1].double(), C[safe].double())
        cos = dots * inv_w[:, None] * inv_c[safe]
        exact_cos[r0:r1] = torch.where(idx >= 0, cos, 0.0)
        exact_abs[r0:r1] = torch.where((idx >= 0) & (cos != 0), cos.abs(), -1.0)
    order = _rank_order(exact_abs, cand_idx)
    absc, idx, signed = exact_abs.gather(1, order), cand_idx.gather(1, order), exact_cos.gather(1, order)
    full = cand_idx[:, -1] >= 0
    weakest = torch.where(full, cand_cos[:, -1].abs().double(), 0.0)
    tth = absc[:, min(t, K) - 1]
    # Zero rows have cosine 0 with everything: nothing to miss.
    unsure = ~(tth > weakest + err) & (w_nrm > 0)
    keep = absc > 0
    absc = torch.where(keep, absc, 0.0)
    signed = torch.where(keep, signed, 0.0)
    idx = torch.where(keep, idx, -1)
    top_v = torch.zeros(n, topk, **f64)
    top_i = torch.full((n, topk), -1, dtype=torch.int64, device=W.device)
    kk = min(topk, K)
    top_v[:, :kk], top_i[:, :kk] = signed[:, :kk], idx[:, :kk]
    max_abs, argmax = absc[:, 0].clone(), idx[:, 0].clone()
    redo = unsure.nonzero().flatten()
    if redo.numel():
        v, i = _exact_rows(W, C, w_nrm, c_nrm, redo, t, self_)
        max_abs[redo] = v[:, 0].abs()
        argmax[redo] = i[:, 0]
        if topk:
            top_v[redo], top_i[redo] = v[:, :topk], i[:, :topk]
    return max_abs, argmax, top_v, top_i


def interference_triton(
    W: torch.Tensor,
    V: torch.Tensor | None,
    topk: int,
    block: int,
    precision: str = "ieee",
    symmetric: bool | None = None,
) -> list[torch.Tensor]:
    """W: (n, m); V: (k, m) or None; topk >= 0; block: tile edge hint (0: 128 for 16-bit
    symmetric tiles on a GPU, else 64).

    precision "tf32" multiplies float32 inputs on TF32 tensor cores and rescores the
    partners exactly (see the module docstring); other dtypes ignore it.
    symmetric (None = wherever it applies): W against itself with topk 0 and 16/32-bit
    inputs computes each off-diagonal tile once and merges both ends with atomics
    (float64 sums, packed max/argmax keys). Top-k lists cannot be merged that way, float64
    cosines do not fit a packed key, and TF32 needs its candidates, so those take the
    row-sweeping kernel. The atomics make the sums' last bits depend on program order.
    """
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
    tf32 = precision == "tf32" and W.dtype == torch.float32
    sixteen = W.dtype in (torch.float16, torch.bfloat16)
    wide_tiles = (
        block <= 0
        and sixteen
        and V is None
        and topk == 0
        and symmetric is not False
        and not interpreting()
        and triton.cdiv(n, 128) <= 65535
        # Three pipeline stages of two 128 x 64 16-bit panels (96 KiB) plus the epilogue's
        # scratch: cards with the H100/H200's (or A100's) shared memory per block only.
        and getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) >= 160 * 1024
    )
    if block > 0:
        edge = max(16, min(128, triton.next_power_of_2(int(block))))
    elif wide_tiles:
        # 16-bit symmetric tiles on a GPU: 128 x 128 with 8 warps. At sm_90 both sizes issue
        # ~100 instructions per 64-wide K step around 4 wgmma (python -m bench.sass style
        # counts), but a 64 x 64 tile reads two 64-row panels of W per 4,096 outputs: ~550 GB
        # from L2 over the upper triangle at n = 65,536, m = 4,096, which fits the H200's
        # 78.9 ms (1.57x torch.mm) as L2-bound; 128 x 128 halves the traffic. Unmeasured.
        edge = 128
    else:
        edge = 64
    BLOCK_K = max(16, min(64, triton.next_power_of_2(max(m, 1))))
    can_sym = V is None and topk == 0 and not tf32 and W.dtype != torch.float64 and triton.cdiv(n, edge) <= 65535
    if symmetric is None:
        symmetric = can_sym
    elif symmetric and not can_sym:
        raise ValueError("symmetric needs V=None, topk=0, a 16/32-bit W, no TF32, and n <= 65535 tiles")
    if symmetric:
        key = torch.zeros(n, **i64)
        if n > 0:
            blocks = triton.cdiv(n, edge)
            _interference_sym_kernel[(blocks, blocks)](
                sq, sqcos, key, Wn, w_inv.to(torch.float32), nrm * nrm, n, m,
                Wn.stride(0), Wn.stride(1), BLOCK=edge, BLOCK_K=BLOCK_K, num_warps=8 if edge == 128 else 4,
            )  # fmt: skip
        maxabs, argmax = _unpack_keys(key)
        nsq = nrm * nrm
        dims = torch.where(nsq > 0, nsq / (nsq + sq), 0.0)
        return [nrm, sq, sqcos, dims, maxabs, argmax, torch.zeros(n, 0, **f64), torch.full((n, 0), -1, **i64)]
    k_kernel = max(topk, 1) + _TF32_SPARE if tf32 else topk
    tk_cos = torch.zeros(n, k_kernel, **f64)
    tk_idx = torch.full((n, k_kernel), -1, **i64)
    if n > 0 and nc > 0:
        acc = compute_dtype(W.dtype)
        acc_torch = torch.float64 if acc == tl.float64 else torch.float32
        bnsq = col_nrm * col_nrm
        # Square tiles (edge above); tl.dot needs every edge >= 16. 64 balances the register
        # cost of the top-k epilogue ([BLOCK_M, BLOCK_N] candidates) against column reuse.
        _interference_kernel[(triton.cdiv(n, edge),)](
            sq, sqcos, maxabs, argmax, tk_cos, tk_idx,
            Wn, Cn, w_inv.to(acc_torch), c_inv.to(acc_torch), bnsq, n, nc, m,
            Wn.stride(0), Wn.stride(1), Cn.stride(0), Cn.stride(1),
            SELF=V is None, DOT_PRECISION="tf32" if tf32 else "ieee",
            TOPK=k_kernel, TOPK_P=max(2, triton.next_power_of_2(max(k_kernel, 1))),
            ACC=acc, BLOCK_M=edge, BLOCK_N=edge, BLOCK_K=BLOCK_K,
        )  # fmt: skip
    if tf32 and n > 0 and nc > 0:
        C = W if V is None else V
        maxabs, argmax, tk_cos, tk_idx = rescore_partners(
            W, C, nrm, col_nrm, tk_cos, tk_idx, topk, tf32_cos_error(m), self_=V is None
        )
    elif tf32:  # nothing to rescore: drop the spare candidate slots
        tk_cos, tk_idx = tk_cos[:, :topk].contiguous(), tk_idx[:, :topk].contiguous()
    if V is None:
        nsq = nrm * nrm
        dims = torch.where(nsq > 0, nsq / (nsq + sq), 0.0)
    else:
        dims = torch.empty(0, **f64)
    return [nrm, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx]
