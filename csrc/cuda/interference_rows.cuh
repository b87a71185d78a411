// The row kernel of the CUDA interference tiles (csrc/cuda/interference.cu): each row of a
// cosine tile reduced in one CUDA block (sums of squares, max |cos| and its argmax, top-k
// for k <= 32), and its host launchers. Shared by every variant of the tile driver.
#pragma once

#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Inserts (a, j) into a list sorted by (value desc, index asc); the displaced element
// bubbles down and the last one falls off. Indices are compile-time after unrolling, so
// the lists stay in registers.
template <typename acc_t, int KMAX>
__device__ __forceinline__ void topk_insert(acc_t (&tv)[KMAX], int (&ti)[KMAX], acc_t a, int j) {
#pragma unroll
  for (int q = 0; q < KMAX; ++q) {
    if (better<acc_t>(a, j, tv[q], ti[q])) {
      const acc_t tv_old = tv[q];
      const int ti_old = ti[q];
      tv[q] = a;
      ti[q] = j;
      a = tv_old;
      j = ti_old;
    }
  }
}

template <typename acc_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
    _interference_kernel(double* __restrict__ sq, double* __restrict__ sqcos,
                         double* __restrict__ maxabs, int64_t* __restrict__ argmax,
                         double* __restrict__ tk_cos, int64_t* __restrict__ tk_idx,
                         const acc_t* __restrict__ G, const double* __restrict__ col_nsq,
                         const acc_t* __restrict__ row_inv, const acc_t* __restrict__ col_inv,
                         int64_t r0, int64_t ncols, int64_t col0, int64_t topk, bool exclude_self) {
  // G holds rows r0.. against columns col0.. (ncols of them); col_nsq and col_inv are
  // indexed like G's columns, row_inv like its rows; every index written out is global
  // (col0 + j). row_inv == nullptr: G already holds cosines.
  __shared__ double s_sum[2][kWarps];
  __shared__ acc_t s_val[kWarps];
  __shared__ int64_t s_idx[kWarps];
  __shared__ int64_t s_win;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const int64_t i = r0 + r;
  const acc_t* g = G + r * ncols;
  const acc_t r_inv = row_inv ? row_inv[r] : acc_t(1);
  auto cosine = [&](int64_t j) { return row_inv ? g[j] * (r_inv * col_inv[j]) : g[j]; };

  double s_sq = 0.0, s_c = 0.0;
  acc_t bv = 0;
  int64_t bi = -1;
  acc_t tv[KMAX > 0 ? KMAX : 1];
  int ti[KMAX > 0 ? KMAX : 1];
#pragma unroll
  for (int q = 0; q < (KMAX > 0 ? KMAX : 1); ++q) {
    tv[q] = 0;
    ti[q] = -1;
  }
  // Each thread meets its columns in increasing order, so strict comparisons keep the
  // smallest index among equal values.
  for (int64_t j = tid; j < ncols; j += kThreads) {
    const int64_t jg = col0 + j;
    if (exclude_self && jg == i) continue;
    const acc_t c = cosine(j);
    const double c2 = static_cast<double>(c) * static_cast<double>(c);
    s_sq += c2 * col_nsq[j];
    s_c += c2;
    const acc_t a = c < acc_t(0) ? -c : c;
    if (a > bv) {
      bv = a;
      bi = jg;
    }
    if constexpr (KMAX > 0) {
      // Only partners with |cos| > 0 count; the cheap test against the list's worst
      // rejects almost every candidate once the list is warm.
      if (a > acc_t(0) && better<acc_t>(a, jg, tv[KMAX - 1], ti[KMAX - 1]))
        topk_insert<acc_t, KMAX>(tv, ti, a, static_cast<int>(jg));
    }
  }

  // Block reductions: sums in a fixed tree (deterministic), argmax with index tie-break.
  s_sq = warp_sum(s_sq);
  s_c = warp_sum(s_c);
  warp_argmax(bv, bi);
  if (lane == 0) {
    s_sum[0][warp] = s_sq;
    s_sum[1][warp] = s_c;
    s_val[warp] = bv;
    s_idx[warp] = bi;
  }
  __syncthreads();
  if (tid == 0) {
    double a = 0.0, b = 0.0;
    acc_t v = s_val[0];
    int64_t ix = s_idx[0];
    for (int w = 0; w < kWarps; ++w) {
      a += s_sum[0][w];
      b += s_sum[1][w];
      if (w > 0 && better(s_val[w], s_idx[w], v, ix)) {
        v = s_val[w];
        ix = s_idx[w];
      }
    }
    sq[i] = a;
    sqcos[i] = b;
    maxabs[i] = ix >= 0 ? static_cast<double>(v) : 0.0;
    argmax[i] = ix;
  }

  if constexpr (KMAX > 0) {
    // Pop the block's best head topk times. Every thread's list is sorted, so the best
    // remaining candidate overall is the best of the heads.
    for (int64_t q = 0; q < topk; ++q) {
      acc_t hv = tv[0];
      int64_t hi = ti[0];
      warp_argmax(hv, hi);
      __syncthreads();  // the previous round's readers of s_val / s_win are done
      if (lane == 0) {
        s_val[warp] = hv;
        s_idx[warp] = hi;
      }
      __syncthreads();
      if (tid == 0) {
        acc_t v = s_val[0];
        int64_t ix = s_idx[0];
        for (int w = 1; w < kWarps; ++w) {
          if (better(s_val[w], s_idx[w], v, ix)) {
            v = s_val[w];
            ix = s_idx[w];
          }
        }
        s_win = ix;
        if (ix >= 0) {
          tk_cos[i * topk + q] = static_cast<double>(cosine(ix - col0));  // the signed cosine
          tk_idx[i * topk + q] = ix;
        }
      }
      __syncthreads();
      const int64_t win = s_win;
      if (win < 0) break;  // uniform: every thread read the same s_win
      if (ti[0] == win) {
        // Column indices are owned by one thread each, so exactly one thread pops.
#pragma unroll
        for (int p = 0; p + 1 < KMAX; ++p) {
          tv[p] = tv[p + 1];
          ti[p] = ti[p + 1];
        }
        tv[KMAX - 1] = 0;
        ti[KMAX - 1] = -1;
      }
    }
  }
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t, int64_t offset) {
  return t.defined() ? t.data_ptr<acc_t>() + offset : nullptr;
}

