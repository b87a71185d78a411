// Streaming cross-moment update on the CPU: comoment += C_batch + Chan's correction.
//
// The batch is centred about its own float64 means before the product, so the GEMM sees
// values of the data's own spread rather than its offset (a large common offset is what
// ruins E[xy] - E[x]E[y]). Centring is one fused pass per input after a column-sum pass:
// it writes the centred copy in the GEMM's precision (float32 for fp16/bf16/fp32,
// float64 for fp64) and accumulates the batch's M2 in float64 on the way, so the inputs
// are read twice and written once in total. The product runs through ATen's BLAS; the
// merge C += G + (n_prev * T / (n_prev + T)) * da db^T reads G in its own precision, one
// fused pass over the float64 state. Opt-in bf16 (precision "bf16"): each centred float32
// value is rounded to the nearest bfloat16 as it is written, so the float32 GEMM multiplies
// exactly the values the GPU's tensor cores multiply (products of two bfloat16 values are
// exact in float32): the same numbers on every backend, no faster here.
#include <ATen/Parallel.h>

#include <ATen/ATen.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace supanalysis {
namespace {

// Both passes stream whole rows (contiguous memory). Rows are cut into a few tasks per
// thread; every task keeps n-wide float64 partial sums, added up in task order afterwards
// (deterministic for a given thread count; memory 4 * threads * n doubles).
constexpr int64_t kMinRows = 64;

inline double widen(double v) { return v; }
inline double widen(float v) { return v; }
inline double widen(c10::Half v) { return static_cast<float>(v); }
inline double widen(c10::BFloat16 v) { return static_cast<float>(v); }

// Sum over tasks of per-task n-wide partials produced by body(t0, t1, acc).
template <typename F>
void reduce_rows(int64_t T, int64_t n, double* out, F body) {
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), (T + kMinRows - 1) / kMinRows));
  const int64_t rows = (T + tasks - 1) / tasks;
  std::vector<double> partial(static_cast<size_t>(tasks * n), 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      body(std::min(T, k * rows), std::min(T, (k + 1) * rows), partial.data() + k * n);
  });
  std::fill(out, out + n, 0.0);
  for (int64_t k = 0; k < tasks; ++k) {
    const double* p = partial.data() + k * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += p[j];
  }
}

// The nearest bfloat16 of a finite float (ties to even), as a float: c10::BFloat16's
// rounding, written with plain integer arithmetic so the centring loop stays vectorised.
inline float round_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// x [T, n] contiguous -> centred copy [T, n] in out_t, batch mean [n] and M2 [n] (float64).
// kRound: the copy holds bfloat16-rounded values (out_t float).
template <typename in_t, typename out_t, bool kRound = false>
void center_columns(const in_t* x, int64_t T, int64_t n, out_t* out, double* mean, double* m2) {
  reduce_rows(T, n, mean, [&](int64_t t0, int64_t t1, double* acc) {
    for (int64_t t = t0; t < t1; ++t) {
      const in_t* row = x + t * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += widen(row[j]);
    }
  });
  for (int64_t j = 0; j < n; ++j) mean[j] /= static_cast<double>(T);
  reduce_rows(T, n, m2, [&](int64_t t0, int64_t t1, double* acc) {
    for (int64_t t = t0; t < t1; ++t) {
      const in_t* row = x + t * n;
      out_t* orow = out + t * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const double v = widen(row[j]) - mean[j];
        if constexpr (kRound)
          orow[j] = round_to_bf16(static_cast<float>(v));
        else
          orow[j] = static_cast<out_t>(v);
        acc[j] += v * v;
      }
    }
  });
}

