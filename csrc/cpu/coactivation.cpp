// Co-activation counts on the CPU.
//
// Dense activations: binarise (finite and above threshold) into a 0/1 matrix B and form
// B^T B with a GEMM, exact either way: on CPUs with int8 dot-product instructions (AVX512-VNNI,
// AVX-VNNI, AMX) as an int8 GEMM with int32 accumulation (at::_int_mm, tokens in chunks of
// 2^30 rows), elsewhere as a float32 GEMM (every partial count an integer below 2^24, so
// tokens go in chunks of 2^24 rows). Without those instructions at::_int_mm falls back to a
// loop: on the AMD EPYC CI machine (AVX2 only) it ran 78x slower than the float32 GEMM at
// 2048 x 1024, and the benchmark's T = 8,192, n = 4,096 case did not finish in ten minutes.
//
// Sparse top-k codes: thread t owns the rows [a0, a1) of the count matrix and walks every
// token's listed features, incrementing only pairs whose first feature it owns. No atomics,
// no hot spots on frequent features, and the result is independent of the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include <ATen/ATen.h>

#include "ops.h"

namespace supanalysis {
namespace {

// Whether at::_int_mm has fast kernels here. SUPANALYSIS_CPU_INT8_GEMM=1/0 overrides (the
// tests run both paths on any CPU).
bool int8_gemm_fast() {
  const char* env = std::getenv("SUPANALYSIS_CPU_INT8_GEMM");
  if (env != nullptr && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool fast = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni") ||
           __builtin_cpu_supports("amx-int8");
  }();
  return fast;
#else
  return false;
#endif
}

}  // namespace

void coactivation_update_cpu(at::Tensor& counts, const at::Tensor& x, double threshold) {
  TORCH_CHECK(x.device().is_cpu() && counts.device().is_cpu(), "x and counts must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [tokens, features]");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.size(0) == n &&
                  counts.size(1) == n,
              "counts must be a contiguous int64 [n, n] tensor");
  // int8: oneDNN's VNNI/AMX kernels, exact, and 7.7x faster than the float32 GEMM on an
  // AVX-512 Xeon; int32 holds any count of up to 2^31 - 1 rows per product. float32: exact
  // below 2^24 rows per product.
  const bool int8 = int8_gemm_fast();
  const int64_t exact_rows = int8 ? int64_t(1) << 30 : int64_t(1) << 24;
  for (int64_t t0 = 0; t0 < T; t0 += exact_rows) {
    const at::Tensor xs = x.narrow(0, t0, std::min(exact_rows, T - t0));
    // Compare as the float64 reference does (see threshold_f32); half/bf16 widen exactly.
    const at::Tensor xf = xs.scalar_type() == at::kDouble ? xs : xs.to(at::kFloat);
    const double thr = xs.scalar_type() == at::kDouble ? threshold : static_cast<double>(threshold_f32(threshold));
    const at::Tensor fires = at::isfinite(xf) & (xf > thr);
    if (int8) {
      const at::Tensor B = fires.to(at::kChar);
      // With one feature B^T is a [1, rows] view whose strides are (1, 1): at::_int_mm reads
      // that as row-major with leading dimension 1 and returns garbage. B^T then has B's own
      // memory layout, so a reshape of B gives it with unambiguous row-major strides, no copy.
      const at::Tensor Bt = n == 1 ? B.reshape({1, B.size(0)}).contiguous() : B.t();
      counts.add_(at::_int_mm(Bt, B));
    } else {
      const at::Tensor B = fires.to(at::kFloat);
      counts.add_(at::mm(B.t(), B).to(at::kLong));
    }
  }
}

void coactivation_update_sparse_cpu(at::Tensor& counts, const at::Tensor& indices_in) {
  TORCH_CHECK(indices_in.device().is_cpu() && counts.device().is_cpu(),
              "indices and counts must be CPU tensors");
  TORCH_CHECK(indices_in.dim() == 2, "indices must be 2-D [tokens, k]");
  const int64_t n = counts.size(0);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2 &&
                  counts.size(1) == n,
              "counts must be a contiguous int64 [n, n] tensor");
  const at::Tensor idx = indices_in.to(at::kLong).contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t e = 0; e < T * k; ++e)
    TORCH_CHECK(ip[e] >= -1 && ip[e] < n, "indices must be in [-1, n), found ", ip[e]);
  int64_t* c = counts.data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* row = ip + t * k;
      for (int64_t p = 0; p < k; ++p) {
        const int64_t a = row[p];
        if (a < a0 || a >= a1) continue;  // also skips padding (-1)
        int64_t* ca = c + a * n;
        for (int64_t q = 0; q < k; ++q) {
          const int64_t b = row[q];
          if (b >= 0) ++ca[b];
        }
      }
    }
  });
}

}  // namespace supanalysis
