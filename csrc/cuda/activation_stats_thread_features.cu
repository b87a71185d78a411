// Dense activation statistics on the GPU, "thread_features" variant of
// activation_stats_cuda (csrc/cuda/activation_stats.cu holds the default kernels and the
// sparse-code path, which this variant does not replace). Same outputs and argument checks;
// what differs is how the token loop is organised:
//
//   _activation_stats_tf_kernel     grid (feature blocks) x (token splits). Each thread owns
//                                   VEC consecutive features for its split's whole token
//                                   range, so a warp's loads of one row are contiguous
//                                   (coalesced, vectorised when aligned) and every reduction
//                                   over tokens stays in the thread. One pass: deviations
//                                   from a shift (the first row's values, then the running
//                                   mean) summed in acc_t over 32-row chunks, each merged
//                                   into float64 state with Chan's formula. The fast pass
//                                   tests no entry for finiteness: a non-finite entry makes
//                                   its feature's sums non-finite, and that thread redoes the
//                                   chunk with every entry tested. The next 8 rows are loaded
//                                   while the current 8 are reduced. Each split writes its
//                                   partial state.
//   _activation_stats_tf_merge_kernel
//                                   merges the splits of each feature in split order with
//                                   Chan's formula in float64: deterministic, and the
//                                   result does not depend on atomics' ordering.
//   Per-token L0: each warp sums its firing flags per row (one REDUX), warps add into a
//   per-block shared row counter, and each block writes its counts per (block, token)
//   without atomics; the launcher sums the blocks (integers: exact, order-independent).
#include <ATen/ops/sum.h>

#include "common.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

// Tokens per load step (each thread holds kRows rows of its VEC features) and per float32
// partial (kChunk rows, then the float64 merge). Two blocks of 8 warps per SM (the launch
// bounds cap registers at 128; whatever spills does so outside the token loop); the next
// step's rows are loaded while the current ones are reduced.
constexpr int kRows = 8;
constexpr int kChunk = 32;
constexpr int kSteps = kChunk / kRows;
constexpr int kMaxThreads = 256;  // threads per block (features per block = threads * VEC)
constexpr int kMinBlocksPerSM = 2;
// A split covers at least this many rows, so the per-split partials (7 values x 8 bytes per
// feature) stay a small fraction of the bytes read.
constexpr int64_t kMinSplitRows = 256;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

// Row `row` of this thread's features f0..f0+VEC-1 in x's own type. VECTOR (every row start
// aligned and n a multiple of VEC, checked on the host; callers skip threads past the last
// feature): one vector load. Otherwise scalar loads, features past n reading as NaN, which
// takes part in nothing (and sends the chunk to the careful path).
template <bool VECTOR, typename scalar_t, int VEC>
__device__ __forceinline__ VecT<scalar_t, VEC> load_row(const scalar_t* __restrict__ x, int64_t row,
                                                        int64_t ld, int64_t f0, int64_t n) {
  const scalar_t* p = x + row * ld + f0;
  if constexpr (VECTOR) {
    return *reinterpret_cast<const VecT<scalar_t, VEC>*>(p);
  } else {
    VecT<scalar_t, VEC> w;
#pragma unroll
    for (int c = 0; c < VEC; ++c) w.v[c] = f0 + c < n ? p[c] : scalar_t(quiet_nan<float>());
    return w;
  }
}

// A chunk of one thread's features: count, shift, deviation sums, extrema, firing.
template <typename acc_t, int VEC>
struct ChunkSums {
  int c[VEC], f[VEC];
  acc_t shift[VEC], s[VEC], q[VEC], a[VEC], mx[VEC], mn[VEC];
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      c[k] = f[k] = 0;
      s[k] = q[k] = a[k] = acc_t(0);
      mx[k] = -std::numeric_limits<acc_t>::infinity();
      mn[k] = std::numeric_limits<acc_t>::infinity();
    }
  }
};

// Chan merge weight c / (n + c), in the accumulation type.
template <typename acc_t>
__device__ __forceinline__ acc_t chan_weight(int c, int nab);
template <>
__device__ __forceinline__ float chan_weight<float>(int c, int nab) {
  return __fdividef(static_cast<float>(c), static_cast<float>(nab));
}
template <>
__device__ __forceinline__ double chan_weight<double>(int c, int nab) {
  return static_cast<double>(c) / static_cast<double>(nab);
}

