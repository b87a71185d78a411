// Best match per feature from the float64 co-moment, in one read of the state.
//
// corr_ij = clamp(C_ij * inv_std_a_i * inv_std_b_j, -1, 1); pairs where either inv_std is
// 0 (a constant feature) or the product is NaN are never candidates.
//
// _best_match_kernel: grid (column chunks of kThreads * kCols) x (row splits). Each thread
// owns kCols consecutive columns of the chunk and walks the split's rows, so every element
// of C is loaded exactly once and feeds both reductions:
//   - column maxima stay in the thread's registers for the whole split;
//   - row maxima are reduced across the block (warp shuffles, then one slot per warp in
//     shared memory, combined in warp order) for groups of kRowGroup rows.
// Both write per-(chunk|split) partials; _best_match_reduce_kernel combines them. Every
// comparison is "larger wins, equal values go to the smaller index", so the answer is the
// first maximum in index order whatever the partition.
#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 4;                // columns per thread
constexpr int kRowGroup = 32;           // rows per shared-memory row reduction
constexpr int64_t kMinSplitRows = 128;  // keeps column partials <= 1/64 of C's bytes

__global__ void __launch_bounds__(kThreads)
    _best_match_kernel(double* __restrict__ row_val, int64_t* __restrict__ row_idx,
                       double* __restrict__ col_val, int64_t* __restrict__ col_idx,
                       const double* __restrict__ C, const double* __restrict__ inv_a,
                       const double* __restrict__ inv_b, int64_t na, int64_t nb,
                       int64_t rows_per_split) {
  __shared__ double s_val[kWarps][kRowGroup];
  __shared__ int64_t s_idx[kWarps][kRowGroup];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t chunk = blockIdx.x, split = blockIdx.y;
  const int64_t j0 = (chunk * kThreads + tid) * kCols;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = std::min<int64_t>(na, r_begin + rows_per_split);

  double sb[kCols], cv[kCols];
  int64_t ci[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    sb[c] = j0 + c < nb ? inv_b[j0 + c] : 0.0;  // 0 marks "not a candidate"
    cv[c] = -INFINITY;
    ci[c] = -1;
  }

  // Loop bounds depend on the block only: every thread reaches every shuffle and barrier.
  for (int64_t g0 = r_begin; g0 < r_end; g0 += kRowGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, r_end - g0));
    for (int r = 0; r < rows; ++r) {
      const int64_t i = g0 + r;
      const double si = inv_a[i];
      double bv = -INFINITY;
      int64_t bi = -1;
      if (si != 0.0) {
        const double* Ci = C + i * nb;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          if (sb[c] != 0.0) {
            // Same association as the reference: (C_ij * ia_i) * ib_j.
            double v = Ci[j0 + c] * si * sb[c];
            v = v < -1.0 ? -1.0 : (v > 1.0 ? 1.0 : v);
            if (v == v) {  // NaN is never a match
              const int64_t j = j0 + c;
              if (better(v, j, bv, bi)) {
                bv = v;
                bi = j;
              }
              if (better(v, i, cv[c], ci[c])) {
                cv[c] = v;
                ci[c] = i;
              }
            }
          }
        }
      }
      warp_argmax(bv, bi);
      if (lane == 0) {
        s_val[warp][r] = bv;
        s_idx[warp][r] = bi;
      }
    }
    __syncthreads();
    if (tid < rows) {
      double v = s_val[0][tid];
      int64_t ix = s_idx[0][tid];
      for (int w = 1; w < kWarps; ++w) {
        if (better(s_val[w][tid], s_idx[w][tid], v, ix)) {
          v = s_val[w][tid];
          ix = s_idx[w][tid];
        }
      }
      row_val[chunk * na + g0 + tid] = v;
      row_idx[chunk * na + g0 + tid] = ix;
    }
    __syncthreads();  // s_val / s_idx are free for the next group
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    if (j0 + c < nb) {
      col_val[split * nb + j0 + c] = cv[c];
      col_idx[split * nb + j0 + c] = ci[c];
    }
  }
}

