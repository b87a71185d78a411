// Fused activation statistics on the GPU: one read of x, every per-feature moment.
//
// Dense x [T, n] (features contiguous, rows possibly strided):
//   _activation_stats_kernel        grid (feature blocks) x (token splits). Each thread owns
//                                   VEC consecutive features, so a warp's loads of one row
//                                   are contiguous (coalesced) and vectorised when aligned.
//                                   It holds kTile rows of its features in registers: a
//                                   first pass over the registers gives counts, sums,
//                                   extrema and firing, a second the tile's M2 about the
//                                   tile's own float32 mean (so x is read from memory once),
//                                   and the tile is Chan-merged into float64 per-thread
//                                   state. Each split writes its partial state.
//   _activation_stats_merge_kernel  merges the splits of each feature in split order with
//                                   Chan's formula in float64: deterministic, and the
//                                   result does not depend on atomics' ordering.
//   Per-token L0: each warp sums its firing flags per row with shuffles, warps add into a
//   per-block shared row counter, and each block adds its counts to the int64 output with
//   one integer atomic per row: integers, so exact and order-independent.
//
// Sparse top-k codes (indices, values [T, k]): only the codes are read. Per-feature
// counters are privatised per block in shared memory when n <= 1024 and otherwise updated
// with global atomics (int64 counts exact; float64 sums, whose order, and so last-bit
// rounding, may vary from run to run). A finalize kernel then adds the implicit zeros in
// closed form, and a second pass over the codes adds the centred squares of the listed
// entries about the final mean (two-pass M2, as the C++ CPU kernel does).
#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

// Rows per register tile. 8 rows x VEC features keeps the kernel near 100 registers, so two
// blocks fit per SM and one block's loads overlap the other's arithmetic; 8 x 16 B loads in
// flight per thread is already more than the bandwidth-latency product needs.
constexpr int kTile = 8;
constexpr int kMaxThreads = 256;  // threads per block (features per block = threads * VEC)
constexpr int kMinBlocksPerSM = 2;
// A split covers at least this many rows, so the per-split partials (7 values x 8 bytes per
// feature) stay a small fraction of the bytes read.
constexpr int64_t kMinSplitRows = 256;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    _activation_stats_kernel(int64_t* __restrict__ p_count, int64_t* __restrict__ p_fire,
                             double* __restrict__ p_mean, double* __restrict__ p_m2,
                             double* __restrict__ p_max, double* __restrict__ p_min,
                             double* __restrict__ p_act, int64_t* __restrict__ l0,
                             const scalar_t* __restrict__ x, int64_t T, int64_t n,
                             int64_t row_stride, int64_t rows_per_split, acc_t thr, bool vec_ok) {
  __shared__ int l0_tile[kTile];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int64_t f0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + tid) * VEC;
  const int64_t split = blockIdx.y;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = std::min<int64_t>(T, r_begin + rows_per_split);
  // Vector loads need the whole group in range and every row start aligned (checked on the
  // host); a tail group falls back to scalar loads.
  const bool full = vec_ok && f0 + VEC <= n;
  if (tid < kTile) l0_tile[tid] = 0;
  __syncthreads();

  // Per-split counts fit in int32 (rows_per_split < 2^31 is checked on the host).
  int cnt[VEC], fire[VEC];
  double mean[VEC], m2[VEC], act[VEC];
  acc_t mx[VEC], mn[VEC];
