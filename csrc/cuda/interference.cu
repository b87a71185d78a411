// Feature interference on the GPU, tile by tile, never holding the n x n Gram matrix.
//
// Rows of unit directions go in row blocks of R (the `block` argument, or a default that
// keeps the workspace near 2^25 elements); each row block's cosines against every column
// direction, G = Ŵ[rows] Ĉ^T [R, n_cols], come from cuBLAS (at::mm_out into one reused
// workspace: memory O(R * n_cols), never n x n). _interference_kernel then reduces each
// row of the tile in one CUDA block:
//   sum_j cos^2 * |C_j|^2 and sum_j cos^2 (float64, fixed-order block reduction),
//   max |cos| and its argmax (ties to the smallest index; -1 when the max is 0),
//   top-k by |cos| for k <= 32: each thread keeps its best KMAX candidates sorted in
//   registers (fully unrolled insertion, so no local memory), then k rounds of a block
//   argmax pop the winners in order (|cos| descending, ties to the smallest index).
// Self pairs are skipped when V is None. k > 32 takes ATen's topk over the tile instead
// (ties in ATen's order, as the reference's).
//
// Symmetry is not exploited: without V every off-diagonal cosine is computed twice (once
// per row block of each end). A full-width row tile lets one CUDA block finish a feature
// in one pass with no running state across tiles, which keeps the kernel simple and the
// tie-breaking obviously right; the GEMM is the only thing done twice.
#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWorkspaceElems = int64_t(1) << 25;
constexpr int64_t kDefaultMaxRows = 1024;

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
                         int64_t r0, int64_t ncols, int64_t topk, bool exclude_self) {
  __shared__ double s_sum[2][kWarps];
  __shared__ acc_t s_val[kWarps];
  __shared__ int64_t s_idx[kWarps];
  __shared__ int64_t s_win;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t r = blockIdx.x;
  const int64_t i = r0 + r;
  const acc_t* g = G + r * ncols;

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
    if (exclude_self && j == i) continue;
    const acc_t c = g[j];
    const double c2 = static_cast<double>(c) * static_cast<double>(c);
    s_sq += c2 * col_nsq[j];
    s_c += c2;
    const acc_t a = c < acc_t(0) ? -c : c;
    if (a > bv) {
      bv = a;
      bi = j;
    }
    if constexpr (KMAX > 0) {
      // Only partners with |cos| > 0 count; the cheap test against the list's worst
      // rejects almost every candidate once the list is warm.
      if (a > acc_t(0) && better<acc_t>(a, j, tv[KMAX - 1], ti[KMAX - 1]))
        topk_insert<acc_t, KMAX>(tv, ti, a, static_cast<int>(j));
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
          tk_cos[i * topk + q] = static_cast<double>(g[ix]);  // the signed cosine
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

// Row norms in float64 and unit rows in the compute dtype (zero rows stay zero), as the
// CPU kernel and the reference form them.
std::pair<at::Tensor, at::Tensor> normalise(const at::Tensor& X, at::ScalarType compute) {
  const at::Tensor X64 = X.to(at::kDouble);
  at::Tensor nrm = X64.pow(2).sum(1).sqrt();
  at::Tensor inv = at::where(nrm.gt(0), nrm.reciprocal(), at::zeros_like(nrm));
  at::Tensor unit = X64.mul(inv.unsqueeze(1)).to(compute).contiguous();
  return {nrm, unit};
}

template <typename acc_t, int KMAX>
void launch_rows(const at::Tensor& Gt, int64_t R, int64_t r0, int64_t ncols, const at::Tensor& col_nsq,
                 int64_t topk, bool exclude_self, at::Tensor& sq, at::Tensor& sqcos,
                 at::Tensor& maxabs, at::Tensor& argmax, at::Tensor& tk_cos, at::Tensor& tk_idx) {
  auto stream = at::cuda::getCurrentCUDAStream();
  _interference_kernel<acc_t, KMAX><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
      sq.data_ptr<double>(), sqcos.data_ptr<double>(), maxabs.data_ptr<double>(),
      argmax.data_ptr<int64_t>(), tk_cos.data_ptr<double>(), tk_idx.data_ptr<int64_t>(),
      Gt.data_ptr<acc_t>(), col_nsq.data_ptr<double>(), r0, ncols, KMAX > 0 ? topk : 0,
      exclude_self);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_rows_k(const at::Tensor& Gt, int64_t R, int64_t r0, int64_t ncols,
                   const at::Tensor& col_nsq, int64_t topk, bool exclude_self, at::Tensor& sq,
                   at::Tensor& sqcos, at::Tensor& maxabs, at::Tensor& argmax, at::Tensor& tk_cos,
                   at::Tensor& tk_idx) {
#define SA_LAUNCH(K) \
  launch_rows<acc_t, K>(Gt, R, r0, ncols, col_nsq, topk, exclude_self, sq, sqcos, maxabs, argmax, tk_cos, tk_idx)
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

std::vector<at::Tensor> interference_cuda(const at::Tensor& W_in, const std::optional<at::Tensor>& V_in,
                                          int64_t topk, int64_t block) {
  check_cuda(W_in, "W");
  TORCH_CHECK(W_in.dim() == 2, "W must be 2-D [features, dim], got ", W_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(W_in.scalar_type()), "W must be floating point, got ", W_in.scalar_type());
  TORCH_CHECK(topk >= 0, "topk must be >= 0, got ", topk);
  TORCH_CHECK(block >= 0, "block must be >= 0, got ", block);
  if (V_in) {
    check_cuda(*V_in, "V");
    check_same_device(*V_in, W_in, "V", "W");
    TORCH_CHECK(V_in->dim() == 2 && V_in->size(1) == W_in.size(1),
                "V must be 2-D [k, m] with W's dim m = ", W_in.size(1), ", got ", V_in->sizes());
    TORCH_CHECK(at::isFloatingType(V_in->scalar_type()), "V must be floating point, got ", V_in->scalar_type());
  }
  const c10::cuda::CUDAGuard device_guard(W_in.device());
  // Half and bfloat16 directions are widened once: cosines accumulate in float32 anyway.
  const auto compute = W_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = W_in.size(0);
  const bool has_v = V_in.has_value();
  const int64_t ncols = has_v ? V_in->size(0) : n;
  TORCH_CHECK(ncols <= std::numeric_limits<int>::max(), "too many column directions: ", ncols);
  auto f64 = W_in.options().dtype(at::kDouble);
  auto i64 = W_in.options().dtype(at::kLong);

  auto [w_norm, Wn] = normalise(W_in, compute);
  const at::Tensor w_nsq = w_norm.pow(2).contiguous();
  at::Tensor Cn = Wn, col_nsq = w_nsq;
  if (has_v) {
    auto [v_norm, vunit] = normalise(*V_in, compute);
    Cn = vunit;
    col_nsq = v_norm.pow(2).contiguous();
  }
  at::Tensor sq = at::zeros({n}, f64), sqcos = at::zeros({n}, f64), maxabs = at::zeros({n}, f64);
  at::Tensor argmax = at::full({n}, -1, i64);
  at::Tensor tk_cos = at::zeros({n, topk}, f64);
  at::Tensor tk_idx = at::full({n, topk}, -1, i64);

  if (n > 0 && ncols > 0) {
    const int64_t R = block > 0 ? std::min(block, n)
                                : std::min({n, kDefaultMaxRows,
                                            std::max<int64_t>(1, kWorkspaceElems / ncols)});
    at::Tensor ws = at::empty({R, ncols}, Wn.options());
    const at::Tensor CnT = Cn.t();
    const int64_t k_eff = std::min(topk, ncols);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t Rb = std::min(R, n - r0);
      at::Tensor Gt = ws.narrow(0, 0, Rb);  // contiguous: a prefix of rows
      at::mm_out(Gt, Wn.narrow(0, r0, Rb), CnT);
      if (compute == at::kDouble) {
        launch_rows_k<double>(Gt, Rb, r0, ncols, col_nsq, topk, !has_v, sq, sqcos, maxabs, argmax, tk_cos, tk_idx);
      } else {
        launch_rows_k<float>(Gt, Rb, r0, ncols, col_nsq, topk, !has_v, sq, sqcos, maxabs, argmax, tk_cos, tk_idx);
      }
      if (topk > 32 && k_eff > 0) {
        // Large k: ATen's topk over the tile, self masked to -1 as the reference does.
        at::Tensor A = Gt.abs();
        if (!has_v) A.diagonal(r0).fill_(-1);
        auto [tv, ti] = A.topk(k_eff, 1);
        const at::Tensor pos = tv.gt(0);
        tk_cos.narrow(0, r0, Rb).narrow(1, 0, k_eff).copy_(
            at::where(pos, Gt.gather(1, ti), at::zeros_like(tv)).to(at::kDouble));
        tk_idx.narrow(0, r0, Rb).narrow(1, 0, k_eff).copy_(at::where(pos, ti, at::full_like(ti, -1)));
      }
    }
  }

  at::Tensor dims;
  if (!has_v) {
    // D_i = |W_i|^4 / sum_j (W_i.W_j)^2 = |W_i|^2 / (|W_i|^2 + sum_{j!=i} (Ŵ_i.W_j)^2).
    dims = at::where(w_nsq.gt(0), w_nsq.div(w_nsq.add(sq)), at::zeros_like(w_nsq));
  } else {
    dims = at::empty({0}, f64);
  }
  return {w_norm, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx};
}

}  // namespace supanalysis