// Float64 running state of one thread's features (per-split counts fit in int32: checked on
// the host), and the shift its deviations are taken from: the first row's value, then the
// running mean. A feature whose first value is not finite gets a NaN shift, so its fast
// sums are NaN and its chunks take the careful path until one has counted a finite value
// (a made-up shift of 0 far from the mean would cancel catastrophically in q - s^2/c).
template <typename acc_t, int VEC>
struct FeatureState {
  int cnt[VEC], fire[VEC];
  double mean[VEC], m2[VEC], act[VEC];
  acc_t mx[VEC], mn[VEC], shift[VEC];

  // Chan's formula. The chunk's M2 is q - s^2/c about its shift (clamped at 0 against
  // rounding); the merge weight c/(n+c) is computed in acc_t (a float32 rounding perturbs
  // only the correction terms).
  __device__ __forceinline__ void merge(const ChunkSums<acc_t, VEC>& cs, const double (&inv_c)[VEC]) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (cs.c[k] > 0) {
        const double sd = static_cast<double>(cs.s[k]);
        const double tmean = static_cast<double>(cs.shift[k]) + sd * inv_c[k];
        const double tm2 = fmax(0.0, static_cast<double>(cs.q[k]) - sd * sd * inv_c[k]);
        const int nab = cnt[k] + cs.c[k];
        const double w = static_cast<double>(chan_weight<acc_t>(cs.c[k], nab));
        const double delta = tmean - mean[k];
        mean[k] += delta * w;
        m2[k] += tm2 + delta * delta * static_cast<double>(cnt[k]) * w;
        cnt[k] = nab;
        shift[k] = static_cast<acc_t>(mean[k]);
      }
      mx[k] = cs.mx[k] > mx[k] ? cs.mx[k] : mx[k];
      mn[k] = cs.mn[k] < mn[k] ? cs.mn[k] : mn[k];
      fire[k] += cs.f[k];
      act[k] += static_cast<double>(cs.a[k]);
    }
  }
};

// The warp's total of v in lane 0 (every lane of the warp must call it).
__device__ __forceinline__ int warp_total(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xffffffffu, v);  // one REDUX instead of five shuffles
#else
  return warp_sum(v);
#endif
}

// Rows [t0, t0 + rows) of one thread's features with every entry tested (no collectives:
// called by single threads). Two reads (the second from cache): finite counts and means,
// then deviations from those means. Adds to s_l0[r] each row's firing count, less what the
// fast pass already added for it (`after_fast`): +inf fires there, never here.
template <bool VECTOR, typename scalar_t, typename acc_t, int VEC>
__device__ void careful_chunk(ChunkSums<acc_t, VEC>& cs, const scalar_t* __restrict__ x, int64_t ld,
                              int64_t f0, int64_t n, int64_t t0, int rows, acc_t thr,
                              bool after_fast, int* s_l0) {
  cs.clear();
  if (f0 >= n) return;  // a thread past the last feature: nothing to count
  acc_t tot[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) tot[k] = acc_t(0);
  for (int r = 0; r < rows; ++r) {
    const VecT<scalar_t, VEC> w = load_row<VECTOR, scalar_t, VEC>(x, t0 + r, ld, f0, n);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t val = to_acc<acc_t>(w.v[k]);
      const bool fin = is_finite_bits(val);
      cs.c[k] += fin;
      tot[k] += fin ? val : acc_t(0);
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) cs.shift[k] = cs.c[k] > 0 ? tot[k] / static_cast<acc_t>(cs.c[k]) : acc_t(0);
  for (int r = 0; r < rows; ++r) {
    const VecT<scalar_t, VEC> w = load_row<VECTOR, scalar_t, VEC>(x, t0 + r, ld, f0, n);
    int fires_true = 0, fires_fast = 0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t val = to_acc<acc_t>(w.v[k]);
      const bool fin = is_finite_bits(val);
      const bool fires = fin && val > thr;
      const acc_t d = fin ? val - cs.shift[k] : acc_t(0);
      cs.s[k] += d;
      cs.q[k] += d * d;
      cs.mx[k] = fin && val > cs.mx[k] ? val : cs.mx[k];
      cs.mn[k] = fin && val < cs.mn[k] ? val : cs.mn[k];
      cs.f[k] += fires;
      cs.a[k] += fires ? val : acc_t(0);
      fires_true += fires;
      fires_fast += val > thr;
    }
    const int delta = fires_true - (after_fast ? fires_fast : 0);
    if (delta != 0) atomicAdd(s_l0 + r, delta);
  }
}