#pragma unroll
  for (int c = 0; c < VEC; ++c) {
    cnt[c] = 0;
    fire[c] = 0;
    mean[c] = 0.0;
    m2[c] = 0.0;
    act[c] = 0.0;
    mx[c] = -std::numeric_limits<acc_t>::infinity();
    mn[c] = std::numeric_limits<acc_t>::infinity();
  }

  // Every thread of the block runs the same number of tiles (the loop bounds depend on the
  // block only), which the warp shuffles and __syncthreads below require.
  for (int64_t t0 = r_begin; t0 < r_end; t0 += kTile) {
    const int rows = static_cast<int>(std::min<int64_t>(kTile, r_end - t0));
    // Out-of-range rows and features load as NaN: non-finite values take part in nothing,
    // so the passes below need no bounds tests.
    acc_t v[kTile][VEC];
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      if (r < rows && f0 < n) {
        const scalar_t* p = x + (t0 + r) * row_stride + f0;
        if (full) {
          const VecT<scalar_t, VEC> w = *reinterpret_cast<const VecT<scalar_t, VEC>*>(p);
#pragma unroll
          for (int c = 0; c < VEC; ++c) v[r][c] = to_acc<acc_t>(w.v[c]);
        } else {
#pragma unroll
          for (int c = 0; c < VEC; ++c) v[r][c] = f0 + c < n ? to_acc<acc_t>(p[c]) : quiet_nan<acc_t>();
        }
      } else {
#pragma unroll
        for (int c = 0; c < VEC; ++c) v[r][c] = quiet_nan<acc_t>();
      }
    }

    // Pass 1: counts, sums, extrema, firing (and each row's firing count for L0).
    int t_cnt[VEC], t_fire[VEC];
    acc_t t_sum[VEC], t_act[VEC], t_max[VEC], t_min[VEC], t_m2[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      t_cnt[c] = 0;
      t_fire[c] = 0;
      t_sum[c] = 0;
      t_act[c] = 0;
      t_m2[c] = 0;
      t_max[c] = -std::numeric_limits<acc_t>::infinity();
      t_min[c] = std::numeric_limits<acc_t>::infinity();
    }
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      int row_fire = 0;
#pragma unroll
      for (int c = 0; c < VEC; ++c) {
        const acc_t val = v[r][c];
        const bool fin = is_finite_bits(val);
        const bool fires = fin && val > thr;
        t_cnt[c] += fin;
        t_sum[c] += fin ? val : acc_t(0);
        t_max[c] = fin && val > t_max[c] ? val : t_max[c];
        t_min[c] = fin && val < t_min[c] ? val : t_min[c];
        t_fire[c] += fires;
        t_act[c] += fires ? val : acc_t(0);
        row_fire += fires;
      }
      // Rows past the end fire nowhere, so their (zero) sums need no guard until the add.
      row_fire = warp_sum(row_fire);
      if (lane == 0 && row_fire != 0) atomicAdd(&l0_tile[r], row_fire);
    }

    // Pass 2 (registers): M2 about the tile's own mean, then Chan-merge into float64.
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
      const acc_t t_mean = t_cnt[c] > 0 ? t_sum[c] / static_cast<acc_t>(t_cnt[c]) : acc_t(0);
#pragma unroll
      for (int r = 0; r < kTile; ++r) {
        const acc_t val = v[r][c];
        const acc_t d = is_finite_bits(val) ? val - t_mean : acc_t(0);
        t_m2[c] += d * d;
      }
      if (t_cnt[c] > 0) {
        const int na = cnt[c], nb = t_cnt[c], nab = na + nb;
        const double delta = static_cast<double>(t_mean) - mean[c];
        mean[c] += delta * (static_cast<double>(nb) / static_cast<double>(nab));
        m2[c] += static_cast<double>(t_m2[c]) +
                 delta * delta * (static_cast<double>(na) * static_cast<double>(nb) / static_cast<double>(nab));
        cnt[c] = nab;
        mx[c] = t_max[c] > mx[c] ? t_max[c] : mx[c];
        mn[c] = t_min[c] < mn[c] ? t_min[c] : mn[c];
      }
      fire[c] += t_fire[c];
      act[c] += static_cast<double>(t_act[c]);
    }

    __syncthreads();  // every warp's row counts are in l0_tile
    if (tid < rows) {
      const int c = l0_tile[tid];
      if (c != 0) atomic_add_i64(l0 + t0 + tid, c);
      l0_tile[tid] = 0;
    }
    __syncthreads();  // l0_tile is clear before the next tile adds to it
  }

#pragma unroll
  for (int c = 0; c < VEC; ++c) {
    if (f0 + c < n) {
      const int64_t o = split * n + f0 + c;
      p_count[o] = cnt[c];
      p_fire[o] = fire[c];
      p_mean[o] = mean[c];
      p_m2[o] = m2[c];
      p_max[o] = static_cast<double>(mx[c]);
      p_min[o] = static_cast<double>(mn[c]);
      p_act[o] = act[c];
    }
  }
}

