"""Triton backend of ``supanalysis::cross_moments_update`` and ``supanalysis::best_match``.

Contract: ``supanalysis/ops/correlation.py``.

cross_moments_update: the batch's column means and M2 (one read, float64 deviations
from a sample value); then a tl.dot kernel over (n_a, n_b) tiles multiplies the *centred* batch and adds,
in its epilogue, the tile plus Chan's rank-one correction coef * da_i * db_j into the float64
co-moment in place. Centred products in float32 accumulate over at most MERGE_T tokens
before they are moved into a float64 accumulator. Default precision: the centred values
(x - batch mean) are formed in registers, never stored. precision="bf16": a centring kernel
writes them once per batch as bfloat16 (in token chunks within CENTRED_BYTES), and the GEMM
reads them straight from memory into the tensor cores: centring inside the GEMM loop cost
2.2x the tensor-core time per 64-token step at sm_90 (612 instructions per thread against 4
wgmma), which is why it ran at 26% of `torch.mm` on the H200.

best_match: one read of the co-moment. A (row group, column group) grid: each program
sweeps its row tiles and, inside, its column tiles, keeping row maxima in registers and
column maxima in a per-row-group scratch row it alone owns; the group partials are reduced
in torch with ties going to the smallest index.

Precision: float16/bfloat16/float32 batches are widened to float32 and multiplied with the
full-precision dot (``input_precision="ieee"``: TF32 would cost 13 bits on centred data);
float64 batches are computed in float64. Opt-in ``precision="bf16"``: the centred values are
rounded to bfloat16 and multiplied on the tensor cores (exact products, float32 sums); the
interpreter, which has no bfloat16 arithmetic, rounds the float32 bits the same way and
runs the full-precision dot on the rounded values (the same products). best_match runs in
float64 (the co-moment is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import chan_merge_splits, compute_dtype, interpreting, num_sms
from .activation_stats import dense_config

# Larger than any index: the neutral element of the index argmin (a constexpr, so
# kernels may read it as a global).
_NO_INDEX = tl.constexpr(2**62)
# Bytes the "bf16" update may spend on its centred bfloat16 copies of a batch (tokens go in
# chunks beyond it; each chunk re-reads and re-writes the float64 co-moment once).
CENTRED_BYTES = 2 << 30


@triton.jit
def _column_moments_kernel(
    shift_ptr,  # [S, n] float64: each split's first row (finite batches)
    sum_ptr,  # [S, n] float64 Σ (x - shift)
    sq_ptr,  # [S, n] float64 Σ (x - shift)^2
    x_ptr,  # [T, n], finite
    T,
    n,
    tokens_per_split,
    stride_t,
    stride_n,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One read of x, float64 arithmetic, the stats kernel's layout (reductions over tokens
    stay inside a thread): sums of deviations from a sample value of each column."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    shift = tl.load(x_ptr + t_start * stride_t + offs_n * stride_n, mask=mask_n, other=0.0).to(tl.float64)
    acc_s = tl.zeros([BLOCK_N], dtype=tl.float64)
    acc_q = tl.zeros([BLOCK_N], dtype=tl.float64)
    for t0 in range(t_start, t_end, ROWS):
        offs_t = t0 + tl.arange(0, ROWS).to(tl.int64)
        m = (offs_t < t_end)[:, None] & mask_n[None, :]
        v = tl.load(x_ptr + offs_t[:, None] * stride_t + offs_n[None, :] * stride_n, mask=m, other=0.0)
        d = tl.where(m, v.to(tl.float64) - shift[None, :], 0.0)
        acc_s += tl.sum(d, axis=0)
        acc_q += tl.sum(d * d, axis=0)
    out = pid_s * n + offs_n
    tl.store(shift_ptr + out, shift, mask=mask_n)
    tl.store(sum_ptr + out, acc_s, mask=mask_n)
    tl.store(sq_ptr + out, acc_q, mask=mask_n)


def _column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and centred M2 of a finite batch (T >= 1), float64, in one read.

    Every split sums float64 deviations from its first row, so the mean (shift + S/c) is
    exact to float64 rounding and M2 (Q - S^2/c) loses only the digits the shift's distance
    from the mean costs, of sixteen. A float64-exact mean is what makes the "bf16" rounding
    of the centred values the same on every backend: a mean ~1e-9 of a standard deviation
    off (float32 chunk sums) flips about one rounding in 10^6 values, and one flipped
    product moves its co-moment by up to 2^-8 of that term.
    """
    T, n = x.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=x.device)
        return empty, empty.clone()
    cfg = dense_config(n, x.element_size())
    n_blocks = triton.cdiv(n, cfg.block_n)
    splits = max(1, min(triton.cdiv(T, cfg.chunk), triton.cdiv(8 * num_sms(x.device), n_blocks)))
    tokens_per_split = triton.cdiv(triton.cdiv(T, cfg.chunk), splits) * cfg.chunk
    splits = triton.cdiv(T, tokens_per_split)
    shift, s, q = (torch.empty(splits, n, dtype=torch.float64, device=x.device) for _ in range(3))
    _column_moments_kernel[(n_blocks, splits)](
        shift, s, q, x, T, n, tokens_per_split, x.stride(0), x.stride(1),
        ROWS=cfg.rows, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )  # fmt: skip
    counts = torch.clamp(T - torch.arange(splits, device=x.device) * tokens_per_split, max=tokens_per_split)
    c = counts.to(torch.float64)[:, None]
    m2 = torch.clamp_min(q - s * s / c, 0.0)
    _, mean, m2 = chan_merge_splits(counts[:, None].expand(splits, n), shift + s / c, m2)
    return mean, m2


