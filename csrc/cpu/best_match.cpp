// Best match per feature from the float64 co-moment, in one read of the state.
//
// corr_ij = C_ij * inv_std_a_i * inv_std_b_j, where a constant feature carries inv_std 0:
// its correlations are 0 and it never becomes anyone's match (its own match is -1).
// Row maxima are owned by the thread that owns the row; column maxima are kept per thread
// and merged in thread order, preferring the smaller row index on ties, so the answer is
// the first maximum in index order whatever the thread count. The sweep is blocked by
// columns so each block's column state stays in L2, and the hot loop is branch-free. Rows go
// four at a time, so the column state is loaded and stored once per four rows (one row at a
// time, its loads and stores outnumber the reads of C). A row's argmax is found afterwards,
// only when its block maximum beats its running one, by recomputing the same expression.
// Constant features cost nothing in the hot loop: constant rows are left out of the sweep,
// and a constant column's upper clamp is -inf instead of 1, so it never wins a maximum.
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
namespace {

constexpr double kNone = -std::numeric_limits<double>::infinity();
// Columns per block: 4 arrays x 8,192 x 8 B = 256 KiB of column state, half a core's L2 on
// the machines we measured. Wide blocks make each row segment a long sequential read that
// the hardware prefetcher follows: at n_b = 4,096, 512-column blocks (4 KiB segments, with
// software prefetch) ran at 53% of one read of C, whole rows at 70%.
constexpr int64_t kColBlock = 8192;

// The correlation as every pass computes it (bit for bit the same, so a rescan finds the
// maximum by equality): c * si * pb_j clamped to [-1, hi_j], hi_j = 1 for a live column and
// -inf for a constant one.
static inline __attribute__((always_inline)) double corr_at(double c, double si, double pb, double hi) {
  return std::min(std::max(c * si * pb, -1.0), hi);
}

// Four live rows (indices r[0] < ... < r[3]) against one column block: column maxima (strict
// >, rows in order, so the earliest row keeps a tie) and each row's maximum. Built for AVX2
// and for the baseline ISA; the loader picks the one the CPU supports (the wheel stays
// portable).
SUPANALYSIS_TARGET_CLONES
void rows4_pass(const double* c0, const double* c1, const double* c2, const double* c3, const double* s,
                const int64_t* r, const double* pb, const double* hi, int64_t nb, double* cm, int64_t* ca,
                double* best) {
  double b0 = kNone, b1 = kNone, b2 = kNone, b3 = kNone;
  const int64_t r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
#pragma omp simd reduction(max : b0, b1, b2, b3)
  for (int64_t j = 0; j < nb; ++j) {
    const double v0 = corr_at(c0[j], s[0], pb[j], hi[j]);
    const double v1 = corr_at(c1[j], s[1], pb[j], hi[j]);
    const double v2 = corr_at(c2[j], s[2], pb[j], hi[j]);
    const double v3 = corr_at(c3[j], s[3], pb[j], hi[j]);
    double m = cm[j];
    int64_t a = ca[j];
    const bool u0 = v0 > m;
    m = u0 ? v0 : m;
    a = u0 ? r0 : a;
    const bool u1 = v1 > m;
    m = u1 ? v1 : m;
    a = u1 ? r1 : a;
    const bool u2 = v2 > m;
    m = u2 ? v2 : m;
    a = u2 ? r2 : a;
    const bool u3 = v3 > m;
    m = u3 ? v3 : m;
    a = u3 ? r3 : a;
    cm[j] = m;
    ca[j] = a;
    b0 = std::max(b0, v0);
    b1 = std::max(b1, v1);
    b2 = std::max(b2, v2);
    b3 = std::max(b3, v3);
  }
  best[0] = b0, best[1] = b1, best[2] = b2, best[3] = b3;
}

// One row (the last rows of a thread's range): the same, for a single row.
SUPANALYSIS_TARGET_CLONES
double row_pass(const double* ci, double si, const double* pb, const double* hi, int64_t nb, int64_t i, double* cm,
                int64_t* ca) {
  double best = kNone;
#pragma omp simd reduction(max : best)
  for (int64_t j = 0; j < nb; ++j) {
    const double v = corr_at(ci[j], si, pb[j], hi[j]);
    const bool up = v > cm[j];
    cm[j] = up ? v : cm[j];
    ca[j] = up ? i : ca[j];
    best = std::max(best, v);
  }
  return best;
}

}  // namespace

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