// out[q] = best over parts p of (val[p, q], idx[p, q]); 0 / -1 when there is no candidate.
__global__ void _best_match_reduce_kernel(double* __restrict__ out_val, int64_t* __restrict__ out_idx,
                                          const double* __restrict__ val,
                                          const int64_t* __restrict__ idx, int64_t len,
                                          int64_t parts) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < len;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double bv = -INFINITY;
    int64_t bi = -1;
    for (int64_t p = 0; p < parts; ++p) {
      const double v = val[p * len + q];
      const int64_t i = idx[p * len + q];
      if (better(v, i, bv, bi)) {
        bv = v;
        bi = i;
      }
    }
    out_val[q] = bi >= 0 ? bv : 0.0;
    out_idx[q] = bi;
  }
}

}  // namespace

std::vector<at::Tensor> best_match_cuda(const at::Tensor& comoment, const at::Tensor& inv_std_a,
                                        const at::Tensor& inv_std_b) {
  check_cuda(comoment, "comoment");
  check_cuda(inv_std_a, "inv_std_a");
  check_cuda(inv_std_b, "inv_std_b");
  check_same_device(inv_std_a, comoment, "inv_std_a", "comoment");
  check_same_device(inv_std_b, comoment, "inv_std_b", "comoment");
  TORCH_CHECK(comoment.dim() == 2 && comoment.scalar_type() == at::kDouble,
              "comoment must be float64 [n_a, n_b], got ", comoment.scalar_type(), " ", comoment.sizes());
  const int64_t na = comoment.size(0), nb = comoment.size(1);
  TORCH_CHECK(inv_std_a.numel() == na && inv_std_b.numel() == nb,
              "inv_std_a / inv_std_b must have n_a = ", na, " / n_b = ", nb, " entries, got ",
              inv_std_a.numel(), " / ", inv_std_b.numel());
  const c10::cuda::CUDAGuard device_guard(comoment.device());
  auto f64 = comoment.options();
  auto i64 = comoment.options().dtype(at::kLong);
  at::Tensor max_a = at::zeros({na}, f64), max_b = at::zeros({nb}, f64);
  at::Tensor arg_a = at::full({na}, -1, i64), arg_b = at::full({nb}, -1, i64);
  if (na == 0 || nb == 0) return {max_a, arg_a, max_b, arg_b};

  const at::Tensor C = comoment.contiguous();
  const at::Tensor ia = inv_std_a.to(at::kDouble).contiguous().view({na});
  const at::Tensor ib = inv_std_b.to(at::kDouble).contiguous().view({nb});
  const int64_t gx = ceil_div(nb, static_cast<int64_t>(kThreads) * kCols);
  TORCH_CHECK(gx <= std::numeric_limits<int>::max(), "comoment has too many columns for one launch");
  const int64_t want = std::max<int64_t>(1, ceil_div(8 * static_cast<int64_t>(num_sms()), gx));
  int64_t rows_per_split = std::max<int64_t>(kMinSplitRows, ceil_div(na, want));
  rows_per_split = ceil_div(rows_per_split, kRowGroup) * kRowGroup;
  int64_t splits = ceil_div(na, rows_per_split);
  if (splits > kMaxGridY) {
    rows_per_split = ceil_div(ceil_div(na, kMaxGridY), kRowGroup) * kRowGroup;
    splits = ceil_div(na, rows_per_split);
  }
  at::Tensor row_val = at::empty({gx, na}, f64), col_val = at::empty({splits, nb}, f64);
  at::Tensor row_idx = at::empty({gx, na}, i64), col_idx = at::empty({splits, nb}, i64);
  auto stream = at::cuda::getCurrentCUDAStream();
  _best_match_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
      row_val.data_ptr<double>(), row_idx.data_ptr<int64_t>(), col_val.data_ptr<double>(),
      col_idx.data_ptr<int64_t>(), C.data_ptr<double>(), ia.data_ptr<double>(), ib.data_ptr<double>(),
      na, nb, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _best_match_reduce_kernel<<<grid_for(na, 256), 256, 0, stream>>>(
      max_a.data_ptr<double>(), arg_a.data_ptr<int64_t>(), row_val.data_ptr<double>(),
      row_idx.data_ptr<int64_t>(), na, gx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _best_match_reduce_kernel<<<grid_for(nb, 256), 256, 0, stream>>>(
      max_b.data_ptr<double>(), arg_b.data_ptr<int64_t>(), col_val.data_ptr<double>(),
      col_idx.data_ptr<int64_t>(), nb, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {max_a, arg_a, max_b, arg_b};
}

}  // namespace supanalysis
