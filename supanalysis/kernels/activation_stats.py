"""Triton backend of ``supanalysis::activation_stats`` (dense and top-k sparse).

Contract: ``supanalysis/ops/activation_stats.py`` (the float64 reference and its docstring).
Outputs, in order: finite_count [n] int64, fire_count [n] int64, mean, m2, max, min,
active_sum [n] float64, l0 [T] int64.

Precision: float16/bfloat16/float32 inputs are widened to float32 in registers; float64
inputs are computed in float64. Each CHUNK-token stretch of a feature is reduced in that
type as deviations from a shift (the running mean) and merged into float64 running state
with Chan's formula, so long token ranges never accumulate raw sums in float32.

Dense kernel shape (``dense_config``; ``python -m bench.sass`` prints its sm_90 code): a
program owns BLOCK_N features (one 16-byte load per thread per token) over a range of
tokens, so every reduction over tokens stays inside a thread; the per-token L0 is the one
reduction across threads, written per feature block without atomics and summed after.
Full chunks skip per-entry finiteness tests; a chunk whose sums come out non-finite is
redone by the careful path, which tests every entry.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import chan_merge_splits, compute_dtype, num_sms, threshold_for


@triton.jit
def _chan_merge(run_cnt, run_mean, run_m2, c, inv_c, shift, s, q, ACC: tl.constexpr):
    """Merge a chunk, given as count c (inv_c = 1/max(c, 1) in float64), shift,
    s = Σ(v - shift) and q = Σ(v - shift)^2, into the float64 (count, mean, M2) state.
    The chunk's own M2 is q - s^2/c: exact when the shift is the chunk mean, and within a
    few ulp of it while the shift is within a few standard deviations of that mean. The
    callers guarantee that: the shift is the running mean of earlier chunks, a finite value
    of the feature, or the chunk's own mean (the careful path); a feature with none of
    these yet has a NaN shift and never passes the fast path. Clamped at 0 against rounding."""
    sd = s.to(tl.float64)
    tmean = shift.to(tl.float64) + sd * inv_c
    tm2 = tl.maximum(q.to(tl.float64) - sd * sd * inv_c, 0.0)
    nab = run_cnt + c
    # The merge weight in the compute type: a float32 rounding of w perturbs only the
    # correction terms (relative 6e-8 of them); float64 inputs keep float64 weights.
    w = (c.to(ACC) / tl.maximum(nab, 1).to(ACC)).to(tl.float64)
    delta = tmean - run_mean
    run_mean += delta * w
    run_m2 += tm2 + delta * delta * run_cnt.to(tl.float64) * w
    return nab, run_mean, run_m2


@triton.jit
def _load_rows(x_ptr, offs_t, t_stop, offs_n, mask_n, stride_t, stride_n, EVEN_N: tl.constexpr):
    """The [rows, features] tile at tokens offs_t in x's own dtype; rows at or past t_stop
    (and features past n unless EVEN_N) read as 0 without touching memory."""
    m = (offs_t < t_stop)[:, None]
    if not EVEN_N:
        m = m & mask_n[None, :]
    return tl.load(x_ptr + offs_t[:, None] * stride_t + offs_n[None, :] * stride_n, mask=m, other=0.0)


@triton.jit
def _careful_chunk(
    x_ptr, l0_ptr, offs_n, mask_n, c0, c1, stride_t, stride_n, thr,
    ACC: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Rows [c0, c1) (c1 - c0 <= CHUNK) with every entry tested: non-finite values leave the
    moments and never fire. Two reads of the chunk (it is in cache for the second): the first
    finds each feature's finite count and mean, the second sums deviations from that mean."""
    rows = tl.arange(0, ROWS).to(tl.int64)
    cnt = tl.zeros(offs_n.shape, dtype=tl.int32)
    tot = tl.zeros(offs_n.shape, dtype=ACC)
    for r0 in range(c0, c0 + CHUNK, ROWS):
        offs_t = r0 + rows
        m = (offs_t < c1)[:, None] & mask_n[None, :]
        v = _load_rows(x_ptr, offs_t, c1, offs_n, mask_n, stride_t, stride_n, False).to(ACC)
        fin = m & (tl.abs(v) < float("inf"))
        cnt += tl.sum(fin.to(tl.int32), axis=0)
        tot += tl.sum(tl.where(fin, v, 0.0), axis=0)
    shift = tot / tl.maximum(cnt, 1).to(ACC)
    s = tl.zeros(offs_n.shape, dtype=ACC)
    q = tl.zeros(offs_n.shape, dtype=ACC)
    a = tl.zeros(offs_n.shape, dtype=ACC)
    f = tl.zeros(offs_n.shape, dtype=tl.int32)
    mx = tl.full(offs_n.shape, float("-inf"), dtype=ACC)
    mn = tl.full(offs_n.shape, float("inf"), dtype=ACC)
    for r0 in range(c0, c0 + CHUNK, ROWS):
        offs_t = r0 + rows
        mt = offs_t < c1
        m = mt[:, None] & mask_n[None, :]
        v = _load_rows(x_ptr, offs_t, c1, offs_n, mask_n, stride_t, stride_n, False).to(ACC)
        fin = m & (tl.abs(v) < float("inf"))
        d = tl.where(fin, v - shift[None, :], 0.0)
        s += tl.sum(d, axis=0)
        q += tl.sum(d * d, axis=0)
        mx = tl.maximum(mx, tl.max(tl.where(fin, v, float("-inf")), axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(fin, v, float("inf")), axis=0))
        fire = fin & (v > thr)
        f += tl.sum(fire.to(tl.int32), axis=0)
        a += tl.sum(tl.where(fire, v, 0.0), axis=0)
        tl.store(l0_ptr + offs_t, tl.sum(fire.to(tl.int32), axis=1), mask=mt)
    return cnt, shift, s, q, mx, mn, f, a


