"""Triton backend of ``supanalysis::coactivation_update`` (dense and top-k sparse).

Contract: ``supanalysis/ops/coactivation.py``: counts [n, n] int64 += #tokens on which
features i and j are both active (dense: finite and > threshold; sparse: listed).

Dense: the binarised batch B (0/1, formed in registers, never stored) is multiplied with
tl.dot on float16 operands with float32 accumulation, which is exact for counts below
2^24; the float32 tile is moved into an int64 accumulator every MERGE_T (<= 2^24) tokens,
so counts stay exact for any T. Only tile pairs (I, J) with I <= J are computed; the
epilogue adds the tile into counts[I, J] and its transpose into counts[J, I].

Sparse: work is O(T k^2), never O(T n^2). Pairs of two of the batch's ``hot`` most frequent
features (the atomic hot spots: the diagonal and the frequent pairs) are counted densely,
a 0/1 [tokens, hot] tile per program multiplied with tl.dot and added once per program;
every other listed pair adds 1 to counts[i, j] with an int64 atomic (exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import compute_dtype, threshold_for


@triton.jit
def _coactivation_update_kernel(
    counts_ptr,  # [n, n] int64, updated in place
    x_ptr,  # [T, n]
    pairs_ptr,  # [P, 2] int32 tile pairs (I, J) with I <= J
    thr_ptr,  # [1] threshold in the compute dtype
    T,
    n,
    stride_t,
    stride_n,
    stride_ci,
    stride_cj,
    ACC: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MERGE_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(pairs_ptr + 2 * pid).to(tl.int64)
    tj = tl.load(pairs_ptr + 2 * pid + 1).to(tl.int64)
    thr = tl.load(thr_ptr)
    ri = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = tj * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = ri < n
    mask_j = rj < n
    total = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.int64)
    for t1 in range(0, T, MERGE_T):
        acc = tl.zeros([BLOCK_I, BLOCK_I], dtype=tl.float32)
        t_end = tl.minimum(t1 + MERGE_T, T)
        for t0 in range(t1, t_end, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            mt = ts < t_end
            ki = mt[:, None] & mask_i[None, :]
            kj = mt[:, None] & mask_j[None, :]
            a = tl.load(x_ptr + ts[:, None] * stride_t + ri[None, :] * stride_n, mask=ki, other=0.0)
            b = tl.load(x_ptr + ts[:, None] * stride_t + rj[None, :] * stride_n, mask=kj, other=0.0)
            a = a.to(ACC)
            b = b.to(ACC)
            # Active = finite and > threshold (NaN compares false; +inf is excluded).
            ba = (ki & (tl.abs(a) < float("inf")) & (a > thr)).to(tl.float16)
            bb = (kj & (tl.abs(b) < float("inf")) & (b > thr)).to(tl.float16)
            acc = tl.dot(tl.trans(ba), bb, acc)
        # Exact: every partial count is an integer below 2^24.
        total += acc.to(tl.int64)
    mask = mask_i[:, None] & mask_j[None, :]
    p_ij = counts_ptr + ri[:, None] * stride_ci + rj[None, :] * stride_cj
    tl.store(p_ij, tl.load(p_ij, mask=mask, other=0) + total, mask=mask)
    if ti != tj:
        # The mirror tile counts[J, I] = total^T, addressed transposed (no data movement).
        p_ji = counts_ptr + rj[None, :] * stride_ci + ri[:, None] * stride_cj
        tl.store(p_ji, tl.load(p_ji, mask=mask, other=0) + total, mask=mask)


def coactivation_update_triton(counts: torch.Tensor, x: torch.Tensor, threshold: float) -> None:
    """counts: (n, n) int64, updated in place; x: (T, n) float16/bfloat16/float32/float64."""
    T, n = x.shape
    if T == 0 or n == 0:
        return
    acc = compute_dtype(x.dtype)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    # The contract compares ``x > threshold`` in float64 (as activation_stats does, so the
    # diagonal equals fire_count): round the threshold down into the compute dtype.
    thr = torch.tensor([threshold_for(threshold, acc_torch)], dtype=acc_torch, device=x.device)
    BLOCK_I = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    tiles = triton.cdiv(n, BLOCK_I)
    # Upper-triangular tile pairs: B^T B is symmetric, so half the products suffice.
    iu = torch.triu_indices(tiles, tiles, device=x.device)
    pairs = iu.t().contiguous().to(torch.int32)
    _coactivation_update_kernel[(pairs.shape[0],)](
        counts, x, pairs, thr, T, n, x.stride(0), x.stride(1), counts.stride(0), counts.stride(1),
        ACC=acc, BLOCK_I=BLOCK_I, BLOCK_T=32, MERGE_T=1 << 20,
    )  # fmt: skip


@triton.jit
def _coactivation_hot_kernel(
    counts_ptr,  # [n, n] int64, updated in place
    idx_ptr,  # [T, k] int32/int64, -1 = padding
    hot_pos_ptr,  # [n] int32 position of each feature in the hot list, -1 if not hot
    hot_ptr,  # [H] int64 the hot features
    T,
    k,
    H,
    tokens_per_program,
    stride_t,
    stride_k,
    stride_ci,
    stride_cj,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # The H most frequent features would be atomic hot spots (every token that lists two
    # of them hits the same few counters). Instead each program builds the 0/1 matrix
    # [tokens, hot features] of its token range in registers and multiplies it with
    # tl.dot (float16 operands, float32 accumulation: exact below 2^24 tokens per
    # program), then adds its H x H result once.
    pid = tl.program_id(0).to(tl.int64)
    t_start = pid * tokens_per_program
    t_end = tl.minimum(t_start + tokens_per_program, T)
    ks = tl.arange(0, BLOCK_K)
    hs = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H, BLOCK_H], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mask = (ts < t_end)[:, None] & (ks < k)[None, :]
        idx = tl.load(idx_ptr + ts[:, None] * stride_t + ks[None, :] * stride_k, mask=mask, other=-1)
        listed = idx >= 0
        pos = tl.load(hot_pos_ptr + tl.where(listed, idx, 0).to(tl.int64), mask=listed, other=-1)
        # No feature is listed twice per token, so the sum over k is already 0/1.
        B = tl.sum((pos[:, :, None] == hs[None, None, :]).to(tl.int32), axis=1).to(tl.float16)
        acc = tl.dot(tl.trans(B), B, acc)
    mask_h = hs < H
    hot = tl.load(hot_ptr + hs, mask=mask_h, other=0)
    mask = mask_h[:, None] & mask_h[None, :]
    ptrs = counts_ptr + hot[:, None] * stride_ci + hot[None, :] * stride_cj
    # One add per (program, counter): integer atomics, exact and order-independent.
    tl.atomic_add(ptrs, acc.to(tl.int64), mask=mask, sem="relaxed")


@triton.jit
def _coactivation_update_sparse_kernel(
    counts_ptr,  # [n, n] int64, updated in place (atomically)
    idx_ptr,  # [T, k] int32/int64, -1 = padding
    hot_pos_ptr,  # [n] int32, -1 if not hot: pairs of two hot features are done densely
    T,
    k,
    stride_t,
    stride_k,
    stride_ci,
    stride_cj,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    mask = (ts < T)[:, None] & (ks < k)[None, :]
    idx = tl.load(idx_ptr + ts[:, None] * stride_t + ks[None, :] * stride_k, mask=mask, other=-1)
    idx = idx.to(tl.int64)
    listed = idx >= 0
    hot = tl.load(hot_pos_ptr + tl.where(listed, idx, 0), mask=listed, other=-1) >= 0
    ii = idx[:, :, None]
    jj = idx[:, None, :]
    ok = (ii >= 0) & (jj >= 0) & ~(hot[:, :, None] & hot[:, None, :])
    ones = tl.full([BLOCK_T, BLOCK_K, BLOCK_K], 1, dtype=tl.int64)
    # Integer atomics: exact and order-independent, so the result is deterministic.
    tl.atomic_add(counts_ptr + ii * stride_ci + jj * stride_cj, ones, mask=ok, sem="relaxed")


def coactivation_update_sparse_triton(counts: torch.Tensor, indices: torch.Tensor, *, hot: int = 64) -> None:
    """counts: (n, n) int64, updated in place; indices: (T, k) int, -1 = padding.

    ``hot`` (<= 128): how many of the batch's most frequent features go through the dense
    tl.dot path instead of atomics (0 disables it; tests use it to split the work).
    """
    T, k = indices.shape
    n = counts.shape[0]
    if T == 0 or k == 0 or n == 0:
        return
    device = indices.device
    hot_pos = torch.full((n,), -1, dtype=torch.int32, device=device)
    H = min(int(hot), n)
    if H > 0:
        freq = torch.bincount(indices.reshape(-1).to(torch.int64) + 1, minlength=n + 1)[1:]
        hot_ids = torch.topk(freq, H).indices.sort().values
        hot_pos[hot_ids] = torch.arange(H, dtype=torch.int32, device=device)
        BLOCK_K = max(2, triton.next_power_of_2(k))
        BLOCK_H = max(16, triton.next_power_of_2(H))
        BLOCK_T = 32
        # Token ranges: 4096 tokens per program keeps the final H x H atomic adds per
        # counter at T / 4096 (and far below float32's exact 2^24).
        tokens_per_program = 4096
        _coactivation_hot_kernel[(triton.cdiv(T, tokens_per_program),)](
            counts, indices, hot_pos, hot_ids, T, k, H, tokens_per_program,
            indices.stride(0), indices.stride(1), counts.stride(0), counts.stride(1),
            BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H,
        )  # fmt: skip
    BLOCK_K = max(2, triton.next_power_of_2(k))
    # About 4096 pair slots per program: enough independent atomics in flight per SM.
    BLOCK_T = max(1, 4096 // (BLOCK_K * BLOCK_K))
    BLOCK_T = min(BLOCK_T, triton.next_power_of_2(T))
    _coactivation_update_sparse_kernel[(triton.cdiv(T, BLOCK_T),)](
        counts, indices, hot_pos, T, k, indices.stride(0), indices.stride(1),
        counts.stride(0), counts.stride(1), BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
    )  # fmt: skip
