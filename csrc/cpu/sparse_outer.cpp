// Sparse outer-product accumulation on the CPU: out[ia[t,p], ib[t,q]] += va[t,p] * vb[t,q].
//
// The raw cross-product of two models' top-k codes (k_a * k_b pairs per token, float64
// products of the inputs' values). The A entries are first bucketed by their row (a stable
// counting sort, so each row keeps its token order), then threads own disjoint row ranges of
// `out`: a row takes all of its updates while it sits in cache, no two threads ever touch one
// element, and no atomics are needed. Because the sort is stable, every element receives its
// contributions in the same order as a plain token-by-token loop, so results are bitwise
// those of the reference accumulation.
#include <ATen/Parallel.h>

#include <ATen/ATen.h>

#include <vector>

#include "ops.h"

namespace supanalysis {

void sparse_outer_update_cpu(at::Tensor& out, const at::Tensor& ia_in, const at::Tensor& va_in,
                             const at::Tensor& ib_in, const at::Tensor& vb_in) {
  TORCH_CHECK(out.device().is_cpu() && ia_in.device().is_cpu() && ib_in.device().is_cpu(),
              "out and the codes must be CPU tensors");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 2,
              "out must be a contiguous float64 [n_a, n_b] tensor");
  TORCH_CHECK(ia_in.dim() == 2 && va_in.sizes() == ia_in.sizes() && ib_in.dim() == 2 &&
                  vb_in.sizes() == ib_in.sizes() && ia_in.size(0) == ib_in.size(0),
              "codes must be [T, k_a] (indices, values) and [T, k_b] over the same tokens");
  const int64_t na = out.size(0), nb = out.size(1);
  const at::Tensor ia = ia_in.to(at::kLong).contiguous(), ib = ib_in.to(at::kLong).contiguous();
  const at::Tensor va = va_in.to(at::kDouble).contiguous(), vb = vb_in.to(at::kDouble).contiguous();
  const int64_t T = ia.size(0), ka = ia.size(1), kb = ib.size(1);
  const int64_t* pa = ia.data_ptr<int64_t>();
  const int64_t* pb = ib.data_ptr<int64_t>();
  for (int64_t e = 0; e < T * ka; ++e)
    TORCH_CHECK(pa[e] >= -1 && pa[e] < na, "indices_a must be in [-1, n_a), found ", pa[e]);
  for (int64_t e = 0; e < T * kb; ++e)
    TORCH_CHECK(pb[e] >= -1 && pb[e] < nb, "indices_b must be in [-1, n_b), found ", pb[e]);
  const double* xa = va.data_ptr<double>();
  const double* xb = vb.data_ptr<double>();
  double* c = out.data_ptr<double>();
  // Bucket the A entries by row: row_start[a]..row_start[a + 1] indexes `entries`, which holds
  // flat positions t * ka + p in increasing order within each row (padding -1 is dropped).
  std::vector<int64_t> row_start(na + 1, 0);
  for (int64_t e = 0; e < T * ka; ++e)
    if (pa[e] >= 0) ++row_start[pa[e] + 1];
  for (int64_t a = 0; a < na; ++a) row_start[a + 1] += row_start[a];
  std::vector<int64_t> entries(row_start[na]);
  {
    std::vector<int64_t> fill(row_start.begin(), row_start.end() - 1);
    for (int64_t e = 0; e < T * ka; ++e)
      if (pa[e] >= 0) entries[fill[pa[e]]++] = e;
  }
  at::parallel_for(0, na, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t a = r0; a < r1; ++a) {
      double* ca = c + a * nb;
      for (int64_t j = row_start[a]; j < row_start[a + 1]; ++j) {
        const int64_t e = entries[j];
        const int64_t t = e / ka;
        const double v = xa[e];
        const int64_t* rb = pb + t * kb;
        const double* vbt = xb + t * kb;
        for (int64_t q = 0; q < kb; ++q)
          if (rb[q] >= 0) ca[rb[q]] += v * vbt[q];
      }
    }
  });
}

}  // namespace supanalysis
