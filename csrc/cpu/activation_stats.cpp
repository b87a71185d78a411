// Fused activation statistics on the CPU: one read of x, every per-feature moment.
//
// Work split: features are cut into chunks of kChunk columns and chunks are spread over
// OpenMP threads, so each thread owns its features' results outright (no merge, no
// atomics) and the result does not depend on the thread count. Within a chunk, tokens go
// in tiles of kTile rows: the tile is small enough (kTile x kChunk x 4 B = 64 KiB) to stay
// in L2 for the second, centred pass that gives the tile's M2, and the tile's (count,
// mean, M2) is merged into the float64 state with Chan's formula. Accumulating a tile in
// float32 and merging tiles in float64 keeps the inner loop vectorisable without the
// cancellation of raw sums over many tokens.
//
// Per-token L0 needs a sum across chunks: each thread counts into its own int32 row of a
// [threads, T] buffer and the rows are added at the end (integers, so exact).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace supanalysis {
namespace {

constexpr int64_t kChunk = 128;  // features per work item (one cache-friendly row segment)
constexpr int64_t kTile = 128;   // tokens per float32 tile

template <typename acc_t>
inline bool is_finite(acc_t v) {
  // |v| <= max is false for NaN and +-Inf, and compiles to a vectorisable compare.
  return std::abs(v) <= std::numeric_limits<acc_t>::max();
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
void stats_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t n, int64_t row_stride,
                  double threshold, int64_t* finite_count, int64_t* fire_count, double* mean,
                  double* m2, double* vmax, double* vmin, double* active_sum,
                  int32_t* l0_partial /* [threads, T] */) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const acc_t thr = static_cast<acc_t>(threshold);
#pragma omp parallel
  {
#ifdef _OPENMP
    int32_t* l0 = l0_partial + static_cast<int64_t>(omp_get_thread_num()) * T;
#else
    int32_t* l0 = l0_partial;
#endif
    acc_t t_sum[kChunk], t_m2[kChunk], t_max[kChunk], t_min[kChunk], t_act[kChunk];
    int32_t t_cnt[kChunk], t_fire[kChunk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t f0 = c * kChunk;
      const int64_t w = std::min(kChunk, n - f0);
      for (int64_t j = 0; j < w; ++j) {
        finite_count[f0 + j] = 0;
        fire_count[f0 + j] = 0;
        mean[f0 + j] = 0.0;
        m2[f0 + j] = 0.0;
        vmax[f0 + j] = -std::numeric_limits<double>::infinity();
        vmin[f0 + j] = std::numeric_limits<double>::infinity();
        active_sum[f0 + j] = 0.0;
      }
      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t rows = std::min(kTile, T - t0);
        for (int64_t j = 0; j < w; ++j) {
          t_sum[j] = 0;
          t_m2[j] = 0;
          t_act[j] = 0;
          t_max[j] = -std::numeric_limits<acc_t>::infinity();
          t_min[j] = std::numeric_limits<acc_t>::infinity();
          t_cnt[j] = 0;
          t_fire[j] = 0;
        }
        // Pass 1 (the only read from memory): counts, sums, extrema, firing.
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = x + (t0 + r) * row_stride + f0;
          int32_t fired_here = 0;
#pragma omp simd reduction(+ : fired_here)
          for (int64_t j = 0; j < w; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            const bool fin = is_finite(v);
            const acc_t vf = fin ? v : acc_t(0);
            const bool fire = fin && (v > thr);
            t_cnt[j] += fin;
            t_sum[j] += vf;
            t_max[j] = fin ? std::max(t_max[j], v) : t_max[j];
            t_min[j] = fin ? std::min(t_min[j], v) : t_min[j];
            t_fire[j] += fire;
            t_act[j] += fire ? v : acc_t(0);
            fired_here += fire;
          }
          l0[t0 + r] += fired_here;
        }
        // Pass 2 (from cache): M2 about the tile's own mean.
        acc_t t_mean[kChunk];
        for (int64_t j = 0; j < w; ++j) t_mean[j] = t_cnt[j] ? t_sum[j] / t_cnt[j] : acc_t(0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* row = x + (t0 + r) * row_stride + f0;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            const acc_t d = is_finite(v) ? v - t_mean[j] : acc_t(0);
            t_m2[j] += d * d;
          }
        }
        // Chan merge of the tile into the float64 state.
        for (int64_t j = 0; j < w; ++j) {
          const int64_t f = f0 + j;
          const int64_t nb = t_cnt[j];
          if (nb > 0) {
            const int64_t na = finite_count[f];
            const double nab = static_cast<double>(na + nb);
            const double mb = static_cast<double>(t_mean[j]);
            const double delta = mb - mean[f];
            mean[f] += delta * (static_cast<double>(nb) / nab);
            m2[f] += static_cast<double>(t_m2[j]) +
                     delta * delta * (static_cast<double>(na) * static_cast<double>(nb) / nab);
            finite_count[f] = na + nb;
            vmax[f] = std::max(vmax[f], static_cast<double>(t_max[j]));
            vmin[f] = std::min(vmin[f], static_cast<double>(t_min[j]));
          }
          fire_count[f] += t_fire[j];
          active_sum[f] += static_cast<double>(t_act[j]);
        }
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> activation_stats_cpu(const at::Tensor& x_in, double threshold) {
  TORCH_CHECK(x_in.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, features], got ", x_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be floating point, got ",
              x_in.scalar_type());
  // Rows may be strided (a slice of a wider activation); features must be contiguous.
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  auto f64 = x.options().dtype(at::kDouble);
  auto i64 = x.options().dtype(at::kLong);
  at::Tensor finite_count = at::zeros({n}, i64), fire_count = at::zeros({n}, i64);
  at::Tensor mean = at::zeros({n}, f64), m2 = at::zeros({n}, f64);
  at::Tensor vmax = at::full({n}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor vmin = at::full({n}, std::numeric_limits<double>::infinity(), f64);
  at::Tensor active_sum = at::zeros({n}, f64);
#ifdef _OPENMP
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  at::Tensor l0_partial = at::zeros({threads, T}, x.options().dtype(at::kInt));
  if (T > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_stats_cpu", [&] {
      stats_kernel<scalar_t>(x.data_ptr<scalar_t>(), T, n, x.stride(0), threshold,
                             finite_count.data_ptr<int64_t>(), fire_count.data_ptr<int64_t>(),
                             mean.data_ptr<double>(), m2.data_ptr<double>(),
                             vmax.data_ptr<double>(), vmin.data_ptr<double>(),
                             active_sum.data_ptr<double>(), l0_partial.data_ptr<int32_t>());
    });
  }
  at::Tensor l0 = l0_partial.sum(0, /*keepdim=*/false, at::kLong);
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