__global__ void _activation_stats_merge_kernel(
    int64_t* __restrict__ finite_count, int64_t* __restrict__ fire_count, double* __restrict__ mean,
    double* __restrict__ m2, double* __restrict__ vmax, double* __restrict__ vmin,
    double* __restrict__ active_sum, const int64_t* __restrict__ p_count,
    const int64_t* __restrict__ p_fire, const double* __restrict__ p_mean,
    const double* __restrict__ p_m2, const double* __restrict__ p_max,
    const double* __restrict__ p_min, const double* __restrict__ p_act, int64_t n, int64_t splits) {
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < n;
       f += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t na = 0, fr = 0;
    double mu = 0.0, s2 = 0.0, hi = -INFINITY, lo = INFINITY, ac = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t o = s * n + f;
      const int64_t nb = p_count[o];
      if (nb > 0) {
        const int64_t nab = na + nb;
        const double delta = p_mean[o] - mu;
        mu += delta * (static_cast<double>(nb) / static_cast<double>(nab));
        s2 += p_m2[o] + delta * delta * (static_cast<double>(na) * static_cast<double>(nb) /
                                         static_cast<double>(nab));
        na = nab;
        hi = fmax(hi, p_max[o]);
        lo = fmin(lo, p_min[o]);
      }
      fr += p_fire[o];
      ac += p_act[o];
    }
    finite_count[f] = na;
    fire_count[f] = fr;
    mean[f] = mu;
    m2[f] = s2;
    vmax[f] = hi;
    vmin[f] = lo;
    active_sum[f] = ac;
  }
}

template <typename scalar_t, int VEC>
void launch_dense(const at::Tensor& x, double threshold, at::Tensor& finite_count,
                  at::Tensor& fire_count, at::Tensor& mean, at::Tensor& m2, at::Tensor& vmax,
                  at::Tensor& vmin, at::Tensor& active_sum, at::Tensor& l0) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t T = x.size(0), n = x.size(1), ld = x.stride(0);
  const int64_t groups = ceil_div(n, VEC);
  // Narrow feature blocks for small n, so the idle threads of a block are few and the
  // token splits supply the parallelism instead.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(groups, 32) * 32));
  const int64_t gx = ceil_div(groups, threads);
  const int64_t target_blocks = 8 * static_cast<int64_t>(num_sms());
  int64_t want = std::max<int64_t>(1, ceil_div(target_blocks, gx));
  int64_t rows_per_split = std::max<int64_t>(kMinSplitRows, ceil_div(T, want));
  rows_per_split = ceil_div(rows_per_split, kTile) * kTile;
  int64_t splits = ceil_div(T, rows_per_split);
  if (splits > kMaxGridY) {
    splits = kMaxGridY;
    rows_per_split = ceil_div(ceil_div(T, splits), kTile) * kTile;
    splits = ceil_div(T, rows_per_split);
  }
  TORCH_CHECK(gx <= std::numeric_limits<int>::max(), "x has too many features for one launch");
  TORCH_CHECK(rows_per_split < std::numeric_limits<int>::max(), "x has too many tokens for one launch");
  const auto ptr = reinterpret_cast<uintptr_t>(x.data_ptr());
  const bool vec_ok = VEC > 1 && ptr % (sizeof(scalar_t) * VEC) == 0 && (T == 1 || ld % VEC == 0);

  auto f64 = x.options().dtype(at::kDouble);
  auto i64 = x.options().dtype(at::kLong);
  at::Tensor pi = at::empty({2, splits, n}, i64);
  at::Tensor pd = at::empty({5, splits, n}, f64);
  int64_t* pc = pi.data_ptr<int64_t>();
  double* pf = pd.data_ptr<double>();
  const int64_t sn = splits * n;
  auto stream = at::cuda::getCurrentCUDAStream();
  _activation_stats_kernel<scalar_t, acc_t, VEC>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(splits)), threads, 0, stream>>>(
          pc, pc + sn, pf, pf + sn, pf + 2 * sn, pf + 3 * sn, pf + 4 * sn, l0.data_ptr<int64_t>(),
          x.data_ptr<scalar_t>(), T, n, ld, rows_per_split, threshold_as<acc_t>(threshold), vec_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _activation_stats_merge_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
      finite_count.data_ptr<int64_t>(), fire_count.data_ptr<int64_t>(), mean.data_ptr<double>(),
      m2.data_ptr<double>(), vmax.data_ptr<double>(), vmin.data_ptr<double>(),
      active_sum.data_ptr<double>(), pc, pc + sn, pf, pf + sn, pf + 2 * sn, pf + 3 * sn,
      pf + 4 * sn, n, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------ sparse

__device__ __forceinline__ void count_one(int64_t* c) { atomic_add_i64(c, 1); }
__device__ __forceinline__ void count_one(unsigned int* c) { atomicAdd(c, 1u); }

// One listed entry into per-feature accumulators (global or shared: generic addresses).
template <typename cnt_t>
__device__ __forceinline__ void add_entry(cnt_t* present, cnt_t* nonfinite, cnt_t* fire,
                                          double* sum, double* act, double* vmax, double* vmin,
                                          int64_t f, double v, bool fin, bool fires) {
  if (!fin) {
    count_one(nonfinite + f);
    return;
  }
  count_one(present + f);
  atomicAdd(sum + f, v);
  atomic_max_f64(vmax + f, v);
  atomic_min_f64(vmin + f, v);
  if (fires) {
    count_one(fire + f);
    atomicAdd(act + f, v);
  }
}

// l0 starts at n when an implicit zero fires (threshold < 0): each listed entry that does
// not fire takes one away. Otherwise it starts at 0 and each firing entry adds one.
__device__ __forceinline__ void add_l0(int64_t* l0, int64_t t, bool fires, bool zero_fires) {
  if (zero_fires) {
    if (!fires) atomic_add_i64(l0 + t, -1);
  } else if (fires) {
    atomic_add_i64(l0 + t, 1);
  }
}

// Pass 1 over the codes, one thread per (token, slot), straight into global accumulators
// (n too large to privatise). Invalid indices (outside [0, n), which the Python layer
// rejects before any launch) are skipped like padding rather than trusted, so a bad code
// can never write out of bounds.
template <typename scalar_t, typename index_t>
__global__ void _activation_stats_sparse_kernel(
    int64_t* __restrict__ present, int64_t* __restrict__ nonfinite, int64_t* __restrict__ fire,
    double* __restrict__ sum, double* __restrict__ act, double* __restrict__ vmax,
    double* __restrict__ vmin, int64_t* __restrict__ l0, const index_t* __restrict__ indices,
    const scalar_t* __restrict__ values, int64_t T, int64_t k, int64_t n, double threshold,
    bool zero_fires) {
  const int64_t total = T * k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(indices[e]);
    if (f < 0 || f >= n) continue;
    // float64 comparison, exactly as the float64 reference compares.
    const double v = static_cast<double>(values[e]);
    const bool fin = is_finite_bits(v);
    const bool fires = fin && v > threshold;
    add_entry(present, nonfinite, fire, sum, act, vmax, vmin, f, v, fin, fires);
    add_l0(l0, e / k, fires, zero_fires);
  }
}

