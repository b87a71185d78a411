// Helpers shared by the CUDA kernels of supanalysis._C (csrc/cuda/*.cu).
//
// Everything here is small and header-only: launch sizing, float classification that
// does not depend on compiler flags, and the atomics the kernels need that CUDA lacks.
#pragma once

// Only the ATen pieces the kernels use: <ATen/ATen.h> (all operators) roughly doubles the
// host-side compile time of each .cu file, which CI pays on a 2-core machine.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "ops.h"

namespace supanalysis {
namespace cuda_detail {

// The largest grid.y / grid.z a launch may use.
constexpr int64_t kMaxGridY = 65535;
// Grid-stride launches never need more blocks than this to fill a GPU several times over;
// beyond it each thread simply loops.
constexpr int64_t kMaxGridX = int64_t(1) << 20;

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// float16 or bfloat16: the dtypes the tensor cores multiply into a float32 result.
inline bool is_16bit(const at::Tensor& X) {
  return X.scalar_type() == at::kHalf || X.scalar_type() == at::kBFloat16;
}

// Blocks for a grid-stride loop over `work` items with `threads` threads per block.
inline unsigned int grid_for(int64_t work, int threads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(work, threads), kMaxGridX)));
}

// Accumulation type: float for half/bfloat16/float inputs, double for double.
template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Finiteness from the exponent bits. The extension is compiled with --use_fast_math;
// nvcc keeps NaN/Inf semantics under it today, but a bit test cannot be folded away by
// any flag, and non-finite values must never leak into a moment.
__device__ __forceinline__ bool is_finite_bits(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool is_finite_bits(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __uint_as_float(0x7fc00000u);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ll);
}

// The float f with (v > f) == (v > threshold) for every float v: threshold rounded toward
// -inf. References compare in float64, so rounding the threshold to nearest would let
// values between the two roundings fire (or not) wrongly.
inline float threshold_as_float(double threshold) {
  float f = static_cast<float>(threshold);
  if (static_cast<double>(f) > threshold) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}
template <typename acc_t>
inline acc_t threshold_as(double threshold);
template <>
inline float threshold_as<float>(double threshold) {
  return threshold_as_float(threshold);
}
template <>
inline double threshold_as<double>(double threshold) {
  return threshold;
}

// int64 counters through the unsigned 64-bit atomic (two's complement makes += of a
// negative delta, written as its unsigned image, correct).
__device__ __forceinline__ void atomic_add_i64(int64_t* addr, int64_t delta) {
  atomicAdd(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(delta));
}

// Atomic max / min of doubles through integer atomics on the bit pattern. Non-negative
// doubles order like their bits read as signed integers and negative doubles order
// reversed like their bits read as unsigned integers, and every negative double's bits
// (unsigned) exceed every non-negative double's; so max = signed atomicMax for v >= 0 and
// unsigned atomicMin for v < 0 (min symmetrically). -0.0 is canonicalised to +0.0 first
// (its bits are the most negative signed integer and would lose every max). Slots must
// start at -inf (max) or +inf (min). NaN must not be passed.
__device__ __forceinline__ void atomic_max_f64(double* addr, double v) {
  if (v == 0.0) v = 0.0;
  if (v >= 0.0)
    atomicMax(reinterpret_cast<long long*>(addr), __double_as_longlong(v));
  else
    atomicMin(reinterpret_cast<unsigned long long*>(addr),
              static_cast<unsigned long long>(__double_as_longlong(v)));
}
__device__ __forceinline__ void atomic_min_f64(double* addr, double v) {
  if (v == 0.0) v = 0.0;
  if (v >= 0.0)
    atomicMin(reinterpret_cast<long long*>(addr), __double_as_longlong(v));
  else
    atomicMax(reinterpret_cast<unsigned long long*>(addr),
              static_cast<unsigned long long>(__double_as_longlong(v)));
}

// (value, index) pairs reduced with "larger value wins, ties to the smaller index";
// index -1 means "no candidate" and loses to everything.
template <typename val_t>
__device__ __forceinline__ bool better(val_t v2, int64_t i2, val_t v1, int64_t i1) {
  if (i2 < 0) return false;
  if (i1 < 0) return true;
  return v2 > v1 || (v2 == v1 && i2 < i1);
}

template <typename val_t>
__device__ __forceinline__ void warp_argmax(val_t& v, int64_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const val_t v2 = __shfl_down_sync(0xffffffffu, v, off);
    const int64_t i2 = __shfl_down_sync(0xffffffffu, i, off);
    if (better(v2, i2, v, i)) {
      v = v2;
      i = i2;
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

}  // namespace cuda_detail
}  // namespace supanalysis
