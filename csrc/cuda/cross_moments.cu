// Streaming cross-moment update on the GPU: comoment += C_batch + Chan's correction.
//
// 1. The batch's float64 means and M2 come from activation_stats_cuda (one read of each
//    input, float32 tiles Chan-merged in float64; float64 tiles for float64 inputs), so no
//    float64 copy of the batch is ever made.
// 2. _center_kernel writes the batch centred about those float64 means, rounded once to
//    the compute precision (float32 for fp16/bf16/fp32 inputs, float64 when either input
//    is float64): the GEMM sees the data's spread, not its offset, which is what keeps
//    the product accurate (E[xy] - E[x]E[y] on raw sums is what we avoid).
// 3. cuBLAS forms G = ca^T cb. Opt-in bf16_dot (precision "bf16", 16/32-bit inputs): the
//    centred values are rounded to bfloat16 instead (2^-9 relative each) and cuBLAS
//    multiplies them on the tensor cores into a float32 G: several times faster; the
//    products are exact, so the CPU backend (which rounds the same way) gives the same G.
// 4. _cross_moments_epilogue_kernel adds G + coef * da_i * db_j into the float64 state in
//    place, one pass (coef = n_prev * T / (n_prev + T)).
//
// Variant "sum_means" (cross_moments_update_cuda_sum_means): step 1's means are float64
// column sums over token chunks instead of the stats kernel's Chan-merged means (~1e-9 of
// a standard deviation apart); M2 still comes from the stats kernel. Centred about a
// mean that close to exact, the "bf16" rounding of each centred value matches the other
// backends', where the default's mean flips about one value in 10^6.
#include <ATen/ops/sum.h>

#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

// Column means as float64 sums over token chunks of at most 2^25 elements (a reduction to
// a wider dtype converts its input first, so one call would copy the batch to float64).
at::Tensor column_mean64(const at::Tensor& x) {
  const int64_t T = x.size(0), n = x.size(1);
  at::Tensor acc = at::zeros({n}, x.options().dtype(at::kDouble));
  if (T == 0 || n == 0) return acc;
  const int64_t step = std::max<int64_t>(1, (int64_t(1) << 25) / n);
  for (int64_t t = 0; t < T; t += step)
    acc.add_(at::sum(x.narrow(0, t, std::min(step, T - t)), {0}, /*keepdim=*/false, at::kDouble));
  return acc.div_(static_cast<double>(T));
}

template <typename scalar_t, typename out_t>
__global__ void _center_kernel(out_t* __restrict__ out, const scalar_t* __restrict__ x,
                               const double* __restrict__ mean, int64_t T, int64_t n,
                               int64_t row_stride) {
  // Columns across threads (coalesced), rows across grid.y with a stride loop.
  const int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= n) return;
  const double mu = mean[f];
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    out[t * n + f] = static_cast<out_t>(static_cast<double>(x[t * row_stride + f]) - mu);
  }
}

template <typename g_t>
__global__ void _cross_moments_epilogue_kernel(double* __restrict__ C, const g_t* __restrict__ G,
                                               const double* __restrict__ da,
                                               const double* __restrict__ db, double coef,
                                               int64_t na, int64_t nb) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= nb) return;
  const double dbj = db[j];
  for (int64_t i = blockIdx.y; i < na; i += gridDim.y) {
    const int64_t o = i * nb + j;
    // Same association as the CPU kernel: (coef * da_i) * db_j.
    C[o] += static_cast<double>(G[o]) + (coef * da[i]) * dbj;
  }
}