// Centre x into a new tensor of dtype `compute`; fill mean and m2 (float64, [n]).
// bf16: round the (float32) centred values to bfloat16.
at::Tensor centered(const at::Tensor& x_in, at::ScalarType compute, at::Tensor& mean, at::Tensor& m2, bool bf16) {
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({T, n}, x.options().dtype(compute));
  double* mu = mean.data_ptr<double>();
  double* s2 = m2.data_ptr<double>();
  if (compute == at::kDouble) {
    // A float64 product: the other side may be narrower, so widen it first.
    const at::Tensor x64 = x.to(at::kDouble);
    center_columns<double, double>(x64.data_ptr<double>(), T, n, out.data_ptr<double>(), mu, s2);
    return out;
  }
  float* o = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using in_t = decltype(tag);
    if (bf16)
      center_columns<in_t, float, true>(x.data_ptr<in_t>(), T, n, o, mu, s2);
    else
      center_columns<in_t, float>(x.data_ptr<in_t>(), T, n, o, mu, s2);
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "cross_moments_update: unsupported dtype ", x.scalar_type());
  }
  return out;
}

template <typename g_t>
void merge_into(double* c, const g_t* g, const double* da, const double* db, double coef,
                int64_t na, int64_t nb) {
  at::parallel_for(0, na, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double s = coef * da[i];
      double* ci = c + i * nb;
      const g_t* gi = g + i * nb;
#pragma omp simd
      for (int64_t j = 0; j < nb; ++j) ci[j] += static_cast<double>(gi[j]) + s * db[j];
    }
  });
}

}  // namespace

std::vector<at::Tensor> cross_moments_update_cpu(at::Tensor& comoment, int64_t n_prev,
                                                 const at::Tensor& mean_a_prev,
                                                 const at::Tensor& mean_b_prev,
                                                 const at::Tensor& xa, const at::Tensor& xb, bool bf16) {
  TORCH_CHECK(xa.device().is_cpu() && xb.device().is_cpu() && comoment.device().is_cpu(),
              "xa, xb and comoment must be CPU tensors");
  TORCH_CHECK(xa.dim() == 2 && xb.dim() == 2 && xa.size(0) == xb.size(0),
              "xa and xb must be [tokens, features] over the same tokens");
  const int64_t T = xa.size(0), na = xa.size(1), nb = xb.size(1);
  TORCH_CHECK(comoment.scalar_type() == at::kDouble && comoment.is_contiguous() &&
                  comoment.size(0) == na && comoment.size(1) == nb,
              "comoment must be a contiguous float64 [n_a, n_b] tensor");
  const auto f64 = xa.options().dtype(at::kDouble);
  at::Tensor mean_a = at::zeros({na}, f64), m2_a = at::zeros({na}, f64);
  at::Tensor mean_b = at::zeros({nb}, f64), m2_b = at::zeros({nb}, f64);
  if (T == 0) return {mean_a, m2_a, mean_b, m2_b};

  const auto compute =
      (xa.scalar_type() == at::kDouble || xb.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  TORCH_CHECK(!(bf16 && compute == at::kDouble),
              "precision 'bf16' takes 16/32-bit batches; float64 ones are multiplied in float64");
  const at::Tensor ca = centered(xa, compute, mean_a, m2_a, bf16);
  const at::Tensor cb = centered(xb, compute, mean_b, m2_b, bf16);
  const at::Tensor G = at::mm(ca.t(), cb).contiguous();
  const double coef = static_cast<double>(n_prev) * static_cast<double>(T) /
                      static_cast<double>(n_prev + T);
  const at::Tensor da = (mean_a - mean_a_prev.to(at::kDouble)).contiguous();
  const at::Tensor db = (mean_b - mean_b_prev.to(at::kDouble)).contiguous();
  double* c = comoment.data_ptr<double>();
  if (compute == at::kDouble)
    merge_into(c, G.data_ptr<double>(), da.data_ptr<double>(), db.data_ptr<double>(), coef, na, nb);
  else
    merge_into(c, G.data_ptr<float>(), da.data_ptr<double>(), db.data_ptr<double>(), coef, na, nb);
  return {mean_a, m2_a, mean_b, m2_b};
}

}  // namespace supanalysis