// Sparse codes: every (token, feature) pair not listed is an implicit 0. Tokens are split
// over threads, each with private per-feature accumulators (no atomics, so frequent
// features cause no contention), merged in thread order. Two passes over the codes (which
// are small: T*k, not T*n): the first gives the mean, the second the centred M2, to which
// the implicit zeros add (count_zero * mean^2) in closed form.
std::vector<at::Tensor> activation_stats_sparse_cpu(const at::Tensor& indices_in,
                                                    const at::Tensor& values_in, int64_t n,
                                                    double threshold) {
  TORCH_CHECK(indices_in.device().is_cpu() && values_in.device().is_cpu(),
              "indices and values must be CPU tensors");
  TORCH_CHECK(indices_in.dim() == 2 && values_in.dim() == 2 && indices_in.sizes() == values_in.sizes(),
              "indices and values must both be [tokens, k] with the same shape");
  TORCH_CHECK(n >= 0, "n must be non-negative");
  const at::Tensor idx = indices_in.to(at::kLong).contiguous();
  const at::Tensor val = values_in.to(at::kDouble).contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const double* vp = val.data_ptr<double>();
  for (int64_t e = 0; e < T * k; ++e)
    TORCH_CHECK(ip[e] >= -1 && ip[e] < n, "indices must be in [-1, n), found ", ip[e]);

#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Private accumulators: present (finite listed entries), nonfinite, sum, fire, act, max, min.
  std::vector<int64_t> present(threads * n, 0), nonfin(threads * n, 0), fire(threads * n, 0);
  std::vector<double> sum(threads * n, 0.0), act(threads * n, 0.0);
  std::vector<double> mx(threads * n, -INFINITY), mn(threads * n, INFINITY);
  at::Tensor l0 = at::zeros({T}, idx.options());
  int64_t* l0p = l0.data_ptr<int64_t>();
  const bool zero_fires = 0.0 > threshold;

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    int64_t* P = present.data() + tid * n;
    int64_t* NF = nonfin.data() + tid * n;
    int64_t* F = fire.data() + tid * n;
    double* S = sum.data() + tid * n;
    double* A = act.data() + tid * n;
    double* MX = mx.data() + tid * n;
    double* MN = mn.data() + tid * n;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      int64_t listed = 0, fired = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = ip[t * k + j];
        if (f < 0) continue;
        ++listed;
        const double v = vp[t * k + j];
        if (!std::isfinite(v)) {
          ++NF[f];
          continue;
        }
        ++P[f];
        S[f] += v;
        MX[f] = std::max(MX[f], v);
        MN[f] = std::min(MN[f], v);
        if (v > threshold) {
          ++F[f];
          A[f] += v;
          ++fired;
        }
      }
      l0p[t] = fired + (zero_fires ? n - listed : 0);
    }
  }
  auto f64 = idx.options().dtype(at::kDouble);
  at::Tensor finite_count = at::empty({n}, idx.options()), fire_count = at::empty({n}, idx.options());
  at::Tensor mean = at::empty({n}, f64), m2 = at::zeros({n}, f64), vmax = at::empty({n}, f64),
             vmin = at::empty({n}, f64), active_sum = at::empty({n}, f64);
  int64_t* fc = finite_count.data_ptr<int64_t>();
  int64_t* fi = fire_count.data_ptr<int64_t>();
  double *me = mean.data_ptr<double>(), *m2p = m2.data_ptr<double>(), *mxp = vmax.data_ptr<double>(),
         *mnp = vmin.data_ptr<double>(), *ac = active_sum.data_ptr<double>();
  std::vector<int64_t> listed_finite(n);
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f) {
      int64_t p = 0, nf = 0, fr = 0;
      double s = 0, a = 0, hi = -INFINITY, lo = INFINITY;
      for (int th = 0; th < threads; ++th) {
        const int64_t o = th * n + f;
        p += present[o];
        nf += nonfin[o];
        fr += fire[o];
        s += sum[o];
        a += act[o];
        hi = std::max(hi, mx[o]);
        lo = std::min(lo, mn[o]);
      }
      const int64_t zeros = T - p - nf;  // implicit (unlisted) zeros
      listed_finite[f] = p;
      fc[f] = T - nf;
      fi[f] = fr + (zero_fires ? zeros : 0);
      me[f] = fc[f] > 0 ? s / static_cast<double>(fc[f]) : 0.0;
      ac[f] = a;
      if (zeros > 0) {
        hi = std::max(hi, 0.0);
        lo = std::min(lo, 0.0);
      }
      mxp[f] = hi;
      mnp[f] = lo;
      m2p[f] = static_cast<double>(zeros) * me[f] * me[f];
    }
  });
  // Second pass: centred squares of the listed finite entries. Serial over tokens keeps
  // the float64 sum order fixed; the codes are T*k values, cheap next to the dense path.
  for (int64_t e = 0; e < T * k; ++e) {
    const int64_t f = ip[e];
    if (f < 0) continue;
    const double v = vp[e];
    if (!std::isfinite(v)) continue;
    const double d = v - me[f];
    m2p[f] += d * d;
  }
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

}  // namespace supanalysis