@triton.jit
def _activation_stats_kernel(
    cnt_ptr,  # [S, n] int64 finite entries per (split, feature)
    fire_ptr,  # [S, n] int64
    mean_ptr,  # [S, n] float64
    m2_ptr,  # [S, n] float64
    max_ptr,  # [S, n] float64
    min_ptr,  # [S, n] float64
    act_ptr,  # [S, n] float64
    l0_ptr,  # [B, T] int32: firing entries per (feature block, token), summed afterwards
    x_ptr,  # [T, n]
    thr_ptr,  # [1] threshold in the compute dtype (a tensor: Python floats arrive as fp32)
    T,
    n,
    tokens_per_split,
    stride_t,
    stride_n,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    # Layout: for n >= BLOCK_N, BLOCK_N is num_warps x 32 threads x one 16-byte load wide, so
    # each thread owns a few features for the whole program and every reduction over tokens
    # stays inside the thread. The per-token L0 is the reduction that crosses threads (one
    # REDUX per warp and row, then a shared-memory step with a barrier), and so is the
    # per-chunk finiteness test.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    thr = tl.load(thr_ptr)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    l0_row = l0_ptr + pid_n * T
    rows = tl.arange(0, ROWS).to(tl.int64)

    run_cnt = tl.zeros([BLOCK_N], dtype=tl.int32)
    run_fire = tl.zeros([BLOCK_N], dtype=tl.int32)
    run_mean = tl.zeros([BLOCK_N], dtype=tl.float64)
    run_m2 = tl.zeros([BLOCK_N], dtype=tl.float64)
    run_act = tl.zeros([BLOCK_N], dtype=tl.float64)
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    run_min = tl.full([BLOCK_N], float("inf"), dtype=ACC)
    # Deviations are taken from a shift: the first token's value, then the running mean. A
    # feature whose first value is not finite gets a NaN shift, so its fast sums are NaN and
    # its chunks take the careful path until one has counted a finite value of it (a
    # made-up shift of 0 far from the mean would cancel catastrophically in q - s^2/c). The
    # path is chosen per program, so a feature that is never finite keeps its whole block
    # of features on the careful path (correct, about twice the work for that block).
    first = tl.load(x_ptr + t_start * stride_t + offs_n * stride_n, mask=mask_n, other=0.0).to(ACC)
    shift = tl.where(tl.abs(first) < float("inf"), first, float("nan"))

    # Full chunks take the fast path; the last partial chunk (if any) the careful one.
    t_fast = t_start + (t_end - t_start) // CHUNK * CHUNK
    # Register double buffering: the next ROWS tokens are loaded before the current ones
    # are reduced, so every program has a tile in flight while it computes. (Triton's own
    # cp.async pipelining of this loop costs ~40% more instructions per element at sm_90.)
    nxt = _load_rows(x_ptr, t_start + rows, t_fast, offs_n, mask_n, stride_t, stride_n, EVEN_N)
    for c0 in range(t_start, t_fast, CHUNK):
        # No per-entry finiteness tests here: a non-finite entry makes its feature's
        # deviation sum non-finite, which sends the whole chunk through the careful path
        # (the fast results are dropped, the L0 rows rewritten).
        s = tl.zeros([BLOCK_N], dtype=ACC)
        q = tl.zeros([BLOCK_N], dtype=ACC)
        a = tl.zeros([BLOCK_N], dtype=ACC)
        f = tl.zeros([BLOCK_N], dtype=tl.int32)
        mx = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
        mn = tl.full([BLOCK_N], float("inf"), dtype=ACC)
        for r0 in range(c0, c0 + CHUNK, ROWS):
            v = nxt.to(ACC)
            nxt = _load_rows(x_ptr, r0 + ROWS + rows, t_fast, offs_n, mask_n, stride_t, stride_n, EVEN_N)
            d = v - shift[None, :]
            s += tl.sum(d, axis=0)
            q += tl.sum(d * d, axis=0)
            mx = tl.maximum(mx, tl.max(v, axis=0))
            mn = tl.minimum(mn, tl.min(v, axis=0))
            fire = v > thr
            if not EVEN_N:
                fire = fire & mask_n[None, :]
            f += tl.sum(fire.to(tl.int32), axis=0)
            a += tl.sum(tl.where(fire, v, 0.0), axis=0)
            tl.store(l0_row + r0 + rows, tl.sum(fire.to(tl.int32), axis=1))
        ok = (tl.abs(s) < float("inf")) & (tl.abs(q) < float("inf"))
        c = tl.full([BLOCK_N], CHUNK, dtype=tl.int32)
        inv_c = tl.full([BLOCK_N], 1.0 / CHUNK, dtype=tl.float64)  # no float64 division here
        shift_c = shift
        if tl.sum((~ok).to(tl.int32), axis=0) > 0:
            c, shift_c, s, q, mx, mn, f, a = _careful_chunk(
                x_ptr, l0_row, offs_n, mask_n, c0, c0 + CHUNK, stride_t, stride_n, thr, ACC, ROWS, CHUNK
            )
            inv_c = 1.0 / tl.maximum(c.to(tl.float64), 1.0)
        run_cnt, run_mean, run_m2 = _chan_merge(run_cnt, run_mean, run_m2, c, inv_c, shift_c, s, q, ACC)
        run_max, run_min = tl.maximum(run_max, mx), tl.minimum(run_min, mn)
        run_fire, run_act = run_fire + f, run_act + a.to(tl.float64)
        shift = tl.where(run_cnt > 0, run_mean.to(ACC), shift)
    if t_fast < t_end:
        c, shift_c, s, q, mx, mn, f, a = _careful_chunk(
            x_ptr, l0_row, offs_n, mask_n, t_fast, t_end, stride_t, stride_n, thr, ACC, ROWS, CHUNK
        )
        inv_c = 1.0 / tl.maximum(c.to(tl.float64), 1.0)
        run_cnt, run_mean, run_m2 = _chan_merge(run_cnt, run_mean, run_m2, c, inv_c, shift_c, s, q, ACC)
        run_max, run_min = tl.maximum(run_max, mx), tl.minimum(run_min, mn)
        run_fire, run_act = run_fire + f, run_act + a.to(tl.float64)

    out = pid_s * n + offs_n
    tl.store(cnt_ptr + out, run_cnt.to(tl.int64), mask=mask_n)
    tl.store(fire_ptr + out, run_fire.to(tl.int64), mask=mask_n)
    tl.store(mean_ptr + out, run_mean, mask=mask_n)
    tl.store(m2_ptr + out, run_m2, mask=mask_n)
    tl.store(max_ptr + out, run_max.to(tl.float64), mask=mask_n)
    tl.store(min_ptr + out, run_min.to(tl.float64), mask=mask_n)
    tl.store(act_ptr + out, run_act, mask=mask_n)


class DenseConfig(NamedTuple):
    """Launch shape of the dense kernel: ``block_n`` features per program (one vector load
    per thread per token), ``rows`` tokens per load step held in each thread, ``chunk``
    tokens per float32 partial before the float64 merge."""

    block_n: int
    rows: int
    chunk: int
    num_warps: int


def dense_config(n: int, itemsize: int) -> DenseConfig:
    """16-byte loads per thread (8 x 16-bit, 4 x float32, 2 x float64), 4 warps across the
    features; fewer features per program when n is small. 32-token chunks: each float32
    partial rounds over at most 32 terms before the float64 merge, which keeps float32
    inputs' mean and M2 within a few ulp of float64 and costs ~12 fp64 operations per
    feature per 32 tokens."""
    num_warps = 4
    vec = max(1, 16 // itemsize)
    block_n = min(vec * 32 * num_warps, max(16, triton.next_power_of_2(n)))
    return DenseConfig(block_n=block_n, rows=8, chunk=32, num_warps=num_warps)


def _empty_outputs(T: int, n: int, device: torch.device) -> list[torch.Tensor]:
    i64 = dict(dtype=torch.int64, device=device)
    f64 = dict(dtype=torch.float64, device=device)
    return [
        torch.zeros(n, **i64),
        torch.zeros(n, **i64),
        torch.zeros(n, **f64),
        torch.zeros(n, **f64),
        torch.full((n,), float("-inf"), **f64),
        torch.full((n,), float("inf"), **f64),
        torch.zeros(n, **f64),
        torch.zeros(T, **i64),
    ]


def activation_stats_triton(x: torch.Tensor, threshold: float, *, splits: int | None = None) -> list[torch.Tensor]:
    """x: (T, n) float16/bfloat16/float32/float64, any strides. See the module docstring.

    ``splits`` (tests only) forces the number of token splits.
    """
    T, n = x.shape
    device = x.device
    if T == 0 or n == 0:
        return _empty_outputs(T, n, device)
    acc = compute_dtype(x.dtype)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    thr = torch.tensor([threshold_for(threshold, x.dtype)], dtype=acc_torch, device=device)

    cfg = dense_config(n, x.element_size())
    t_chunks = triton.cdiv(T, cfg.chunk)
    n_blocks = triton.cdiv(n, cfg.block_n)
    if splits is None:
        # About eight programs' worth of work per SM (two are resident at a time at 255
        # registers; the rest start as they finish), while each program still streams
        # hundreds of tokens per partial it writes.
        splits = triton.cdiv(8 * num_sms(device), n_blocks)
    splits = max(1, min(int(splits), t_chunks))
    tokens_per_split = triton.cdiv(t_chunks, splits) * cfg.chunk
    splits = triton.cdiv(T, tokens_per_split)

    i64 = dict(dtype=torch.int64, device=device)
    f64 = dict(dtype=torch.float64, device=device)
    cnt = torch.empty(splits, n, **i64)
    fire = torch.empty(splits, n, **i64)
    mean = torch.empty(splits, n, **f64)
    m2 = torch.empty(splits, n, **f64)
    vmax = torch.empty(splits, n, **f64)
    vmin = torch.empty(splits, n, **f64)
    act = torch.empty(splits, n, **f64)
    # Per-(feature block, token) firing counts, written once each (no atomics: every
    # feature block would otherwise add to the same tokens at the same time), summed after.
    # 4 bytes per block_n entries read: under 0.4% extra traffic.
    l0_part = torch.empty(n_blocks, T, dtype=torch.int32, device=device)
    _activation_stats_kernel[(n_blocks, splits)](
        cnt, fire, mean, m2, vmax, vmin, act, l0_part,
        x, thr, T, n, tokens_per_split, x.stride(0), x.stride(1),
        ACC=acc, ROWS=cfg.rows, CHUNK=cfg.chunk, BLOCK_N=cfg.block_n,
        EVEN_N=n % cfg.block_n == 0, num_warps=cfg.num_warps,
    )  # fmt: skip
    l0 = l0_part.sum(0, dtype=torch.int64)
    # Deterministic float64 merge of the splits (fixed order, centred terms only).
    count, mu, m2_tot = chan_merge_splits(cnt, mean, m2)
    return [
        count,
        fire.sum(0),
        mu,
        m2_tot,
        vmax.amax(0),
        vmin.amin(0),
        act.sum(0),
        l0,
    ]


# ----------------------------------------------------------------------------- sparse
@triton.jit
def _sparse_segment_stats_kernel(
    cnt_ptr,  # [n] int64 finite listed entries
    fire_ptr,  # [n] int64 listed entries > threshold
    mean_ptr,  # [n] float64 mean of the finite listed entries
    m2_ptr,  # [n] float64 their centred M2
    max_ptr,  # [n] float64
    min_ptr,  # [n] float64
    act_ptr,  # [n] float64
    vals_ptr,  # [E] listed values, sorted by feature (contiguous segments)
    starts_ptr,  # [n] int64 first entry of each feature's segment
    lens_ptr,  # [n] int64 segment lengths
    thr_ptr,  # [1] threshold in the compute dtype
    n,
    ACC: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # A program owns BLOCK_F features' whole segments: no atomics, so a feature listed by
    # every token costs a longer loop, never a contended address. Each step reads a
    # [BLOCK_F, BLOCK_E] tile: BLOCK_E entries of each of the BLOCK_F segments.
    pid = tl.program_id(0).to(tl.int64)
    fs = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = fs < n
    start = tl.load(starts_ptr + fs, mask=mask_f, other=0)
    length = tl.load(lens_ptr + fs, mask=mask_f, other=0)
    longest = tl.max(length, axis=0)
    thr = tl.load(thr_ptr)
    run_cnt = tl.zeros([BLOCK_F], dtype=tl.int64)
    run_fire = tl.zeros([BLOCK_F], dtype=tl.int64)
    run_mean = tl.zeros([BLOCK_F], dtype=tl.float64)
    run_m2 = tl.zeros([BLOCK_F], dtype=tl.float64)
    run_act = tl.zeros([BLOCK_F], dtype=tl.float64)
    run_max = tl.full([BLOCK_F], float("-inf"), dtype=tl.float64)
    run_min = tl.full([BLOCK_F], float("inf"), dtype=tl.float64)
    for e0 in range(0, longest, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E).to(tl.int64)
        mask = offs[None, :] < length[:, None]
        v = tl.load(vals_ptr + start[:, None] + offs[None, :], mask=mask, other=0.0).to(ACC)
        fin = mask & (tl.abs(v) < float("inf"))
        # Corrected two-pass mean in registers, as in the dense kernel.
        c = tl.sum(fin.to(tl.int32), axis=1)
        cf = tl.maximum(c, 1).to(ACC)
        shift = tl.sum(tl.where(fin, v, 0.0), axis=1) / cf
        d0 = tl.where(fin, v - shift[:, None], 0.0)
        tmean_d = tl.sum(d0, axis=1) / cf
        d = tl.where(fin, d0 - tmean_d[:, None], 0.0)
        tm2 = tl.sum(d * d, axis=1)
        tmean = shift.to(tl.float64) + tmean_d.to(tl.float64)
        fire = fin & (v > thr)
        cb = c.to(tl.int64)
        nab = run_cnt + cb
        w = cb.to(tl.float64) / tl.maximum(nab, 1).to(tl.float64)
        delta = tmean - run_mean
        run_mean += delta * w
        run_m2 += tm2.to(tl.float64) + delta * delta * run_cnt.to(tl.float64) * w
        run_cnt = nab
        run_max = tl.maximum(run_max, tl.max(tl.where(fin, v, float("-inf")), axis=1).to(tl.float64))
        run_min = tl.minimum(run_min, tl.min(tl.where(fin, v, float("inf")), axis=1).to(tl.float64))
        run_fire += tl.sum(fire.to(tl.int32), axis=1).to(tl.int64)
        run_act += tl.sum(tl.where(fire, v, 0.0), axis=1).to(tl.float64)
    tl.store(cnt_ptr + fs, run_cnt, mask=mask_f)
    tl.store(fire_ptr + fs, run_fire, mask=mask_f)
    tl.store(mean_ptr + fs, run_mean, mask=mask_f)
    tl.store(m2_ptr + fs, run_m2, mask=mask_f)
    tl.store(max_ptr + fs, run_max, mask=mask_f)
    tl.store(min_ptr + fs, run_min, mask=mask_f)
    tl.store(act_ptr + fs, run_act, mask=mask_f)


@triton.jit
def _sparse_l0_kernel(
    l0_ptr,  # [T] int64
    idx_ptr,  # [T, k]
    vals_ptr,  # [T, k]
    thr_ptr,  # [1]
    T,
    k,
    n,
    stride_it,
    stride_ik,
    stride_vt,
    stride_vk,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_k[None, :] < k)
    idx = tl.load(idx_ptr + offs_t[:, None] * stride_it + offs_k[None, :] * stride_ik, mask=mask, other=-1)
    v = tl.load(vals_ptr + offs_t[:, None] * stride_vt + offs_k[None, :] * stride_vk, mask=mask, other=0.0)
    v = v.to(ACC)
    thr = tl.load(thr_ptr)
    listed = idx >= 0
    fire = listed & (tl.abs(v) < float("inf")) & (v > thr)
    n_listed = tl.sum(listed.to(tl.int64), axis=1)
    # Every unlisted feature is an explicit 0, which fires iff 0 > threshold.
    zero_fires = (thr < 0).to(tl.int64)
    l0 = tl.sum(fire.to(tl.int64), axis=1) + (n - n_listed) * zero_fires
    tl.store(l0_ptr + offs_t, l0, mask=mask_t)


def activation_stats_sparse_triton(
    indices: torch.Tensor, values: torch.Tensor, n: int, threshold: float
) -> list[torch.Tensor]:
    """indices, values: (T, k) top-k codes (-1 = padding); n features. See module docstring.

    Sort-and-segment: the listed (feature, value) pairs are sorted by feature (a stable
    torch sort of the integer keys), each feature's segment is reduced by one program, and
    the implicit zeros (T - listed entries per feature) are merged in float64 afterwards.
    """
    T, k = indices.shape
    device = values.device
    n = int(n)
    if T == 0 or n == 0:
        return _empty_outputs(T, n, device)
    acc = compute_dtype(values.dtype)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    thr = torch.tensor([threshold_for(threshold, values.dtype)], dtype=acc_torch, device=device)

    i64 = dict(dtype=torch.int64, device=device)
    f64 = dict(dtype=torch.float64, device=device)
    l0 = torch.empty(T, **i64)
    BLOCK_T = 64
    BLOCK_K = max(2, triton.next_power_of_2(max(k, 1)))
    _sparse_l0_kernel[(triton.cdiv(T, BLOCK_T),)](
        l0, indices, values, thr, T, k, n,
        indices.stride(0), indices.stride(1), values.stride(0), values.stride(1),
        ACC=acc, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
    )  # fmt: skip

    keys = indices.reshape(-1).to(torch.int64)
    order = torch.argsort(keys, stable=True)  # padding (-1) sorts first
    vals_sorted = values.reshape(-1)[order].contiguous()
    per_key = torch.bincount(keys + 1, minlength=n + 1)
    starts = (torch.cumsum(per_key, 0) - per_key)[1:].contiguous()
    lens = per_key[1:].contiguous()

    cnt_l = torch.empty(n, **i64)
    fire_l = torch.empty(n, **i64)
    mean_l = torch.empty(n, **f64)
    m2_l = torch.empty(n, **f64)
    max_l = torch.empty(n, **f64)
    min_l = torch.empty(n, **f64)
    act_l = torch.empty(n, **f64)
    if k > 0:
        # 16 features x 32 entries per step: short segments (the common case for top-k
        # codes) share a program instead of idling one each.
        BLOCK_F = 16
        _sparse_segment_stats_kernel[(triton.cdiv(n, BLOCK_F),)](
            cnt_l, fire_l, mean_l, m2_l, max_l, min_l, act_l,
            vals_sorted, starts, lens, thr, n,
            ACC=acc, BLOCK_F=BLOCK_F, BLOCK_E=32,
        )  # fmt: skip
    else:
        cnt_l.zero_(), fire_l.zero_(), mean_l.zero_(), m2_l.zero_(), act_l.zero_()
        max_l.fill_(float("-inf")), min_l.fill_(float("inf"))

    # Implicit zeros: (z, mean 0, M2 0) merged with the listed group by Chan's formula.
    z = T - lens
    count = cnt_l + z
    c_f, z_f = cnt_l.to(torch.float64), z.to(torch.float64)
    tot = count.to(torch.float64).clamp_min(1.0)
    mean = mean_l * (c_f / tot)
    m2 = m2_l + mean_l * mean_l * (c_f * z_f / tot)
    has_zero = z > 0
    zero = torch.zeros((), **f64)
    vmax = torch.where(has_zero, torch.maximum(max_l, zero), max_l)
    vmin = torch.where(has_zero, torch.minimum(min_l, zero), min_l)
    fire = fire_l + (z if 0.0 > float(threshold) else 0)
    return [count, fire, mean, m2, vmax, vmin, act_l, l0]
