// Sparse outer-product accumulation on CUDA: out[ia[t,p], ib[t,q]] += va[t,p] * vb[t,q].
//
// One thread per (token, p, q) pair, float64 atomicAdd (sm_60+). Top-k codes spread their
// pairs over n_a * n_b cells, so contention stays low except on features that fire on
// most tokens; the products are exact float64 products of the inputs' values.
#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

template <typename val_t>
__global__ void sparse_outer_kernel(double* __restrict__ out, const int64_t* __restrict__ ia,
                                    const val_t* __restrict__ va, const int64_t* __restrict__ ib,
                                    const val_t* __restrict__ vb, int64_t T, int64_t ka, int64_t kb,
                                    int64_t nb) {
  const int64_t pairs = ka * kb;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < T * pairs;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / pairs, p = (e % pairs) / kb, q = e % kb;
    const int64_t a = ia[t * ka + p], b = ib[t * kb + q];
    if (a < 0 || b < 0) continue;
    using acc_t = acc_type_t<val_t>;
    const double v = static_cast<double>(to_acc<acc_t>(va[t * ka + p])) *
                     static_cast<double>(to_acc<acc_t>(vb[t * kb + q]));
    atomicAdd(out + a * nb + b, v);
  }
}

}  // namespace

void sparse_outer_update_cuda(at::Tensor& out, const at::Tensor& ia_in, const at::Tensor& va_in,
                              const at::Tensor& ib_in, const at::Tensor& vb_in) {
  TORCH_CHECK(out.is_cuda() && ia_in.is_cuda() && va_in.is_cuda() && ib_in.is_cuda() && vb_in.is_cuda(),
              "out and the codes must be CUDA tensors");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 2,
              "out must be a contiguous float64 [n_a, n_b] tensor");
  TORCH_CHECK(ia_in.dim() == 2 && va_in.sizes() == ia_in.sizes() && ib_in.dim() == 2 &&
                  vb_in.sizes() == ib_in.sizes() && ia_in.size(0) == ib_in.size(0),
              "codes must be [T, k_a] (indices, values) and [T, k_b] over the same tokens");
  TORCH_CHECK(va_in.scalar_type() == vb_in.scalar_type(), "values_a and values_b must share a dtype");
  const c10::cuda::CUDAGuard guard(out.device());
  // Indices arrive int64 from the Python wrapper (it widens int32), so no conversion here.
  TORCH_CHECK(ia_in.scalar_type() == at::kLong && ib_in.scalar_type() == at::kLong, "indices must be int64");
  const at::Tensor ia = ia_in.contiguous(), ib = ib_in.contiguous();
  const at::Tensor va = va_in.contiguous(), vb = vb_in.contiguous();
  const int64_t T = ia.size(0), ka = ia.size(1), kb = ib.size(1), nb = out.size(1);
  if (T * ka * kb == 0) return;
  const int threads = 256;
  const unsigned int blocks = grid_for(T * ka * kb, threads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, va.scalar_type(), "sparse_outer_update_cuda", [&] {
    sparse_outer_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        out.data_ptr<double>(), ia.data_ptr<int64_t>(), va.data_ptr<scalar_t>(), ib.data_ptr<int64_t>(),
        vb.data_ptr<scalar_t>(), T, ka, kb, nb);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace supanalysis