// row_inv / col_inv: the inverse norms of all rows / columns (undefined when G holds cosines).
template <typename acc_t, int KMAX>
void launch_rows(const at::Tensor& Gt, int64_t R, int64_t r0, int64_t ncols, int64_t col0, const at::Tensor& col_nsq,
                 const at::Tensor& row_inv, const at::Tensor& col_inv, int64_t topk, bool exclude_self,
                 at::Tensor& sq, at::Tensor& sqcos, at::Tensor& maxabs, at::Tensor& argmax, at::Tensor& tk_cos,
                 at::Tensor& tk_idx) {
  auto stream = at::cuda::getCurrentCUDAStream();
  _interference_kernel<acc_t, KMAX><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
      sq.data_ptr<double>(), sqcos.data_ptr<double>(), maxabs.data_ptr<double>(),
      argmax.data_ptr<int64_t>(), tk_cos.data_ptr<double>(), tk_idx.data_ptr<int64_t>(),
      Gt.data_ptr<acc_t>(), col_nsq.data_ptr<double>() + col0, ptr_or_null<acc_t>(row_inv, r0),
      ptr_or_null<acc_t>(col_inv, col0), r0, ncols, col0, KMAX > 0 ? topk : 0, exclude_self);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_rows_k(const at::Tensor& Gt, int64_t R, int64_t r0, int64_t ncols, int64_t col0,
                   const at::Tensor& col_nsq, const at::Tensor& row_inv, const at::Tensor& col_inv, int64_t topk,
                   bool exclude_self, at::Tensor& sq, at::Tensor& sqcos, at::Tensor& maxabs, at::Tensor& argmax,
                   at::Tensor& tk_cos, at::Tensor& tk_idx) {
#define SA_LAUNCH(K)                                                                                   \
  launch_rows<acc_t, K>(Gt, R, r0, ncols, col0, col_nsq, row_inv, col_inv, topk, exclude_self, sq, sqcos, \
                        maxabs, argmax, tk_cos, tk_idx)
  if (topk == 0 || topk > 32)
    SA_LAUNCH(0);
  else if (topk <= 4)
    SA_LAUNCH(4);
  else if (topk <= 8)
    SA_LAUNCH(8);
  else if (topk <= 16)
    SA_LAUNCH(16);
  else
    SA_LAUNCH(32);
#undef SA_LAUNCH
}

}  // namespace
}  // namespace supanalysis