// Pass 1 with per-block private accumulators in shared memory (n <= kSmemFeatures):
// frequent features then contend only within a block, on fast shared atomics, and each
// block adds its totals to the global accumulators once per touched feature. Per-block
// counts fit in 32 bits (the launcher caps entries per block below 2^31).
constexpr int kSmemFeatures = 1024;  // 44 KiB of shared memory, under the 48 KiB default

template <typename scalar_t, typename index_t>
__global__ void _activation_stats_sparse_smem_kernel(
    int64_t* __restrict__ present, int64_t* __restrict__ nonfinite, int64_t* __restrict__ fire,
    double* __restrict__ sum, double* __restrict__ act, double* __restrict__ vmax,
    double* __restrict__ vmin, int64_t* __restrict__ l0, const index_t* __restrict__ indices,
    const scalar_t* __restrict__ values, int64_t T, int64_t k, int64_t n, double threshold,
    bool zero_fires) {
  __shared__ unsigned int s_present[kSmemFeatures], s_nonfinite[kSmemFeatures], s_fire[kSmemFeatures];
  __shared__ double s_sum[kSmemFeatures], s_act[kSmemFeatures], s_max[kSmemFeatures], s_min[kSmemFeatures];
  for (int64_t f = threadIdx.x; f < n; f += blockDim.x) {
    s_present[f] = 0;
    s_nonfinite[f] = 0;
    s_fire[f] = 0;
    s_sum[f] = 0.0;
    s_act[f] = 0.0;
    s_max[f] = -INFINITY;
    s_min[f] = INFINITY;
  }
  __syncthreads();
  const int64_t total = T * k;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(indices[e]);
    if (f < 0 || f >= n) continue;
    const double v = static_cast<double>(values[e]);
    const bool fin = is_finite_bits(v);
    const bool fires = fin && v > threshold;
    add_entry(s_present, s_nonfinite, s_fire, s_sum, s_act, s_max, s_min, f, v, fin, fires);
    add_l0(l0, e / k, fires, zero_fires);
  }
  __syncthreads();
  for (int64_t f = threadIdx.x; f < n; f += blockDim.x) {
    if (s_nonfinite[f] != 0) atomic_add_i64(nonfinite + f, s_nonfinite[f]);
    if (s_present[f] != 0) {
      atomic_add_i64(present + f, s_present[f]);
      atomicAdd(sum + f, s_sum[f]);
      atomic_max_f64(vmax + f, s_max[f]);
      atomic_min_f64(vmin + f, s_min[f]);
    }
    if (s_fire[f] != 0) {
      atomic_add_i64(fire + f, s_fire[f]);
      atomicAdd(act + f, s_act[f]);
    }
  }
}