template <bool VECTOR, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    _activation_stats_tf_kernel(int64_t* __restrict__ p_count, int64_t* __restrict__ p_fire,
                             double* __restrict__ p_mean, double* __restrict__ p_m2,
                             double* __restrict__ p_max, double* __restrict__ p_min,
                             double* __restrict__ p_act, int* __restrict__ l0_part,
                             const scalar_t* __restrict__ x, int64_t T, int64_t n,
                             int64_t ld, int64_t rows_per_split, acc_t thr) {
  __shared__ int s_l0[kChunk];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int64_t f0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + tid) * VEC;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = std::min<int64_t>(T, r_begin + rows_per_split);
  const int64_t r_fast = r_begin + (r_end - r_begin) / kChunk * kChunk;
  // Threads past the last feature load nothing and add nothing, but take part in the warp
  // reductions and barriers; their results are never stored.
  const bool active = f0 < n;
  int* const l0_row = l0_part + static_cast<int64_t>(blockIdx.x) * T;
  if (tid < kChunk) s_l0[tid] = 0;

  FeatureState<acc_t, VEC> st;
  {
    // The first row's finite values are the first shift (then the running mean).
    VecT<scalar_t, VEC> w{};
    if (active) w = load_row<VECTOR, scalar_t, VEC>(x, r_begin, ld, f0, n);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t v = to_acc<acc_t>(w.v[k]);
      st.cnt[k] = st.fire[k] = 0;
      st.mean[k] = st.m2[k] = st.act[k] = 0.0;
      st.mx[k] = -std::numeric_limits<acc_t>::infinity();
      st.mn[k] = std::numeric_limits<acc_t>::infinity();
      st.shift[k] = is_finite_bits(v) ? v : quiet_nan<acc_t>();
    }
  }
  __syncthreads();

  double inv_chunk[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) inv_chunk[k] = 1.0 / kChunk;
  ChunkSums<acc_t, VEC> cs;
  VecT<scalar_t, VEC> nxt[kRows];
  if (active && r_begin < r_fast) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) nxt[r] = load_row<VECTOR, scalar_t, VEC>(x, r_begin + r, ld, f0, n);
  }
  // Every thread of the block runs the same chunks and steps (the bounds depend on the
  // block only), which the warp reductions and __syncthreads below require.
  for (int64_t c0 = r_begin; c0 < r_fast; c0 += kChunk) {
    // Fast pass: no per-entry finiteness tests. A non-finite entry makes its feature's
    // deviation sum non-finite, and the thread then redoes the chunk carefully.
    cs.clear();
#pragma unroll 1
    for (int step = 0; step < kSteps; ++step) {
      int row_fire[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) row_fire[r] = 0;
      if (active) {
        VecT<scalar_t, VEC> cur[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) cur[r] = nxt[r];
        const int64_t t_next = c0 + (step + 1) * kRows;
        if (t_next < r_fast) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) nxt[r] = load_row<VECTOR, scalar_t, VEC>(x, t_next + r, ld, f0, n);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t val = to_acc<acc_t>(cur[r].v[k]);
            const acc_t d = val - st.shift[k];
            cs.s[k] += d;
            cs.q[k] += d * d;
            cs.mx[k] = fmax(cs.mx[k], val);  // NaN is ignored here and caught by the sums
            cs.mn[k] = fmin(cs.mn[k], val);
            const bool fires = val > thr;
            cs.f[k] += fires;
            cs.a[k] += fires ? val : acc_t(0);
            row_fire[r] += fires;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int total = warp_total(row_fire[r]);
        if (lane == 0 && total != 0) atomicAdd(s_l0 + step * kRows + r, total);
      }
    }
    bool ok = true;
