// Best match per feature from the float64 co-moment, in one read of the state.
//
// corr_ij = C_ij * inv_std_a_i * inv_std_b_j, where a constant feature carries inv_std 0:
// its correlations are 0 and it never becomes anyone's match (its own match is -1).
// Row maxima are owned by the thread that owns the row; column maxima are kept per thread
// and merged in thread order, preferring the smaller row index on ties, so the answer is
// the first maximum in index order whatever the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace supanalysis {

std::vector<at::Tensor> best_match_cpu(const at::Tensor& comoment, const at::Tensor& inv_std_a,
                                       const at::Tensor& inv_std_b) {
  TORCH_CHECK(comoment.device().is_cpu(), "comoment must be a CPU tensor");
  TORCH_CHECK(comoment.dim() == 2 && comoment.scalar_type() == at::kDouble,
              "comoment must be float64 [n_a, n_b]");
  const int64_t na = comoment.size(0), nb = comoment.size(1);
  TORCH_CHECK(inv_std_a.numel() == na && inv_std_b.numel() == nb,
              "inv_std_a / inv_std_b must have n_a / n_b entries");
  const at::Tensor C = comoment.contiguous();
  const at::Tensor ia = inv_std_a.to(at::kDouble).contiguous(), ib = inv_std_b.to(at::kDouble).contiguous();
  const double* c = C.data_ptr<double>();
  const double* pa = ia.data_ptr<double>();
  const double* pb = ib.data_ptr<double>();
  auto f64 = C.options();
  auto i64 = C.options().dtype(at::kLong);
  at::Tensor max_a = at::zeros({na}, f64), max_b = at::zeros({nb}, f64);
  at::Tensor arg_a = at::full({na}, -1, i64), arg_b = at::full({nb}, -1, i64);
  double* ma = max_a.data_ptr<double>();
  int64_t* aa = arg_a.data_ptr<int64_t>();
  constexpr double kNone = -std::numeric_limits<double>::infinity();

#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  std::vector<double> colmax(static_cast<size_t>(threads) * nb, kNone);
  std::vector<int64_t> colarg(static_cast<size_t>(threads) * nb, -1);
  const int64_t rows_per = (na + threads - 1) / std::max(threads, 1);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    double* cm = colmax.data() + tid * nb;
    int64_t* ca = colarg.data() + tid * nb;
    const int64_t r_begin = std::min(na, tid * rows_per), r_end = std::min(na, r_begin + rows_per);
    for (int64_t i = r_begin; i < r_end; ++i) {
      const double si = pa[i];
      if (si == 0.0) {
        ma[i] = 0.0;
        aa[i] = -1;
        continue;
      }
      const double* ci = c + i * nb;
      double best = kNone;
      int64_t arg = -1;
      for (int64_t j = 0; j < nb; ++j) {
        if (pb[j] == 0.0) continue;
        const double r = std::clamp(ci[j] * si * pb[j], -1.0, 1.0);
        if (r > best) {
          best = r;
          arg = j;
        }
        if (r > cm[j]) {
          cm[j] = r;
          ca[j] = i;
        }
      }
      ma[i] = arg >= 0 ? best : 0.0;
      aa[i] = arg;
    }
  }
  double* mb = max_b.data_ptr<double>();
  int64_t* ab = arg_b.data_ptr<int64_t>();
  for (int64_t j = 0; j < nb; ++j) {
    double best = kNone;
    int64_t arg = -1;
    if (pb[j] != 0.0) {
      // Threads own increasing row ranges, so a strict > keeps the smallest row on ties.
      for (int t = 0; t < threads; ++t) {
        const double v = colmax[static_cast<size_t>(t) * nb + j];
        if (v > best) {
          best = v;
          arg = colarg[static_cast<size_t>(t) * nb + j];
        }
      }
    }
    mb[j] = arg >= 0 ? best : 0.0;
    ab[j] = arg;
  }
  return {max_a, arg_a, max_b, arg_b};
}

}  // namespace supanalysis