// Per feature: the implicit zeros (T - listed) join count, firing, extrema and M2.
__global__ void _activation_stats_sparse_finalize_kernel(
    int64_t* __restrict__ finite_count, int64_t* __restrict__ fire_count, double* __restrict__ mean,
    double* __restrict__ m2, double* __restrict__ vmax, double* __restrict__ vmin,
    const int64_t* __restrict__ present, const int64_t* __restrict__ nonfinite,
    const int64_t* __restrict__ fire, const double* __restrict__ sum, int64_t T, int64_t n,
    bool zero_fires) {
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < n;
       f += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = present[f], nf = nonfinite[f];
    const int64_t zeros = T - p - nf;
    const int64_t fc = T - nf;
    const double mu = fc > 0 ? sum[f] / static_cast<double>(fc) : 0.0;
    finite_count[f] = fc;
    fire_count[f] = fire[f] + (zero_fires ? zeros : 0);
    mean[f] = mu;
    m2[f] = static_cast<double>(zeros) * mu * mu;
    if (zeros > 0) {
      vmax[f] = fmax(vmax[f], 0.0);
      vmin[f] = fmin(vmin[f], 0.0);
    }
  }
}

// Pass 2: centred squares of the listed finite entries about the final mean.
template <typename scalar_t, typename index_t>
__global__ void _activation_stats_sparse_m2_kernel(double* __restrict__ m2,
                                                   const double* __restrict__ mean,
                                                   const index_t* __restrict__ indices,
                                                   const scalar_t* __restrict__ values, int64_t total,
                                                   int64_t n) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = static_cast<int64_t>(indices[e]);
    if (f < 0 || f >= n) continue;
    const double v = static_cast<double>(values[e]);
    if (!is_finite_bits(v)) continue;
    const double d = v - mean[f];
    atomicAdd(m2 + f, d * d);
  }
}

}  // namespace

