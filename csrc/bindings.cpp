// pybind11 bindings of supanalysis._C. Ops are registered with torch.library once, in
// Python (supanalysis/ops/*.py); this module only exposes the native launchers by name so
// that the registration, the tests and the benchmarks can reach each one directly.
#include <torch/extension.h>

#include "ops.h"

namespace sa = supanalysis;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "supanalysis native kernels (C++ CPU, and CUDA when built with it)";
#ifdef SUPANALYSIS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.def("activation_stats_cpu", &sa::activation_stats_cpu, "x [T, n], threshold");
  m.def("activation_stats_sparse_cpu", &sa::activation_stats_sparse_cpu,
        "indices [T, k], values [T, k], n, threshold");
  m.def("interference_cpu", &sa::interference_cpu, "W [n, m], V [k, m] or None, topk, block");
  m.def("cross_moments_update_cpu", &sa::cross_moments_update_cpu,
        "comoment (in place), n_prev, mean_a_prev, mean_b_prev, xa, xb, bf16 (precision 'bf16')");
  m.def("sparse_outer_update_cpu", &sa::sparse_outer_update_cpu,
        "out (in place), indices_a, values_a, indices_b, values_b");
  m.def("best_match_cpu", &sa::best_match_cpu, "comoment, inv_std_a, inv_std_b");
  m.def("coactivation_update_cpu", &sa::coactivation_update_cpu, "counts (in place), x, threshold");
  m.def("coactivation_update_sparse_cpu", &sa::coactivation_update_sparse_cpu,
        "counts (in place), indices");
#ifdef SUPANALYSIS_WITH_CUDA
  m.def("activation_stats_cuda", &sa::activation_stats_cuda);
  m.def("activation_stats_sparse_cuda", &sa::activation_stats_sparse_cuda);
  m.def("interference_cuda", &sa::interference_cuda,
        "W [n, m], V [k, m] or None, topk, block, symmetric (-1 auto, 0 off, 1 on)");
  m.def("cross_moments_update_cuda", &sa::cross_moments_update_cuda,
        "comoment (in place), n_prev, mean_a_prev, mean_b_prev, xa, xb, bf16 (precision 'bf16')");
  m.def("best_match_cuda", &sa::best_match_cuda);
  m.def("sparse_outer_update_cuda", &sa::sparse_outer_update_cuda);
  m.def("coactivation_update_cuda", &sa::coactivation_update_cuda);
  m.def("coactivation_update_sparse_cuda", &sa::coactivation_update_sparse_cuda);
  // Variants (supanalysis/ops/cuda_variants.py): the launchers above with other kernels.
  m.def("activation_stats_cuda_thread_features", &sa::activation_stats_cuda_thread_features, "x [T, n], threshold");
  m.def("interference_cuda_sliced_columns", &sa::interference_cuda_sliced_columns,
        "W [n, m], V [k, m] or None, topk, block, symmetric (-1 auto, 0 off, 1 on)");
  m.def("cross_moments_update_cuda_sum_means", &sa::cross_moments_update_cuda_sum_means,
        "comoment (in place), n_prev, mean_a_prev, mean_b_prev, xa, xb, bf16 (precision 'bf16')");
#endif
}