#pragma unroll
    for (int k = 0; k < VEC; ++k) ok = ok && is_finite_bits(cs.s[k]) && is_finite_bits(cs.q[k]);
    if (ok) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        cs.c[k] = kChunk;
        cs.shift[k] = st.shift[k];
      }
      st.merge(cs, inv_chunk);
    } else {
      careful_chunk<VECTOR, scalar_t, acc_t, VEC>(cs, x, ld, f0, n, c0, kChunk, thr, true, s_l0);
      double inv[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) inv[k] = 1.0 / static_cast<double>(cs.c[k] > 0 ? cs.c[k] : 1);
      st.merge(cs, inv);
    }
    __syncthreads();  // every row count of the chunk is in s_l0
    if (tid < kChunk) {
      l0_row[c0 + tid] = s_l0[tid];
      s_l0[tid] = 0;
    }
    __syncthreads();  // s_l0 is clear before the next chunk adds to it
  }
  if (r_fast < r_end) {
    const int rows = static_cast<int>(r_end - r_fast);
    careful_chunk<VECTOR, scalar_t, acc_t, VEC>(cs, x, ld, f0, n, r_fast, rows, thr, false, s_l0);
    double inv[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) inv[k] = 1.0 / static_cast<double>(cs.c[k] > 0 ? cs.c[k] : 1);
    st.merge(cs, inv);
    __syncthreads();
    if (tid < rows) l0_row[r_fast + tid] = s_l0[tid];
  }

#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    if (f0 + k < n) {
      const int64_t o = static_cast<int64_t>(blockIdx.y) * n + f0 + k;
      p_count[o] = st.cnt[k];
      p_fire[o] = st.fire[k];
      p_mean[o] = st.mean[k];
      p_m2[o] = st.m2[k];
      p_max[o] = static_cast<double>(st.mx[k]);
      p_min[o] = static_cast<double>(st.mn[k]);
      p_act[o] = st.act[k];
    }
  }
}

__global__ void _activation_stats_tf_merge_kernel(
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
  rows_per_split = ceil_div(rows_per_split, kChunk) * kChunk;
  int64_t splits = ceil_div(T, rows_per_split);
  if (splits > kMaxGridY) {
    splits = kMaxGridY;
    rows_per_split = ceil_div(ceil_div(T, splits), kChunk) * kChunk;
    splits = ceil_div(T, rows_per_split);
  }
  TORCH_CHECK(gx <= std::numeric_limits<int>::max(), "x has too many features for one launch");
  TORCH_CHECK(rows_per_split < std::numeric_limits<int>::max(), "x has too many tokens for one launch");
  const auto ptr = reinterpret_cast<uintptr_t>(x.data_ptr());
  // Vector loads: every row start aligned to the vector and no thread's group straddling n.
  const bool vector = VEC > 1 && ptr % (sizeof(scalar_t) * VEC) == 0 && (T == 1 || ld % VEC == 0) && n % VEC == 0;

  auto f64 = x.options().dtype(at::kDouble);
  auto i64 = x.options().dtype(at::kLong);
  at::Tensor pi = at::empty({2, splits, n}, i64);
  at::Tensor pd = at::empty({5, splits, n}, f64);
  int64_t* pc = pi.data_ptr<int64_t>();
  double* pf = pd.data_ptr<double>();
  const int64_t sn = splits * n;
  // Firing counts per (feature block, token), each written once (no atomics on the token
  // counters, which every feature block would hit at the same time), summed below.
  at::Tensor l0_part = at::empty({gx, T}, x.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
  auto kernel = vector ? _activation_stats_tf_kernel<true, scalar_t, acc_t, VEC>
                       : _activation_stats_tf_kernel<false, scalar_t, acc_t, VEC>;
  kernel<<<grid, threads, 0, stream>>>(pc, pc + sn, pf, pf + sn, pf + 2 * sn, pf + 3 * sn, pf + 4 * sn,
                                       l0_part.data_ptr<int>(), x.data_ptr<scalar_t>(), T, n, ld, rows_per_split,
                                       threshold_as<acc_t>(threshold));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  _activation_stats_tf_merge_kernel<<<grid_for(n, 256), 256, 0, stream>>>(
      finite_count.data_ptr<int64_t>(), fire_count.data_ptr<int64_t>(), mean.data_ptr<double>(),
      m2.data_ptr<double>(), vmax.data_ptr<double>(), vmin.data_ptr<double>(),
      active_sum.data_ptr<double>(), pc, pc + sn, pf, pf + sn, pf + 2 * sn, pf + 3 * sn,
      pf + 4 * sn, n, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::sum_out(l0, l0_part, {0}, /*keepdim=*/false, at::kLong);
}

}  // namespace

std::vector<at::Tensor> activation_stats_cuda_thread_features(const at::Tensor& x_in, double threshold) {
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

}  // namespace supanalysis
