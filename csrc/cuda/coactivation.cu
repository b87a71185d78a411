// Co-activation counts on the GPU: counts [n, n] int64 += pairs active on the same token.
//
// Dense x [T, n]: _coactivation_binarise_kernel writes B = (finite and x > threshold) as
// 0/1 float32, cuBLAS forms G = B^T B, and _coactivation_accumulate_kernel adds
// round(G) into the int64 counts. Products of 0/1 are exact and float32 sums of ones are
// exact up to 2^24, so tokens go in chunks of at most 2^24 rows (TF32, if a user enables
// it, is exact on 0/1 too: the inputs are representable and accumulation stays float32).
// The threshold comparison is the reference's float64 `x > threshold`, done exactly in
// float: the threshold is rounded toward -inf to a float (see threshold_as).
//
// Sparse codes indices [T, k]: one thread per (token, slot p) walks the token's k slots and
// adds 1 to counts[a, b] for every listed pair with integer atomics (exact; the k x k
// pairs of a token touch k distinct rows, so contention is only between tokens sharing
// features).
#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

constexpr int64_t kExactRows = int64_t(1) << 24;
// Bound on the binarised chunk (elements of float32): 2^27 elements = 512 MiB.
constexpr int64_t kChunkElems = int64_t(1) << 27;

template <typename scalar_t, typename cmp_t>
__global__ void _coactivation_binarise_kernel(float* __restrict__ B, const scalar_t* __restrict__ x,
                                              int64_t rows, int64_t n, int64_t row_stride,
                                              cmp_t thr) {
  const int64_t total = rows * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / n, f = e - t * n;
    const cmp_t v = static_cast<cmp_t>(x[t * row_stride + f]);
    B[e] = (is_finite_bits(v) && v > thr) ? 1.0f : 0.0f;
  }
}

// counts[e] += round(G[e]); G holds exact small integers, rint only guards the cast.
__global__ void _coactivation_accumulate_kernel(int64_t* __restrict__ counts,
                                                const float* __restrict__ G, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    counts[e] += static_cast<int64_t>(rintf(G[e]));
  }
}

template <typename index_t>
__global__ void _coactivation_sparse_kernel(int64_t* __restrict__ counts,
                                            const index_t* __restrict__ indices, int64_t T,
                                            int64_t k, int64_t n) {
  const int64_t total = T * k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = static_cast<int64_t>(indices[e]);
    // Out-of-range codes (rejected by the Python layer) are skipped like padding, never
    // trusted as addresses.
    if (a < 0 || a >= n) continue;
    const index_t* row = indices + (e / k) * k;
    int64_t* ca = counts + a * n;
    for (int64_t q = 0; q < k; ++q) {
      const int64_t b = static_cast<int64_t>(row[q]);
      if (b >= 0 && b < n) atomic_add_i64(ca + b, 1);
    }
  }
}

}  // namespace

void coactivation_update_cuda(at::Tensor& counts, const at::Tensor& x, double threshold) {
  check_cuda(x, "x");
  check_cuda(counts, "counts");
  check_same_device(counts, x, "counts", "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [tokens, features], got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2 &&
                  counts.size(0) == n && counts.size(1) == n,
              "counts must be a contiguous int64 [n, n] tensor with n = ", n);
  if (T == 0 || n == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.stride(1) == 1 || n == 1 ? x : x.contiguous();
  const int64_t ld = xc.stride(0);
  const int64_t chunk = std::max<int64_t>(1, std::min(kExactRows, kChunkElems / n));
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  at::Tensor B = at::empty({std::min(chunk, T), n}, xc.options().dtype(at::kFloat));
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t rows = std::min(chunk, T - t0);
    at::Tensor Bc = B.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "coactivation_update_cuda", [&] {
      using cmp_t = acc_type_t<scalar_t>;
      _coactivation_binarise_kernel<scalar_t, cmp_t><<<grid_for(rows * n, threads), threads, 0, stream>>>(
          Bc.data_ptr<float>(), xc.data_ptr<scalar_t>() + t0 * ld, rows, n, ld,
          threshold_as<cmp_t>(threshold));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor G = at::mm(Bc.t(), Bc);  // [n, n] float32, exact integers
    _coactivation_accumulate_kernel<<<grid_for(n * n, threads), threads, 0, stream>>>(
        counts.data_ptr<int64_t>(), G.data_ptr<float>(), n * n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void coactivation_update_sparse_cuda(at::Tensor& counts, const at::Tensor& indices_in) {
  check_cuda(indices_in, "indices");
  check_cuda(counts, "counts");
  check_same_device(counts, indices_in, "counts", "indices");
  TORCH_CHECK(indices_in.dim() == 2, "indices must be 2-D [tokens, k], got ", indices_in.dim(), "-D");
  TORCH_CHECK(indices_in.scalar_type() == at::kInt || indices_in.scalar_type() == at::kLong,
              "indices must be int32 or int64, got ", indices_in.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 2 &&
                  counts.size(0) == counts.size(1),
              "counts must be a contiguous int64 [n, n] tensor");
  const int64_t n = counts.size(0);
  const int64_t T = indices_in.size(0), k = indices_in.size(1);
  if (T == 0 || k == 0 || n == 0) return;
  const c10::cuda::CUDAGuard device_guard(indices_in.device());
  const at::Tensor idx = indices_in.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "coactivation_update_sparse_cuda", [&] {
    _coactivation_sparse_kernel<index_t><<<grid_for(T * k, threads), threads, 0, stream>>>(
        counts.data_ptr<int64_t>(), idx.data_ptr<index_t>(), T, k, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace supanalysis