@triton.jit
def _round_to_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), kept in float32; finite x."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _center_kernel(
    out_ptr,  # [T, n] contiguous: bfloat16, or float32 holding bfloat16 values (ROUND_BF16)
    x_ptr,  # [T, n]
    m_ptr,  # [n] float32 mean (the float64 mean's leading part) ...
    m_lo_ptr,  # [n] ... and its float32 remainder
    T,
    n,
    stride_t,
    stride_n,
    ROUND_BF16: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """x - mean, rounded once to float32 and then once to bfloat16 (nearest, ties to even),
    as every backend's "bf16" precision rounds it."""
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    fs = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (ts < T)[:, None] & (fs < n)[None, :]
    x = tl.load(x_ptr + ts[:, None] * stride_t + fs[None, :] * stride_n, mask=mask, other=0.0)
    m = tl.load(m_ptr + fs, mask=fs < n, other=0.0)
    m_lo = tl.load(m_lo_ptr + fs, mask=fs < n, other=0.0)
    c = (x.to(tl.float32) - m[None, :]) - m_lo[None, :]
    if ROUND_BF16:
        c = _round_to_bf16(c)
    tl.store(out_ptr + ts[:, None] * n + fs[None, :], c.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_moments_update_kernel(
    c_ptr,  # [na, nb] float64 co-moment, updated in place
    xa_ptr,  # [T, na]
    xb_ptr,  # [T, nb]
    ma_ptr,  # [na] batch mean of xa, compute dtype (the centring shift) ...
    mb_ptr,  # [nb]
    ma_lo_ptr,  # [na] ... and what the compute dtype dropped of it (float64 mean = ma + ma_lo)
    mb_lo_ptr,  # [nb]
    da_ptr,  # [na] float64 coef * (batch mean a - previous mean a)
    db_ptr,  # [nb] float64 batch mean b - previous mean b
    T,
    na,
    nb,
    stride_at,
    stride_an,
    stride_bt,
    stride_bn,
    stride_cm,
    stride_cn,
    ACC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MERGE_T: tl.constexpr,
    CENTRED: tl.constexpr,  # xa, xb are already centred (the "bf16" path: _center_kernel)
    CORRECT: tl.constexpr,  # add Chan's rank-one correction (once per update)
):
    pid_a = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    ra = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = ra < na
    mask_b = rb < nb
    if not CENTRED:
        ma = tl.load(ma_ptr + ra, mask=mask_a, other=0.0)
        mb = tl.load(mb_ptr + rb, mask=mask_b, other=0.0)
        ma_lo = tl.load(ma_lo_ptr + ra, mask=mask_a, other=0.0)
        mb_lo = tl.load(mb_lo_ptr + rb, mask=mask_b, other=0.0)
    acc64 = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float64)
    for t1 in range(0, T, MERGE_T):
        acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC)
        t_end = tl.minimum(t1 + MERGE_T, T)
        for t0 in range(t1, t_end, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            mt = ts < t_end
            ka = mt[:, None] & mask_a[None, :]
            kb = mt[:, None] & mask_b[None, :]
            a = tl.load(xa_ptr + ts[:, None] * stride_at + ra[None, :] * stride_an, mask=ka, other=0.0)
            b = tl.load(xb_ptr + ts[:, None] * stride_bt + rb[None, :] * stride_bn, mask=kb, other=0.0)
            if not CENTRED:
                # Centre in registers about the float64 mean carried as two float32 parts:
                # x - hi is exact for x within a factor 2 of the mean, so the centred value
                # is rounded once, as the other backends round it. Padded rows/columns must
                # contribute exactly 0.
                a = tl.where(ka, (a.to(ACC) - ma[None, :]) - ma_lo[None, :], 0.0)
                b = tl.where(kb, (b.to(ACC) - mb[None, :]) - mb_lo[None, :], 0.0)
            # Centred bfloat16 operands go to the tensor cores straight from memory (so
            # Triton can pipeline their loads); float32 ones take the full-precision dot.
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee", out_dtype=ACC)
        acc64 += acc.to(tl.float64)
    mask = mask_a[:, None] & mask_b[None, :]
    ptrs = c_ptr + ra[:, None] * stride_cm + rb[None, :] * stride_cn
    c = tl.load(ptrs, mask=mask, other=0.0) + acc64
    if CORRECT:
        da = tl.load(da_ptr + ra, mask=mask_a, other=0.0)
        db = tl.load(db_ptr + rb, mask=mask_b, other=0.0)
        c += da[:, None] * db[None, :]
    tl.store(ptrs, c, mask=mask)


def cross_moments_update_triton(
    comoment: torch.Tensor,
    n_prev: int,
    mean_a_prev: torch.Tensor,
    mean_b_prev: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    precision: str = "ieee",
    *,
    centred_bytes: int = CENTRED_BYTES,
) -> list[torch.Tensor]:
    """comoment: (n_a, n_b) float64, updated in place; xa: (T, n_a); xb: (T, n_b), finite.

    Returns the batch's [mean_a, m2_a, mean_b, m2_b] (float64).
    precision "bf16" (16/32-bit inputs): the centred values are rounded to bfloat16 (relative
    error <= 2^-9 each), written once per batch by a centring kernel, and multiplied on the
    tensor cores straight from memory, float32 accumulation; the centred copies take at
    most ``centred_bytes`` (tokens go in chunks beyond it, of at least 64 tokens). Default "ieee": the centred
    values stay float32, formed in registers, and the dot is full precision.
    """
    if precision not in ("ieee", "bf16"):
        raise ValueError(f"precision must be one of ('ieee', 'bf16'), got {precision!r}")
    if precision == "bf16" and torch.float64 in (xa.dtype, xb.dtype):
        raise ValueError("precision='bf16' takes 16/32-bit batches; float64 ones are multiplied in float64")
    T, na = xa.shape
    nb = xb.shape[1]
    device = xa.device
    z = lambda k: torch.zeros(k, dtype=torch.float64, device=device)
    if T == 0:
        return [z(na), z(na), z(nb), z(nb)]
    if xa.dtype != xb.dtype:
        common = torch.promote_types(xa.dtype, xb.dtype)
        xa, xb = xa.to(common), xb.to(common)
    ma, m2a = _column_moments(xa)
    mb, m2b = _column_moments(xb)
    if na == 0 or nb == 0:
        return [ma, m2a, mb, m2b]
    acc = compute_dtype(xa.dtype)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    coef = float(n_prev) * T / (float(n_prev) + T)
    da = (coef * (ma - mean_a_prev.to(torch.float64))).contiguous()
    db = (mb - mean_b_prev.to(torch.float64)).contiguous()
    ma_hi, mb_hi = ma.to(acc_torch), mb.to(acc_torch)
    ma_lo, mb_lo = (ma - ma_hi.double()).to(acc_torch), (mb - mb_hi.double()).to(acc_torch)
    strides_c = (comoment.stride(0), comoment.stride(1))

    if precision == "ieee":
        BLOCK_A = 64 if na >= 64 else max(16, triton.next_power_of_2(na))
        BLOCK_B = 64 if nb >= 64 else max(16, triton.next_power_of_2(nb))
        _cross_moments_update_kernel[(triton.cdiv(na, BLOCK_A), triton.cdiv(nb, BLOCK_B))](
            comoment, xa, xb, ma_hi, mb_hi, ma_lo, mb_lo, da, db, T, na, nb,
            xa.stride(0), xa.stride(1), xb.stride(0), xb.stride(1), *strides_c,
            ACC=acc, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, BLOCK_T=64 if interpreting() else 32, MERGE_T=4096,
            CENTRED=False, CORRECT=True,
        )  # fmt: skip
        return [ma, m2a, mb, m2b]

    # "bf16": centre each chunk of tokens into bfloat16 copies (the interpreter, which has no
    # bfloat16 arithmetic, keeps the same bfloat16 values in float32 and multiplies them with
    # the full-precision dot: the same exact products), then a plain tiled GEMM over them.
    gpu = not interpreting()
    cdtype = torch.bfloat16 if gpu else torch.float32
    itemsize = 2 if gpu else 4
    BLOCK_T = 64
    chunk = max(BLOCK_T, centred_bytes // ((na + nb) * itemsize) // BLOCK_T * BLOCK_T)
    chunk = min(chunk, triton.cdiv(T, BLOCK_T) * BLOCK_T)
    ca = torch.empty(min(chunk, T), na, dtype=cdtype, device=device)
    cb = torch.empty(min(chunk, T), nb, dtype=cdtype, device=device)
    edge = 128 if gpu else 64
    BLOCK_A = edge if na >= edge else max(16, triton.next_power_of_2(na))
    BLOCK_B = edge if nb >= edge else max(16, triton.next_power_of_2(nb))
    launch = {}
    if gpu:
        # Shared memory per pipeline stage: two 64 x 128 bfloat16 tiles, 32 KiB. Four stages
        # where the card offers the H100/H200's ~227 KiB per block, two on smaller ones.
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
        launch = {"num_warps": 8, "num_stages": 4 if smem >= 160 * 1024 else 2}
    CB_T, CB_N = 32, 128
    for t0 in range(0, T, chunk):
        rows = min(chunk, T - t0)
        pa, pb = ca[:rows], cb[:rows]
        for out, x, hi, lo, nx in (
            (pa, xa[t0 : t0 + rows], ma_hi, ma_lo, na),
            (pb, xb[t0 : t0 + rows], mb_hi, mb_lo, nb),
        ):
            _center_kernel[(triton.cdiv(rows, CB_T), triton.cdiv(nx, CB_N))](
                out, x, hi, lo, rows, nx, x.stride(0), x.stride(1),
                ROUND_BF16=not gpu, BLOCK_T=CB_T, BLOCK_N=CB_N,
            )  # fmt: skip
        _cross_moments_update_kernel[(triton.cdiv(na, BLOCK_A), triton.cdiv(nb, BLOCK_B))](
            comoment, pa, pb, ma_hi, mb_hi, ma_lo, mb_lo, da, db, rows, na, nb,
            pa.stride(0), pa.stride(1), pb.stride(0), pb.stride(1), *strides_c,
            ACC=tl.float32, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, BLOCK_T=BLOCK_T, MERGE_T=4096,
            CENTRED=True, CORRECT=t0 == 0, **launch,
        )  # fmt: skip
    return [ma, m2a, mb, m2b]


# ----------------------------------------------------------------------------- best match
@triton.jit
def _best_match_kernel(
    rowmax_ptr,  # [H, na] float64 row maxima per column group
    rowarg_ptr,  # [H, na] int64
    colmax_ptr,  # [G, nb] float64 column maxima per row group (pre-filled -inf)
    colarg_ptr,  # [G, nb] int64 (pre-filled -1)
    c_ptr,  # [na, nb] float64 co-moment
    ia_ptr,  # [na] float64 inverse standard deviations (0 = constant feature)
    ib_ptr,  # [nb] float64
    na,
    nb,
    stride_cm,
    stride_cn,
    rows_per_group,
    cols_per_group,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    r_start = g * rows_per_group
    r_end = tl.minimum(r_start + rows_per_group, na)
    c_start = h * cols_per_group
    c_end = tl.minimum(c_start + cols_per_group, nb)
    for r0 in range(r_start, r_end, BLOCK_A):
        rows = r0 + tl.arange(0, BLOCK_A).to(tl.int64)
        mask_r = rows < r_end
        ia = tl.load(ia_ptr + rows, mask=mask_r, other=0.0)
        rmax = tl.full([BLOCK_A], float("-inf"), dtype=tl.float64)
        rarg = tl.full([BLOCK_A], -1, dtype=tl.int64)
        for c0 in range(c_start, c_end, BLOCK_B):
            cols = c0 + tl.arange(0, BLOCK_B).to(tl.int64)
            mask_c = cols < c_end
            ib = tl.load(ib_ptr + cols, mask=mask_c, other=0.0)
            mask = mask_r[:, None] & mask_c[None, :]
            c = tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=mask, other=0.0)
            corr = c * ia[:, None] * ib[None, :]
            corr = tl.minimum(tl.maximum(corr, -1.0), 1.0)
            # Constant features (inv_std 0) are nobody's match: -inf never wins a strict >.
            valid = mask & (ia != 0.0)[:, None] & (ib != 0.0)[None, :]
            corr = tl.where(valid, corr, float("-inf"))

            tmax = tl.max(corr, axis=1)
            targ = tl.min(tl.where(corr == tmax[:, None], cols[None, :], _NO_INDEX), axis=1)
            better = tmax > rmax  # strict: earlier (smaller) columns keep ties
            rmax = tl.where(better, tmax, rmax)
            rarg = tl.where(better, targ, rarg)

            cmax = tl.max(corr, axis=0)
            carg = tl.min(tl.where(corr == cmax[None, :], rows[:, None], _NO_INDEX), axis=0)
            pptr = g * nb + cols
            pmax = tl.load(colmax_ptr + pptr, mask=mask_c, other=float("-inf"))
            parg = tl.load(colarg_ptr + pptr, mask=mask_c, other=-1)
            cb = cmax > pmax  # strict: earlier (smaller) rows keep ties
            tl.store(colmax_ptr + pptr, tl.where(cb, cmax, pmax), mask=mask_c)
            tl.store(colarg_ptr + pptr, tl.where(cb, carg, parg), mask=mask_c)
            # The scratch row is re-read by other threads of this program on the next row
            # tile: a CTA barrier orders those global writes before the reads.
            tl.debug_barrier()
        tl.store(rowmax_ptr + h * na + rows, rmax, mask=mask_r)
        tl.store(rowarg_ptr + h * na + rows, rarg, mask=mask_r)


def _reduce_groups(vmax: torch.Tensor, varg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over group partials (dim 0), ties to the smallest index; -inf -> (0, -1)."""
    mx = vmax.amax(0)
    arg = torch.where(vmax == mx[None, :], varg, _NO_INDEX.value).amin(0)
    ok = torch.isfinite(mx)
    return torch.where(ok, mx, 0.0), torch.where(ok, arg, -1)


def best_match_triton(comoment: torch.Tensor, inv_std_a: torch.Tensor, inv_std_b: torch.Tensor) -> list[torch.Tensor]:
    """comoment: (n_a, n_b); inv_std_a: (n_a,); inv_std_b: (n_b,).

    Returns [max_corr_a, match_a, max_corr_b, match_b].
    """
    na, nb = comoment.shape
    device = comoment.device
    f64 = dict(dtype=torch.float64, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    if na == 0 or nb == 0:
        return [torch.zeros(na, **f64), torch.full((na,), -1, **i64),
                torch.zeros(nb, **f64), torch.full((nb,), -1, **i64)]  # fmt: skip
    C = comoment.to(torch.float64)
    ia = inv_std_a.to(torch.float64).contiguous()
    ib = inv_std_b.to(torch.float64).contiguous()
    BLOCK_A = 32 if na >= 32 else max(16, triton.next_power_of_2(na))
    BLOCK_B = 64 if nb >= 64 else max(16, triton.next_power_of_2(nb))
    tiles_a, tiles_b = triton.cdiv(na, BLOCK_A), triton.cdiv(nb, BLOCK_B)
    # Groups: enough programs for the machine, few enough that the partials stay
    # O(groups * (n_a + n_b)). Under the interpreter 2 x 2 keeps the merge exercised.
    side = 2 if interpreting() or device.type != "cuda" else max(2, int((4 * num_sms(device)) ** 0.5))
    G, H = min(tiles_a, side), min(tiles_b, side)
    rows_per_group = triton.cdiv(tiles_a, G) * BLOCK_A
    cols_per_group = triton.cdiv(tiles_b, H) * BLOCK_B
    G, H = triton.cdiv(na, rows_per_group), triton.cdiv(nb, cols_per_group)
    rowmax = torch.empty(H, na, **f64)
    rowarg = torch.empty(H, na, **i64)
    colmax = torch.full((G, nb), float("-inf"), **f64)
    colarg = torch.full((G, nb), -1, **i64)
    _best_match_kernel[(G, H)](
        rowmax, rowarg, colmax, colarg, C, ia, ib, na, nb, C.stride(0), C.stride(1),
        rows_per_group, cols_per_group, BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B,
    )  # fmt: skip
    max_a, match_a = _reduce_groups(rowmax, rowarg)
    max_b, match_b = _reduce_groups(colmax, colarg)
    return [max_a, match_a, max_b, match_b]


# ----------------------------------------------------------------------------- sparse codes
@triton.jit
def _sparse_outer_kernel(
    out_ptr,  # [n_a, n_b] float64, updated in place (atomically)
    ia_ptr,  # [T, k_a] int64, -1 = padding
    va_ptr,  # [T, k_a]
    ib_ptr,  # [T, k_b] int64
    vb_ptr,  # [T, k_b]
    T,
    ka,
    kb,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_KA: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    pa = tl.arange(0, BLOCK_KA)
    pb = tl.arange(0, BLOCK_KB)
    ma = (ts < T)[:, None] & (pa < ka)[None, :]
    mb = (ts < T)[:, None] & (pb < kb)[None, :]
    ia = tl.load(ia_ptr + ts[:, None] * ka + pa[None, :], mask=ma, other=-1)
    ib = tl.load(ib_ptr + ts[:, None] * kb + pb[None, :], mask=mb, other=-1)
    # Products of the inputs' values are exact in float64.
    va = tl.load(va_ptr + ts[:, None] * ka + pa[None, :], mask=ma, other=0.0).to(tl.float64)
    vb = tl.load(vb_ptr + ts[:, None] * kb + pb[None, :], mask=mb, other=0.0).to(tl.float64)
    ok = (ia >= 0)[:, :, None] & (ib >= 0)[:, None, :]
    prod = va[:, :, None] * vb[:, None, :]
    ptrs = out_ptr + ia[:, :, None] * stride_o + ib[:, None, :]
    tl.atomic_add(ptrs, prod, mask=ok, sem="relaxed")


def sparse_outer_update_triton(
    out: torch.Tensor, ia: torch.Tensor, va: torch.Tensor, ib: torch.Tensor, vb: torch.Tensor
) -> None:
    """out [n_a, n_b] float64 += Σ_t Σ_p Σ_q va[t,p]·vb[t,q] at (ia[t,p], ib[t,q]); -1 = padding.

    One float64 atomic add per pair (sm_60+); top-k pairs spread over n_a·n_b cells, so
    contention is low. The summation order is not fixed: results agree to float64 rounding.
    """
    T, ka = ia.shape
    kb = ib.shape[1]
    if T == 0 or ka == 0 or kb == 0:
        return
    ia, ib = ia.to(torch.int64).contiguous(), ib.to(torch.int64).contiguous()
    if va.dtype == torch.float64:
        va, vb = va.contiguous(), vb.contiguous()
    else:  # bf16/fp16 widen to float32 (the interpreter has no bf16 arithmetic)
        va, vb = va.float().contiguous(), vb.float().contiguous()
    BLOCK_KA = max(2, triton.next_power_of_2(ka))
    BLOCK_KB = max(2, triton.next_power_of_2(kb))
    BLOCK_T = max(1, min(4096 // (BLOCK_KA * BLOCK_KB), triton.next_power_of_2(T)))
    _sparse_outer_kernel[(triton.cdiv(T, BLOCK_T),)](
        out, ia, va, ib, vb, T, ka, kb, out.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_KA=BLOCK_KA, BLOCK_KB=BLOCK_KB,
    )  # fmt: skip