template <typename out_t>
at::Tensor center(const at::Tensor& x, const at::Tensor& mean) {
  const int64_t T = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({T, n}, x.options().dtype(c10::CppTypeToScalarType<out_t>::value));
  if (T == 0 || n == 0) return out;
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(ceil_div(n, threads)),
                  static_cast<unsigned>(std::min<int64_t>(T, kMaxGridY)));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_moments_center", [&] {
    _center_kernel<scalar_t, out_t><<<grid, threads, 0, stream>>>(
        out.data_ptr<out_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<double>(), T, n, x.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// sum_means: the batch means as float64 column sums (variant "sum_means") instead of the
// stats kernel's.
std::vector<at::Tensor> cross_update(at::Tensor& comoment, int64_t n_prev, const at::Tensor& mean_a_prev,
                                     const at::Tensor& mean_b_prev, const at::Tensor& xa_in,
                                     const at::Tensor& xb_in, bool bf16_dot, bool sum_means) {
  check_cuda(xa_in, "xa");
  check_cuda(xb_in, "xb");
  check_cuda(comoment, "comoment");
  check_cuda(mean_a_prev, "mean_a_prev");
  check_cuda(mean_b_prev, "mean_b_prev");
  check_same_device(xb_in, xa_in, "xb", "xa");
  check_same_device(comoment, xa_in, "comoment", "xa");
  check_same_device(mean_a_prev, xa_in, "mean_a_prev", "xa");
  check_same_device(mean_b_prev, xa_in, "mean_b_prev", "xa");
  TORCH_CHECK(xa_in.dim() == 2 && xb_in.dim() == 2 && xa_in.size(0) == xb_in.size(0),
              "xa and xb must be [tokens, features] over the same tokens, got ", xa_in.sizes(),
              " and ", xb_in.sizes());
  TORCH_CHECK(at::isFloatingType(xa_in.scalar_type()) && at::isFloatingType(xb_in.scalar_type()),
              "xa and xb must be floating point");
  const int64_t T = xa_in.size(0), na = xa_in.size(1), nb = xb_in.size(1);
  TORCH_CHECK(comoment.scalar_type() == at::kDouble && comoment.is_contiguous() && comoment.dim() == 2 &&
                  comoment.size(0) == na && comoment.size(1) == nb,
              "comoment must be a contiguous float64 [n_a, n_b] tensor, got ", comoment.sizes());
  TORCH_CHECK(mean_a_prev.numel() == na && mean_b_prev.numel() == nb,
              "mean_a_prev / mean_b_prev must have n_a / n_b entries");
  TORCH_CHECK(n_prev >= 0, "n_prev must be non-negative, got ", n_prev);
  const c10::cuda::CUDAGuard device_guard(xa_in.device());
  auto f64 = xa_in.options().dtype(at::kDouble);
  if (T == 0) {
    return {at::zeros({na}, f64), at::zeros({na}, f64), at::zeros({nb}, f64), at::zeros({nb}, f64)};
  }
  const at::Tensor xa = xa_in.stride(1) == 1 || na <= 1 ? xa_in : xa_in.contiguous();
  const at::Tensor xb = xb_in.stride(1) == 1 || nb <= 1 ? xb_in : xb_in.contiguous();
  // activation_stats returns {finite_count, fire_count, mean, m2, ...}; batches are finite.
  const std::vector<at::Tensor> sa = activation_stats_cuda(xa, 0.0);
  const std::vector<at::Tensor> sb = activation_stats_cuda(xb, 0.0);
  const at::Tensor mean_a = sum_means ? column_mean64(xa) : sa[2], m2_a = sa[3];
  const at::Tensor mean_b = sum_means ? column_mean64(xb) : sb[2], m2_b = sb[3];
  if (na == 0 || nb == 0) return {mean_a, m2_a, mean_b, m2_b};

  const bool wide = xa.scalar_type() == at::kDouble || xb.scalar_type() == at::kDouble;
  at::Tensor G;
  TORCH_CHECK(!(bf16_dot && wide), "precision 'bf16' takes 16/32-bit batches; float64 ones are multiplied in float64");
  if (bf16_dot) {
    const at::Tensor ca = center<at::BFloat16>(xa, mean_a);
    const at::Tensor cb = center<at::BFloat16>(xb, mean_b);
    G = at::mm(ca.t(), cb, at::kFloat).contiguous();  // bf16 x bf16 -> float32 [na, nb]
  } else {
    const at::Tensor ca = wide ? center<double>(xa, mean_a) : center<float>(xa, mean_a);
    const at::Tensor cb = wide ? center<double>(xb, mean_b) : center<float>(xb, mean_b);
    G = at::mm(ca.t(), cb).contiguous();  // [na, nb]
  }
  const double coef =
      static_cast<double>(n_prev) * static_cast<double>(T) / static_cast<double>(n_prev + T);
  const at::Tensor da = mean_a.sub(mean_a_prev.to(at::kDouble).reshape({na})).contiguous();
  const at::Tensor db = mean_b.sub(mean_b_prev.to(at::kDouble).reshape({nb})).contiguous();

  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(ceil_div(nb, threads)),
                  static_cast<unsigned>(std::min<int64_t>(na, kMaxGridY)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (wide) {
    _cross_moments_epilogue_kernel<double><<<grid, threads, 0, stream>>>(
        comoment.data_ptr<double>(), G.data_ptr<double>(), da.data_ptr<double>(),
        db.data_ptr<double>(), coef, na, nb);
  } else {
    _cross_moments_epilogue_kernel<float><<<grid, threads, 0, stream>>>(
        comoment.data_ptr<double>(), G.data_ptr<float>(), da.data_ptr<double>(),
        db.data_ptr<double>(), coef, na, nb);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean_a, m2_a, mean_b, m2_b};
}

}  // namespace

std::vector<at::Tensor> cross_moments_update_cuda(at::Tensor& comoment, int64_t n_prev,
                                                  const at::Tensor& mean_a_prev,
                                                  const at::Tensor& mean_b_prev,
                                                  const at::Tensor& xa, const at::Tensor& xb,
                                                  bool bf16_dot) {
  return cross_update(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, bf16_dot, false);
}

std::vector<at::Tensor> cross_moments_update_cuda_sum_means(at::Tensor& comoment, int64_t n_prev,
                                                            const at::Tensor& mean_a_prev,
                                                            const at::Tensor& mean_b_prev,
                                                            const at::Tensor& xa, const at::Tensor& xb,
                                                            bool bf16_dot) {
  return cross_update(comoment, n_prev, mean_a_prev, mean_b_prev, xa, xb, bf16_dot, true);
}

}  // namespace supanalysis
