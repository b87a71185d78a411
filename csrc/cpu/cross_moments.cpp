// Streaming cross-moment update on the CPU: comoment += C_batch + Chan's correction.
//
// The batch is centred about its own float64 means before the product, so the GEMM sees
// values of the data's own spread rather than its offset (a large common offset is what
// ruins E[xy] - E[x]E[y]). The product runs through ATen's BLAS in the input's precision
// class (float32 for fp16/bf16/fp32, float64 for fp64); the merge into the float64 state,
// C += G + (n_prev * T / (n_prev + T)) * da db^T, is one fused pass over the state.
#include <ATen/Parallel.h>

#include <ATen/ATen.h>

#include "ops.h"

namespace supanalysis {

std::vector<at::Tensor> cross_moments_update_cpu(at::Tensor& comoment, int64_t n_prev,
                                                 const at::Tensor& mean_a_prev,
                                                 const at::Tensor& mean_b_prev,
                                                 const at::Tensor& xa, const at::Tensor& xb) {
  TORCH_CHECK(xa.device().is_cpu() && xb.device().is_cpu() && comoment.device().is_cpu(),
              "xa, xb and comoment must be CPU tensors");
  TORCH_CHECK(xa.dim() == 2 && xb.dim() == 2 && xa.size(0) == xb.size(0),
              "xa and xb must be [tokens, features] over the same tokens");
  const int64_t T = xa.size(0), na = xa.size(1), nb = xb.size(1);
  TORCH_CHECK(comoment.scalar_type() == at::kDouble && comoment.is_contiguous() &&
                  comoment.size(0) == na && comoment.size(1) == nb,
              "comoment must be a contiguous float64 [n_a, n_b] tensor");
  const auto compute =
      (xa.scalar_type() == at::kDouble || xb.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  const at::Tensor a64 = xa.to(at::kDouble), b64 = xb.to(at::kDouble);
  at::Tensor mean_a = T > 0 ? a64.mean(0) : at::zeros({na}, a64.options());
  at::Tensor mean_b = T > 0 ? b64.mean(0) : at::zeros({nb}, b64.options());
  const at::Tensor ca64 = a64 - mean_a, cb64 = b64 - mean_b;
  at::Tensor m2_a = ca64.pow(2).sum(0), m2_b = cb64.pow(2).sum(0);
  if (T == 0) return {mean_a, m2_a, mean_b, m2_b};

  const at::Tensor ca = ca64.to(compute), cb = cb64.to(compute);
  const at::Tensor G = at::mm(ca.t(), cb).to(at::kDouble).contiguous();
  const double coef = static_cast<double>(n_prev) * static_cast<double>(T) /
                      static_cast<double>(n_prev + T);
  const at::Tensor da = (mean_a - mean_a_prev.to(at::kDouble)).contiguous();
  const at::Tensor db = (mean_b - mean_b_prev.to(at::kDouble)).contiguous();
  const double* g = G.data_ptr<double>();
  const double* dap = da.data_ptr<double>();
  const double* dbp = db.data_ptr<double>();
  double* c = comoment.data_ptr<double>();
  at::parallel_for(0, na, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double s = coef * dap[i];
      double* ci = c + i * nb;
      const double* gi = g + i * nb;
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) ci[j] += gi[j] + s * dbp[j];
    }
  });
  return {mean_a, m2_a, mean_b, m2_b};
}

}  // namespace supanalysis