#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Upper clamp per column: 1 for a live column, -inf for a constant one, which removes it
  // from every maximum without a branch (or an extra operation) in the hot loop.
  std::vector<double> hi_v(static_cast<size_t>(nb));
  for (int64_t j = 0; j < nb; ++j) hi_v[j] = pb[j] == 0.0 ? kNone : 1.0;
  const double* hi = hi_v.data();
  // The live rows in order; a constant row is nobody's match and keeps (0, -1).
  std::vector<int64_t> live;
  live.reserve(static_cast<size_t>(na));
  for (int64_t i = 0; i < na; ++i) {
    ma[i] = 0.0;
    if (pa[i] != 0.0) live.push_back(i);
  }
  const int64_t nl = static_cast<int64_t>(live.size());
  std::vector<double> colmax(static_cast<size_t>(threads) * nb, kNone);
  std::vector<int64_t> colarg(static_cast<size_t>(threads) * nb, -1);
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    // Split over the team the runtime gave (it may be smaller than asked for); the column
    // state of threads that did not run stays empty and loses every comparison below.
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t tid = 0, team = 1;
#endif
    const int64_t rows_per = (nl + team - 1) / team;
    double* cm = colmax.data() + tid * nb;
    int64_t* ca = colarg.data() + tid * nb;
    // Threads own increasing ranges of the live rows (positions into `live`).
    const int64_t l_begin = std::min(nl, tid * rows_per), l_end = std::min(nl, l_begin + rows_per);
    for (int64_t l = l_begin; l < l_end; ++l) ma[live[l]] = kNone;
    // A row's block maximum that beats its running maximum: find its first column.
    auto take = [&](int64_t i, int64_t j0, int64_t w, double best) {
      if (!(best > ma[i])) return;  // strict: an earlier block keeps a tie
      const double* ci = c + i * nb + j0;
      for (int64_t j = 0; j < w; ++j)
        if (corr_at(ci[j], pa[i], pb[j0 + j], hi[j0 + j]) == best) {
          ma[i] = best;
          aa[i] = j0 + j;
          return;
        }
    };
    // Column blocks outermost: the block's column state (maxima, arguments, inv_std, clamp)
    // stays in L2 while the rows stream past; each row keeps its running maximum.
    for (int64_t j0 = 0; j0 < nb; j0 += kColBlock) {
      const int64_t w = std::min(kColBlock, nb - j0);
      int64_t l = l_begin;
      for (; l + 4 <= l_end; l += 4) {
        const int64_t* r = live.data() + l;
        const double s[4] = {pa[r[0]], pa[r[1]], pa[r[2]], pa[r[3]]};
        double best[4];
        rows4_pass(c + r[0] * nb + j0, c + r[1] * nb + j0, c + r[2] * nb + j0, c + r[3] * nb + j0, s, r, pb + j0,
                   hi + j0, w, cm + j0, ca + j0, best);
        for (int k = 0; k < 4; ++k) take(r[k], j0, w, best[k]);
      }
      for (; l < l_end; ++l) {
        const int64_t i = live[l];
        take(i, j0, w, row_pass(c + i * nb + j0, pa[i], pb + j0, hi + j0, w, i, cm + j0, ca + j0));
      }
    }
    for (int64_t l = l_begin; l < l_end; ++l)
      if (aa[live[l]] < 0) ma[live[l]] = 0.0;  // no live column
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