std::vector<at::Tensor> activation_stats_cuda(const at::Tensor& x_in, double threshold) {
  check_cuda(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, features], got ", x_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be floating point, got ",
              x_in.scalar_type());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // Rows may be strided (a slice of a wider activation); features must be contiguous.
  const at::Tensor x = (x_in.stride(1) == 1 || x_in.size(1) <= 1) && x_in.stride(0) >= 0
                           ? x_in
                           : x_in.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  auto f64 = x.options().dtype(at::kDouble);
  auto i64 = x.options().dtype(at::kLong);
  at::Tensor finite_count = at::zeros({n}, i64), fire_count = at::zeros({n}, i64);
  at::Tensor mean = at::zeros({n}, f64), m2 = at::zeros({n}, f64);
  at::Tensor vmax = at::full({n}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor vmin = at::full({n}, std::numeric_limits<double>::infinity(), f64);
  at::Tensor active_sum = at::zeros({n}, f64);
  at::Tensor l0 = at::zeros({T}, i64);
  if (T == 0 || n == 0) return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
  // size(1) == 1 may carry any stride(1); the kernels index features with stride 1.
  switch (x.scalar_type()) {
    case at::kHalf:
      launch_dense<at::Half, 4>(x, threshold, finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0);
      break;
    case at::kBFloat16:
      launch_dense<at::BFloat16, 4>(x, threshold, finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0);
      break;
    case at::kFloat:
      launch_dense<float, 4>(x, threshold, finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0);
      break;
    case at::kDouble:
      launch_dense<double, 2>(x, threshold, finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0);
      break;
    default:
      TORCH_CHECK(false, "x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  }
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

std::vector<at::Tensor> activation_stats_sparse_cuda(const at::Tensor& indices_in,
                                                     const at::Tensor& values_in, int64_t n,
                                                     double threshold) {
  check_cuda(indices_in, "indices");
  check_cuda(values_in, "values");
  check_same_device(values_in, indices_in, "values", "indices");
  TORCH_CHECK(indices_in.dim() == 2, "indices must be 2-D [tokens, k], got ", indices_in.dim(), "-D");
  TORCH_CHECK(values_in.sizes() == indices_in.sizes(), "values must have the shape of indices ",
              indices_in.sizes(), ", got ", values_in.sizes());
  TORCH_CHECK(indices_in.scalar_type() == at::kInt || indices_in.scalar_type() == at::kLong,
              "indices must be int32 or int64, got ", indices_in.scalar_type());
  TORCH_CHECK(at::isFloatingType(values_in.scalar_type()), "values must be floating point, got ",
              values_in.scalar_type());
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  const c10::cuda::CUDAGuard device_guard(indices_in.device());
  const at::Tensor idx = indices_in.contiguous();
  const at::Tensor val = values_in.contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  auto f64 = val.options().dtype(at::kDouble);
  auto i64 = val.options().dtype(at::kLong);
  const bool zero_fires = 0.0 > threshold;

  at::Tensor finite_count = at::full({n}, T, i64);
  at::Tensor fire_count = at::full({n}, zero_fires ? T : 0, i64);
  at::Tensor mean = at::zeros({n}, f64), m2 = at::zeros({n}, f64);
  // With no codes at all every entry is an implicit zero.
  at::Tensor vmax = at::full({n}, T > 0 ? 0.0 : -std::numeric_limits<double>::infinity(), f64);
  at::Tensor vmin = at::full({n}, T > 0 ? 0.0 : std::numeric_limits<double>::infinity(), f64);
  at::Tensor active_sum = at::zeros({n}, f64);
  at::Tensor l0 = at::full({T}, zero_fires ? n : 0, i64);
  if (n == 0 || T == 0) return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
  if (k == 0) return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};

  at::Tensor counts = at::zeros({3, n}, i64);  // present, nonfinite, fire
  at::Tensor sum = at::zeros({n}, f64);
  vmax.fill_(-std::numeric_limits<double>::infinity());
  vmin.fill_(std::numeric_limits<double>::infinity());
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t total = T * k;
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "activation_stats_sparse_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "activation_stats_sparse_cuda_index", [&] {
      if (n <= kSmemFeatures) {
        // Few blocks: each pays an O(n) init and flush, so a couple per SM is enough; but
        // never so few that one block's 32-bit counters could see 2^31 entries.
        const int64_t blocks = std::min<int64_t>(
            std::max<int64_t>(2 * static_cast<int64_t>(num_sms()), ceil_div(total, int64_t(1) << 30)),
            std::min<int64_t>(ceil_div(total, threads), std::numeric_limits<int>::max()));
        _activation_stats_sparse_smem_kernel<scalar_t, index_t>
            <<<static_cast<unsigned>(std::max<int64_t>(1, blocks)), threads, 0, stream>>>(
                cp, cp + n, cp + 2 * n, sum.data_ptr<double>(), active_sum.data_ptr<double>(),
                vmax.data_ptr<double>(), vmin.data_ptr<double>(), l0.data_ptr<int64_t>(),
                idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(), T, k, n, threshold, zero_fires);
      } else {
        _activation_stats_sparse_kernel<scalar_t, index_t><<<grid_for(total, threads), threads, 0, stream>>>(
            cp, cp + n, cp + 2 * n, sum.data_ptr<double>(), active_sum.data_ptr<double>(),
            vmax.data_ptr<double>(), vmin.data_ptr<double>(), l0.data_ptr<int64_t>(),
            idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(), T, k, n, threshold, zero_fires);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      _activation_stats_sparse_finalize_kernel<<<grid_for(n, threads), threads, 0, stream>>>(
          finite_count.data_ptr<int64_t>(), fire_count.data_ptr<int64_t>(), mean.data_ptr<double>(),
          m2.data_ptr<double>(), vmax.data_ptr<double>(), vmin.data_ptr<double>(), cp, cp + n,
          cp + 2 * n, sum.data_ptr<double>(), T, n, zero_fires);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      _activation_stats_sparse_m2_kernel<scalar_t, index_t><<<grid_for(total, threads), threads, 0, stream>>>(
          m2.data_ptr<double>(), mean.data_ptr<double>(), idx.data_ptr<index_t>(),
          val.data_ptr<scalar_t>(), total, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

}  // namespace supanalysis
