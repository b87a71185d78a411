// Declarations of every native launcher, CPU and CUDA. One op, one file per device:
// csrc/cpu/<op>.cpp defines <op>_cpu, csrc/cuda/<op>.cu defines <op>_cuda.
// Shapes and semantics are documented on the Python side (supanalysis/ops/<op>.py),
// which validates arguments before any launcher runs; launchers re-check what would
// otherwise be memory-unsafe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

// Hot CPU loops are compiled three times, for AVX-512 (x86-64-v4), AVX2 and the baseline
// x86-64 ISA, and the dynamic loader picks per CPU (GCC function multiversioning; the
// x86-64-v4 name needs GCC 11); elsewhere, one build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define SUPANALYSIS_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SUPANALYSIS_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SUPANALYSIS_TARGET_CLONES
#endif

namespace supanalysis {

// The float32 threshold t' with (v > t') == (double(v) > t) for every float32 v: the
// references compare in float64, and rounding t to the nearest float32 would flip values
// equal to that float (float32(0.1) > 0.1 is true in float64, 0.1f > 0.1f is not).
inline float threshold_f32(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// x [T, n] -> {finite_count[n] i64, fire_count[n] i64, mean[n] f64, m2[n] f64,
//              max[n] f64, min[n] f64, active_sum[n] f64, l0[T] i64}
std::vector<at::Tensor> activation_stats_cpu(const at::Tensor& x, double threshold);
// indices [T, k] (i64, -1 = padding), values [T, k] -> same outputs, over n features.
std::vector<at::Tensor> activation_stats_sparse_cpu(const at::Tensor& indices,
                                                    const at::Tensor& values, int64_t n,
                                                    double threshold);

// W [n, m], V [k, m] or none -> {norms, sq_interference, sq_cos, dims, max_abs_cos,
//                                argmax, topk_cos [n, topk], topk_index [n, topk]}
std::vector<at::Tensor> interference_cpu(const at::Tensor& W, const std::optional<at::Tensor>& V,
                                         int64_t topk, int64_t block);

// comoment [na, nb] f64 (updated in place with Chan's formula), n_prev tokens already in it,
// mean_a_prev [na] f64, mean_b_prev [nb] f64, xa [T, na], xb [T, nb]
// -> {mean_a, m2_a, mean_b, m2_b} of this batch (f64). bf16: centred values rounded to
// bfloat16 before the product (precision "bf16"; 16/32-bit batches only).
std::vector<at::Tensor> cross_moments_update_cpu(at::Tensor& comoment, int64_t n_prev,
                                                 const at::Tensor& mean_a_prev,
                                                 const at::Tensor& mean_b_prev,
                                                 const at::Tensor& xa, const at::Tensor& xb, bool bf16);
// out [na, nb] f64 += sum over tokens t and slots p, q of va[t,p] * vb[t,q] at
// (ia[t,p], ib[t,q]); index -1 is padding. The raw cross-product of two sets of top-k codes.
void sparse_outer_update_cpu(at::Tensor& out, const at::Tensor& ia, const at::Tensor& va,
                             const at::Tensor& ib, const at::Tensor& vb);
// comoment [na, nb] f64, inv_std_a [na] f64 (0 = constant feature), inv_std_b [nb]
// -> {max_corr_a [na] f64, match_a [na] i64, max_corr_b [nb] f64, match_b [nb] i64}
std::vector<at::Tensor> best_match_cpu(const at::Tensor& comoment, const at::Tensor& inv_std_a,
                                       const at::Tensor& inv_std_b);

// counts [n, n] i64 += pairs of features that are both active in a token.
void coactivation_update_cpu(at::Tensor& counts, const at::Tensor& x, double threshold);
void coactivation_update_sparse_cpu(at::Tensor& counts, const at::Tensor& indices);

#ifdef SUPANALYSIS_WITH_CUDA
void sparse_outer_update_cuda(at::Tensor& out, const at::Tensor& ia, const at::Tensor& va,
                              const at::Tensor& ib, const at::Tensor& vb);
std::vector<at::Tensor> activation_stats_cuda(const at::Tensor& x, double threshold);
std::vector<at::Tensor> activation_stats_sparse_cuda(const at::Tensor& indices,
                                                     const at::Tensor& values, int64_t n,
                                                     double threshold);
std::vector<at::Tensor> interference_cuda(const at::Tensor& W, const std::optional<at::Tensor>& V,
                                          int64_t topk, int64_t block, int64_t symmetric);
std::vector<at::Tensor> cross_moments_update_cuda(at::Tensor& comoment, int64_t n_prev,
                                                  const at::Tensor& mean_a_prev,
                                                  const at::Tensor& mean_b_prev,
                                                  const at::Tensor& xa, const at::Tensor& xb,
                                                  bool bf16_dot);
std::vector<at::Tensor> best_match_cuda(const at::Tensor& comoment, const at::Tensor& inv_std_a,
                                        const at::Tensor& inv_std_b);
void coactivation_update_cuda(at::Tensor& counts, const at::Tensor& x, double threshold);
void coactivation_update_sparse_cuda(at::Tensor& counts, const at::Tensor& indices);

// Variants of the CUDA launchers above: same arguments and outputs, other kernels (each
// file's header says what differs); supanalysis/ops/cuda_variants.py names them.
std::vector<at::Tensor> activation_stats_cuda_thread_features(const at::Tensor& x, double threshold);
std::vector<at::Tensor> interference_cuda_sliced_columns(const at::Tensor& W, const std::optional<at::Tensor>& V,
                                                         int64_t topk, int64_t block, int64_t symmetric);
std::vector<at::Tensor> cross_moments_update_cuda_sum_means(at::Tensor& comoment, int64_t n_prev,
                                                            const at::Tensor& mean_a_prev,
                                                            const at::Tensor& mean_b_prev,
                                                            const at::Tensor& xa, const at::Tensor& xb,
                                                            bool bf16_dot);
#endif

}  // namespace supanalysis
