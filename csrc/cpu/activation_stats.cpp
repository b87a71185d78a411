// Fused activation statistics on the CPU: one read of x, every per-feature moment.
//
// Work split: threads own contiguous ranges of tokens, so x streams through memory in
// order. Each thread walks its range a tile of kTile rows at a time and, within the tile,
// kChunk features at a time (a 128 x 128 sub-tile, 64 KiB in float32). A sub-tile's
// (count, mean, M2, ...) is merged into the thread's float64 state with Chan's formula, and
// the threads' states are merged in thread order at the end. Accumulating a sub-tile in
// float32 and merging in float64 keeps the inner loop vectorisable without the
// cancellation of raw sums.
// The common sub-tile is one pass: deviations from a shift (the feature's mean in the
// thread's previous sub-tile, 0 before there is one) and their squares give the tile's mean
// and M2 (M2 = sum d^2 - (sum d)^2 / n). That is as precise as a two-pass only while the
// tile's mean stays near the shift, so every lane is checked: where n (mean - shift)^2
// exceeds a third of the lane's M2 (a drift, a jump, a first tile of offset values) and
// the squares exceed a quarter of a typical tile's M2 for that feature (see tile_body), its
// group of 8 lanes (4 in float64) takes a second pass, from cache, of deviations from its
// own mean (the corrected two-pass); a lane whose values are all equal is exact either way.
// Pass 1 assumes every value is finite (no masks, plain max/min); the tile's own sums verify
// the assumption, and a tile whose sums are not finite (a NaN or an infinity in a vector
// lane, or an overflow) is redone with the checked step and the two-pass moments. The
// ragged last lanes of a chunk are always checked per element.
// Float32 tiles: a finite value beyond kWide (1e18) could make a deviation's square, or
// a tile's sum of them, overflow float32; a sub-tile whose extrema reach that far takes
// its moments again in float64 (wide_tile), and a shift that large is not used.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace supanalysis {
namespace {

constexpr int64_t kChunk = 128;  // features per work item (one cache-friendly row segment)
constexpr int64_t kTile = 128;   // tokens per tile, accumulated in the compute precision
// Beyond this |value| a float32 tile's sum of kTile squared deviations (each up to
// (2 kWide)^2) could overflow: such sub-tiles are summed in float64 instead.
constexpr float kWide = 1e18f;

// The tile loop is written with GCC vector extensions rather than left to the
// auto-vectoriser: with per-lane selects instead of ifs it is branch-free by construction.
// (Left scalar, `x > threshold` on random data mispredicts half the time: ~15 ns/element.)
// Each tile function is cloned for AVX2 and for the baseline ISA and picked at load time.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <>
struct Lanes<double> {
  typedef double vec __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

// Per-lane tile results: count of finite values, sum, extrema, firing count and sum, and
// the moments about `shift` (the one-pass shift, or the two-pass mean; all in the compute
// precision T): dev = sum of (v - shift), m2 = sum of (v - shift)^2.
template <typename T>
struct TileAcc {
  static constexpr int L = Lanes<T>::L;
  static constexpr int NV = kChunk / L;
  typename Lanes<T>::vec cnt[NV], sum[NV], mx[NV], mn[NV], fire[NV], act[NV], m2[NV], shift[NV], dev[NV];
  // Input with `shift`: the feature's variance over the thread's earlier tiles (0 until it
  // has seen a tile's worth of finite values), which sets the one-pass rounding allowed.
  typename Lanes<T>::vec var[NV];
};

template <typename T>
static inline __attribute__((always_inline)) typename Lanes<T>::vec load(const T* p) {
  typename Lanes<T>::vec v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// x points at the tile's first row and first feature; w <= kChunk features, rows <= kTile.
template <typename T>
static inline __attribute__((always_inline)) void tile_body(const T* __restrict__ x, int64_t rows, int64_t stride,
                                                            int64_t w, T thr, TileAcc<T>* __restrict__ acc,
                                                            int32_t* __restrict__ l0, const T* next) {
  using V = typename Lanes<T>::vec;
  constexpr int L = Lanes<T>::L;
  const int64_t nfull = w / L;        // whole vectors
  const int64_t nv = (w + L - 1) / L;  // vectors including a partial tail
  const V zero = V{} * T(0), one = zero + T(1);
  const V inf = zero + std::numeric_limits<T>::infinity();
  const V th = zero + thr;
  for (int64_t k = 0; k < nv; ++k) {
    acc->cnt[k] = zero, acc->sum[k] = zero, acc->fire[k] = zero, acc->act[k] = zero, acc->m2[k] = zero;
    acc->mx[k] = -inf, acc->mn[k] = inf;
  }
  // Pass 1 (the only read from memory): counts, sums, extrema, firing. Rows go four at a
  // time so each accumulator vector is loaded and stored once per four rows: with one row
  // at a time the loop is bound by accumulator stores, not by reading x.
  auto step = [&](const V v, const V, V& c, V& s, V&, V& hi, V& lo, V& fi, V& a, V& fired)
                  __attribute__((always_inline)) {
    // v - v is 0 exactly for finite v and NaN for NaN and +-Inf: two ops, no abs.
    const auto fin = (v - v) == zero;
    const auto fire = fin & (v > th);
    const V ff = fire ? one : zero;
    const V vf = fin ? v : zero;
    c += fin ? one : zero;
    s += vf;
    // Extrema of the finite values: a non-finite lane offers -inf / +inf, which never wins.
    hi = hi > (fin ? v : -inf) ? hi : (fin ? v : -inf);
    lo = lo < (fin ? v : inf) ? lo : (fin ? v : inf);
    fi += ff;
    a += fire ? v : zero;
    fired += ff;
  };
  // At most L-1 features, last chunk only. `sh`: the fast one-pass step's sums (every
  // value finite, else the tile is redone), deviations from the shift and their squares.
  auto tail = [&](const T* row, bool sh) __attribute__((always_inline)) {
    T nfired = 0;
    for (int64_t j = nfull * L; j < w; ++j) {
      const T v = row[j];
      const int64_t k = j / L, q = j % L;
      const bool fin = std::abs(v) <= std::numeric_limits<T>::max();
      const bool fire = fin && v > thr;
      acc->cnt[k][q] += fin;
      if (sh) {
        const T d = fin ? v - acc->shift[k][q] : T(0);
        acc->sum[k][q] += d;
        acc->m2[k][q] += d * d;
      } else {
        acc->sum[k][q] += fin ? v : T(0);
      }
      if (fin && v > acc->mx[k][q]) acc->mx[k][q] = v;
      if (fin && v < acc->mn[k][q]) acc->mn[k][q] = v;
      acc->fire[k][q] += fire;
      acc->act[k][q] += fire ? v : T(0);
      nfired += fire;
    }
    return nfired;
  };
  auto hsum = [](const V& v) {
    T t = 0;
    for (int q = 0; q < L; ++q) t += v[q];
    return t;
  };
  const bool prefetch = next != nullptr;  // next: the sub-tile after this one (same stride)
  auto pass1 = [&](auto&& st, int32_t* __restrict__ l0o, bool sh) __attribute__((always_inline)) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const T* r0 = x + r * stride;
      const T* r1 = r0 + stride;
      const T* r2 = r1 + stride;
      const T* r3 = r2 + stride;
      V f0 = zero, f1 = zero, f2 = zero, f3 = zero;
      const T* p0 = prefetch ? next + r * stride : nullptr;
      for (int64_t k = 0; k < nfull; ++k) {
        if (prefetch && (k % (64 / (L * sizeof(T)))) == 0) {  // one per cache line
          __builtin_prefetch(p0 + k * L);
          __builtin_prefetch(p0 + stride + k * L);
          __builtin_prefetch(p0 + 2 * stride + k * L);
          __builtin_prefetch(p0 + 3 * stride + k * L);
        }
        V c = acc->cnt[k], s = acc->sum[k], q = acc->m2[k], hi = acc->mx[k], lo = acc->mn[k], fi = acc->fire[k],
          a = acc->act[k];
        const V m = acc->shift[k];
        st(load(r0 + k * L), m, c, s, q, hi, lo, fi, a, f0);
        st(load(r1 + k * L), m, c, s, q, hi, lo, fi, a, f1);
        st(load(r2 + k * L), m, c, s, q, hi, lo, fi, a, f2);
        st(load(r3 + k * L), m, c, s, q, hi, lo, fi, a, f3);
        acc->cnt[k] = c, acc->sum[k] = s, acc->m2[k] = q, acc->mx[k] = hi, acc->mn[k] = lo, acc->fire[k] = fi,
        acc->act[k] = a;
      }
      l0o[r] += static_cast<int32_t>(hsum(f0) + tail(r0, sh));
      l0o[r + 1] += static_cast<int32_t>(hsum(f1) + tail(r1, sh));
      l0o[r + 2] += static_cast<int32_t>(hsum(f2) + tail(r2, sh));
      l0o[r + 3] += static_cast<int32_t>(hsum(f3) + tail(r3, sh));
    }
    for (; r < rows; ++r) {
      const T* row = x + r * stride;
      V fired = zero;
      for (int64_t k = 0; k < nfull; ++k) {
        V c = acc->cnt[k], s = acc->sum[k], q = acc->m2[k], hi = acc->mx[k], lo = acc->mn[k], fi = acc->fire[k],
          a = acc->act[k];
        st(load(row + k * L), acc->shift[k], c, s, q, hi, lo, fi, a, fired);
        acc->cnt[k] = c, acc->sum[k] = s, acc->m2[k] = q, acc->mx[k] = hi, acc->mn[k] = lo, acc->fire[k] = fi,
        acc->act[k] = a;
      }
      l0o[r] += static_cast<int32_t>(hsum(fired) + tail(row, sh));
    }
  };
  // Fast pass 1 assumes every value is finite (the common case): no finiteness masks, and
  // the extrema are plain max/min. The tile's sums then prove it: a NaN or an infinity
  // anywhere makes its lane's sum non-finite, and the tile is redone with the checked step.
  // It sums deviations from the caller's shift and their squares (checked below), where
  // the checked step sums the values for pass 2. (The two steps share one signature.)
  auto fast = [&](const V v, const V m, V&, V& s, V& q, V& hi, V& lo, V& fi, V& a, V& fired)
                  __attribute__((always_inline)) {
    const auto fire = v > th;
    const V ff = fire ? one : zero;
    const V d = v - m;
    s += d;
    q += d * d;
    hi = hi > v ? hi : v;
    lo = lo < v ? lo : v;
    fi += ff;
    a += fire ? v : zero;
    fired += ff;
  };
  int32_t l0_fast[kTile] = {};
  pass1(fast, l0_fast, true);
  bool finite = true;
  for (int64_t k = 0; k < nv; ++k) {  // the ragged lanes too: v - shift may overflow there
    const auto ok = (acc->sum[k] - acc->sum[k]) == zero;
    for (int q = 0; q < L; ++q) finite &= ok[q] != 0;
  }
  if (finite) {
    for (int64_t k = 0; k < nfull; ++k) acc->cnt[k] = zero + static_cast<T>(rows);
    for (int64_t r = 0; r < rows; ++r) l0[r] += l0_fast[r];
  } else {
    for (int64_t k = 0; k < nv; ++k) {
      acc->cnt[k] = zero, acc->sum[k] = zero, acc->fire[k] = zero, acc->act[k] = zero, acc->m2[k] = zero;
      acc->mx[k] = -inf, acc->mn[k] = inf;
    }
    pass1(step, l0, false);
  }
  V* mean = acc->shift;
  int64_t redo[TileAcc<T>::NV];  // the vectors pass 2 recomputes
  int64_t nredo = 0;
  if (finite) {
    // A lane keeps its one-pass moments where their rounding (~ float32 ulps of q = sum d^2)
    // is small: within a third of a two-pass's (~ ulps of M2 = q - s^2 / n), i.e.
    // n (mean - shift)^2 = s^2 / n at most M2 / 3, 4 s^2 <= n q; or within a quarter of
    // what a two-pass costs a tile of this feature on average, q <= n var / 4 (a sparse
    // feature's quiet tile after a busy one: its own M2 is tiny, the feature's is not;
    // summed over tiles, at most a quarter more rounding than two passes); and q finite. A
    // constant lane is exact whatever its shift: mean = its value, M2 = 0.
    const V quarter = zero + T(0.25);
    for (int64_t k = 0; k < nv; ++k) {
      const V sd = acc->sum[k], q = acc->m2[k], n = acc->cnt[k];
      const auto flat = acc->mx[k] == acc->mn[k];
      const auto near = (sd * sd * T(4) <= n * q) | (q <= n * acc->var[k] * quarter);
      const auto ok = flat | (((q - q) == zero) & near);
      bool all = true;
      for (int l = 0; l < L; ++l) all &= ok[l] != 0;
      acc->shift[k] = flat ? acc->mx[k] : acc->shift[k];
      acc->dev[k] = flat ? zero : sd;
      acc->m2[k] = flat ? zero : q;
      if (!all) {  // pass 2 for this vector, about the one-pass mean shift + sum d / n
        const V cn = acc->cnt[k] > zero ? acc->cnt[k] : one;
        mean[k] = acc->cnt[k] > zero ? acc->shift[k] + acc->dev[k] / cn : zero;
        acc->m2[k] = zero, acc->dev[k] = zero;
        redo[nredo++] = k;
      }
    }
    if (nredo == 0) return;
  } else {
    for (int64_t k = 0; k < nv; ++k) {
      mean[k] = acc->cnt[k] > zero ? acc->sum[k] / (acc->cnt[k] > zero ? acc->cnt[k] : one) : zero;
      acc->dev[k] = zero;
      redo[nredo++] = k;
    }
  }
  // Pass 2 (from cache): deviations from the pass-1 mean. Their sum corrects that mean,
  // whose float32 rounding (up to ~kTile ulp of |mean|) would otherwise pass into every
  // Chan merge: with a mean 2,000 standard deviations from 0 it cost 1e-4 of M2.
  const bool ragged = nredo > 0 && redo[nredo - 1] == nfull && nfull < nv;  // the partial vector
  const int64_t nvec = ragged ? nredo - 1 : nredo;
  for (int64_t r2 = 0; r2 < rows; r2 += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - r2);
    const T* row = x + r2 * stride;
    for (int64_t t = 0; t < nvec; ++t) {
      const int64_t k = redo[t];
      V m2 = acc->m2[k], dev = acc->dev[k];
      for (int64_t i = 0; i < nr; ++i) {
        const V v = load(row + i * stride + k * L);
        const V d = (v - v) == zero ? v - mean[k] : zero;  // finite lanes only (see pass 1)
        dev += d;
        m2 += d * d;
      }
      acc->m2[k] = m2, acc->dev[k] = dev;
    }
    if (!ragged) continue;
    for (int64_t i = 0; i < nr; ++i) {
      for (int64_t j = nfull * L; j < w; ++j) {
        const T v = row[i * stride + j];
        const int64_t k = j / L, q = j % L;
        const T d = std::abs(v) <= std::numeric_limits<T>::max() ? v - mean[k][q] : T(0);
        acc->dev[k][q] += d;
        acc->m2[k][q] += d * d;
      }
    }
  }
}

SUPANALYSIS_TARGET_CLONES void tile_f32(const float* x, int64_t rows, int64_t stride,
                                                                 int64_t w, float thr, TileAcc<float>* acc,
                                                                 int32_t* l0, const float* next) {
  tile_body<float>(x, rows, stride, w, thr, acc, l0, next);
}

SUPANALYSIS_TARGET_CLONES void tile_f64(const double* x, int64_t rows, int64_t stride,
                                                                 int64_t w, double thr, TileAcc<double>* acc,
                                                                 int32_t* l0, const double* next) {
  tile_body<double>(x, rows, stride, w, thr, acc, l0, next);
}

inline void run_tile(const float* x, int64_t rows, int64_t stride, int64_t w, double thr, TileAcc<float>* acc,
                     int32_t* l0, float*, const float* next) {
  tile_f32(x, rows, stride, w, threshold_f32(thr), acc, l0, next);
}
inline void run_tile(const double* x, int64_t rows, int64_t stride, int64_t w, double thr, TileAcc<double>* acc,
                     int32_t* l0, float*, const double* next) {
  tile_f64(x, rows, stride, w, thr, acc, l0, next);
}
// Half and bfloat16: widen the tile once into a float buffer (eight values per step, by
// bit arithmetic, so it vectorises on any ISA), then the float path.
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) f32x8 bits_to_float(u32x8 b) {
  f32x8 f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
static inline __attribute__((always_inline)) u32x8 float_to_bits(f32x8 f) {
  u32x8 b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
// bfloat16 is the top half of a float32.
static inline __attribute__((always_inline)) f32x8 widen8(u16x8 h, c10::BFloat16*) {
  return bits_to_float(__builtin_convertvector(h, u32x8) << 16);
}
// IEEE half: the exponent is rebiased by a multiply (which also carries Inf and NaN), and
// subnormals come from a float subtraction; exact for every half value.
static inline __attribute__((always_inline)) f32x8 widen8(u16x8 h, c10::Half*) {
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  const u32x8 sign = w & 0x80000000u;
  const u32x8 two_w = w + w;
  const f32x8 normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f32x8 subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const auto tiny = two_w < (1u << 27);
  return bits_to_float(sign | (tiny ? float_to_bits(subnormal) : float_to_bits(normal)));
}

template <typename H>
static inline __attribute__((always_inline)) void widen_tile(const H* __restrict__ x, int64_t rows, int64_t stride,
                                                             int64_t w, float* __restrict__ buf, const H* next) {
  for (int64_t r = 0; r < rows; ++r) {
    const H* row = x + r * stride;
    if (next != nullptr)  // as in tile_body: the next sub-tile's rows are pages apart
      for (int64_t j = 0; j < w; j += 64 / sizeof(H)) __builtin_prefetch(next + r * stride + j);
    int64_t j = 0;
    for (; j + 8 <= w; j += 8) {
      u16x8 h;
      std::memcpy(&h, row + j, sizeof h);
      const f32x8 f = widen8(h, static_cast<H*>(nullptr));
      std::memcpy(buf + r * kChunk + j, &f, sizeof f);
    }
    for (; j < w; ++j) buf[r * kChunk + j] = static_cast<float>(row[j]);
  }
}
SUPANALYSIS_TARGET_CLONES void widen_bf16(const c10::BFloat16* x, int64_t rows, int64_t stride, int64_t w,
                                          float* buf, const c10::BFloat16* next) {
  widen_tile(x, rows, stride, w, buf, next);
}
SUPANALYSIS_TARGET_CLONES void widen_f16(const c10::Half* x, int64_t rows, int64_t stride, int64_t w, float* buf,
                                         const c10::Half* next) {
  widen_tile(x, rows, stride, w, buf, next);
}

template <typename H>
inline void run_tile(const H* x, int64_t rows, int64_t stride, int64_t w, double thr, TileAcc<float>* acc,
                     int32_t* l0, float* buf, const H* next) {
  if constexpr (std::is_same_v<H, c10::BFloat16>)
    widen_bf16(x, rows, stride, w, buf, next);
  else
    widen_f16(x, rows, stride, w, buf, next);
  tile_f32(buf, rows, kChunk, w, threshold_f32(thr), acc, l0, nullptr);
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Running float64 state of one thread for every feature; merged across threads at the end.
// Counts are float64 too (exact below 2^53) so that the merge below is one vector loop.
// `last`: the mean of the feature's last sub-tile with a finite value (the next one-pass
// shift; it follows a drifting feature where the running mean lags).
struct State {
  std::vector<double> cnt, fire, mean, m2, mx, mn, act, last;
  explicit State(int64_t n)
      : cnt(n, 0.0),
        fire(n, 0.0),
        mean(n, 0.0),
        m2(n, 0.0),
        mx(n, -INFINITY),
        mn(n, INFINITY),
        act(n, 0.0),
        last(n, 0.0) {}
};

// Chan merge of w features' partial moments into st[f0, f0 + w), branch-free so that it
// vectorises (it runs once per sub-tile: as a scalar loop it cost ~10% of the kernel). With
// `Corrected` the partials are a tile's corrected two-pass sums (mean = shift + dev / n,
// M2 = m2 - dev^2 / n); without, another state's mean and M2.
template <bool Corrected, typename S>
static inline __attribute__((always_inline)) void merge_body(State& st, int64_t f0, int64_t w, const S* cnt,
                                                             const S* mean, const S* dev, const S* m2, const S* mx,
                                                             const S* mn, const S* fire, const S* act) {
  double* __restrict__ c = st.cnt.data() + f0;
  double* __restrict__ mu = st.mean.data() + f0;
  double* __restrict__ q = st.m2.data() + f0;
  double* __restrict__ hi = st.mx.data() + f0;
  double* __restrict__ lo = st.mn.data() + f0;
  double* __restrict__ fi = st.fire.data() + f0;
  double* __restrict__ ac = st.act.data() + f0;
  double* __restrict__ last = st.last.data() + f0;
  for (int64_t j = 0; j < w; ++j) {
    const double nb = static_cast<double>(cnt[j]);
    const bool live = nb > 0.0;
    double mb = static_cast<double>(mean[j]), m2b = static_cast<double>(m2[j]);
    if constexpr (Corrected) {
      const double d = static_cast<double>(dev[j]);
      const double inv = 1.0 / (live ? nb : 1.0);
      mb += d * inv;
      // Clamped: for a constant feature m2 and dev^2 / n are both ~0 and may round apart.
      m2b = std::max(0.0, m2b - d * d * inv);
    }
    const double na = c[j], nab = na + nb;
    const double wb = nb / (live ? nab : 1.0);
    const double delta = mb - mu[j];
    mu[j] = live ? mu[j] + delta * wb : mu[j];
    // delta * (delta * (na * wb)): 0 into an empty state even where delta^2 would overflow.
    q[j] = live ? q[j] + m2b + delta * (delta * (na * wb)) : q[j];
    if constexpr (Corrected) last[j] = live ? mb : last[j];
    c[j] = nab;
    hi[j] = std::max(hi[j], static_cast<double>(mx[j]));
    lo[j] = std::min(lo[j], static_cast<double>(mn[j]));
    fi[j] += static_cast<double>(fire[j]);
    ac[j] += static_cast<double>(act[j]);
  }
}
template <typename T>
static inline const T* lanes(const typename Lanes<T>::vec* v) {
  return reinterpret_cast<const T*>(v);  // a vector is an array of its lanes
}
template <typename T>
static inline __attribute__((always_inline)) void merge_tile_body(State& st, int64_t f0, int64_t w,
                                                                  const TileAcc<T>& a) {
  merge_body<true>(st, f0, w, lanes<T>(a.cnt), lanes<T>(a.shift), lanes<T>(a.dev), lanes<T>(a.m2), lanes<T>(a.mx),
                   lanes<T>(a.mn), lanes<T>(a.fire), lanes<T>(a.act));
}
SUPANALYSIS_TARGET_CLONES void merge_tile(State& st, int64_t f0, int64_t w, const TileAcc<float>& a) {
  merge_tile_body(st, f0, w, a);
}
SUPANALYSIS_TARGET_CLONES void merge_tile(State& st, int64_t f0, int64_t w, const TileAcc<double>& a) {
  merge_tile_body(st, f0, w, a);
}
// The largest |finite value| of a float32 sub-tile's lanes, from its extrema (-inf when
// the sub-tile has no finite value).
inline float tile_reach(const TileAcc<float>& a, int64_t w) {
  const float* mx = lanes<float>(a.mx);
  const float* mn = lanes<float>(a.mn);
  float reach = -INFINITY;
  for (int64_t j = 0; j < w; ++j) {
    const float r = mx[j] > -mn[j] ? mx[j] : -mn[j];
    reach = r > reach ? r : reach;
  }
  return reach;
}

// A float32 sub-tile with values beyond kWide: count, mean, M2 (two passes) and the firing
// sum again in float64 from x, then the Chan merge; extrema, firing counts and L0 are the
// tile's own (comparisons, exact in float32).
template <typename scalar_t>
void wide_tile(State& st, const scalar_t* x, int64_t rows, int64_t stride, int64_t f0, int64_t w, double thr,
               const TileAcc<float>& a) {
  double cnt[kChunk], mean[kChunk], dev[kChunk], m2[kChunk], act[kChunk], mx[kChunk], mn[kChunk], fire[kChunk];
  for (int64_t j = 0; j < w; ++j) {
    double c = 0.0, s = 0.0, ac = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const double v = static_cast<double>(x[r * stride + j]);
      const bool fin = std::isfinite(v);
      c += fin;
      s += fin ? v : 0.0;
      ac += fin && v > thr ? v : 0.0;
    }
    const double mu = c > 0.0 ? s / c : 0.0;
    double d_sum = 0.0, q = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const double v = static_cast<double>(x[r * stride + j]);
      const double d = std::isfinite(v) ? v - mu : 0.0;
      d_sum += d;
      q += d * d;
    }
    cnt[j] = c, mean[j] = mu, dev[j] = d_sum, m2[j] = q, act[j] = ac;
    mx[j] = lanes<float>(a.mx)[j], mn[j] = lanes<float>(a.mn)[j], fire[j] = lanes<float>(a.fire)[j];
  }
  merge_body<true>(st, f0, w, cnt, mean, dev, m2, mx, mn, fire, act);
}

SUPANALYSIS_TARGET_CLONES void merge_state(State& st, const State& o) {
  merge_body<false>(st, 0, static_cast<int64_t>(st.cnt.size()), o.cnt.data(), o.mean.data(),
                    static_cast<const double*>(nullptr), o.m2.data(), o.mx.data(), o.mn.data(), o.fire.data(),
                    o.act.data());
}

template <typename scalar_t>
void stats_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t n, int64_t row_stride, double threshold,
                  int64_t* finite_count, int64_t* fire_count, double* mean, double* m2, double* vmax, double* vmin,
                  double* active_sum, int32_t* l0) {
  using acc_t = acc_type_t<scalar_t>;
  // Threads own contiguous token ranges (so x is streamed in memory order, a tile of
  // kTile rows at a time, chunk by chunk while the tile is in cache) and private float64
  // states, merged in thread order: deterministic for a given thread count.
#ifdef _OPENMP
  const int P = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), (T + kTile - 1) / kTile)));
#else
  const int P = 1;
#endif
  std::vector<State> states;
  states.reserve(P);
  for (int p = 0; p < P; ++p) states.emplace_back(n);
  const int64_t tiles = (T + kTile - 1) / kTile;
#pragma omp parallel num_threads(P)
  {
#ifdef _OPENMP
    // The team the runtime gave, which may be smaller than asked for (OMP_DYNAMIC, a
    // thread limit, a nested region): the tiles are split over the threads that exist.
    const int p = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int p = 0, team = 1;
#endif
    State& st = states[p];
    TileAcc<acc_t> acc;
    std::vector<float> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kTile * kChunk);
    const int64_t tile_begin = tiles * p / team, tile_end = tiles * (p + 1) / team;
    for (int64_t tt = tile_begin; tt < tile_end; ++tt) {
      const int64_t t0 = tt * kTile;
      const int64_t rows = std::min(kTile, T - t0);
      for (int64_t f0 = 0; f0 < n; f0 += kChunk) {
        const int64_t w = std::min(kChunk, n - f0);
        // Prefetch the next sub-tile (the next chunk of these rows, else the next tile's
        // first chunk) while this one is read. Its rows are a row stride apart (16 KiB at
        // n = 4096), so every row segment starts a new page, where the hardware's stream
        // prefetcher stops: without this the loop waits on memory (125 ms -> 70 ms at
        // 65,536 x 4,096 float32). A prefetch never faults, so the partial last chunk needs
        // no care; the rows beyond T do not exist, so the final tile prefetches nothing.
        const bool last_chunk = f0 + kChunk >= n;
        const scalar_t* next = !last_chunk             ? x + t0 * row_stride + f0 + kChunk
                               : t0 + kTile + rows <= T ? x + (t0 + kTile) * row_stride
                                                        : nullptr;
        // The one-pass shift: the feature's mean in this thread's previous sub-tile, 0
        // before there is one; and its variance so far (tile_body checks, lane by lane,
        // that the shift is close enough).
        // (Through lane pointers and an unconditional division, so the loop vectorises.)
        acc_t* __restrict__ shift = reinterpret_cast<acc_t*>(acc.shift);
        acc_t* __restrict__ var = reinterpret_cast<acc_t*>(acc.var);
        for (int64_t j = 0; j < w; ++j) {
          const double c = st.cnt[f0 + j], v = st.m2[f0 + j] / std::max(c, 1.0);
          const double last = st.last[f0 + j];
          // After a wide sub-tile its mean would be a shift whose deviations overflow.
          shift[j] = static_cast<acc_t>(std::is_same_v<acc_t, float> && std::abs(last) > kWide ? 0.0 : last);
          var[j] = static_cast<acc_t>(c >= kTile ? v : 0.0);
        }
        const scalar_t* sub = x + t0 * row_stride + f0;
        run_tile(sub, rows, row_stride, w, threshold, &acc, l0 + t0, buf.data(), next);
        if constexpr (std::is_same_v<acc_t, float>) {
          if (tile_reach(acc, w) > kWide) {
            wide_tile(st, sub, rows, row_stride, f0, w, threshold, acc);
            continue;
          }
        }
        merge_tile(st, f0, w, acc);
      }
    }
  }
  State& out = states[0];
  for (int p = 1; p < P; ++p) merge_state(out, states[p]);
  auto to_count = [](double v) { return static_cast<int64_t>(v); };
  std::transform(out.cnt.begin(), out.cnt.end(), finite_count, to_count);
  std::transform(out.fire.begin(), out.fire.end(), fire_count, to_count);
  std::copy(out.mean.begin(), out.mean.end(), mean);
  std::copy(out.m2.begin(), out.m2.end(), m2);
  std::copy(out.mx.begin(), out.mx.end(), vmax);
  std::copy(out.mn.begin(), out.mn.end(), vmin);
  std::copy(out.act.begin(), out.act.end(), active_sum);
}

}  // namespace

std::vector<at::Tensor> activation_stats_cpu(const at::Tensor& x_in, double threshold) {
  TORCH_CHECK(x_in.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D [tokens, features], got ", x_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be floating point, got ",
              x_in.scalar_type());
  // Rows may be strided (a slice of a wider activation); features must be contiguous.
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  auto f64 = x.options().dtype(at::kDouble);
  auto i64 = x.options().dtype(at::kLong);
  at::Tensor finite_count = at::zeros({n}, i64), fire_count = at::zeros({n}, i64);
  at::Tensor mean = at::zeros({n}, f64), m2 = at::zeros({n}, f64);
  at::Tensor vmax = at::full({n}, -std::numeric_limits<double>::infinity(), f64);
  at::Tensor vmin = at::full({n}, std::numeric_limits<double>::infinity(), f64);
  at::Tensor active_sum = at::zeros({n}, f64);
  at::Tensor l0_32 = at::zeros({T}, x.options().dtype(at::kInt));
  if (T > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_stats_cpu", [&] {
      stats_kernel<scalar_t>(x.data_ptr<scalar_t>(), T, n, x.stride(0), threshold, finite_count.data_ptr<int64_t>(),
                             fire_count.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>(),
                             vmax.data_ptr<double>(), vmin.data_ptr<double>(), active_sum.data_ptr<double>(),
                             l0_32.data_ptr<int32_t>());
    });
  }
  at::Tensor l0 = l0_32.to(at::kLong);
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

// Sparse codes: every (token, feature) pair not listed is an implicit 0. Tokens are split
// over threads, each with private per-feature accumulators (no atomics, so frequent
// features cause no contention), merged in thread order. Two passes over the codes (which
// are small: T*k, not T*n): the first gives the mean, the second the centred M2, to which
// the implicit zeros add (count_zero * mean^2) in closed form.
std::vector<at::Tensor> activation_stats_sparse_cpu(const at::Tensor& indices_in,
                                                    const at::Tensor& values_in, int64_t n,
                                                    double threshold) {
  TORCH_CHECK(indices_in.device().is_cpu() && values_in.device().is_cpu(),
              "indices and values must be CPU tensors");
  TORCH_CHECK(indices_in.dim() == 2 && values_in.dim() == 2 && indices_in.sizes() == values_in.sizes(),
              "indices and values must both be [tokens, k] with the same shape");
  TORCH_CHECK(n >= 0, "n must be non-negative");
  const at::Tensor idx = indices_in.to(at::kLong).contiguous();
  const at::Tensor val = values_in.to(at::kDouble).contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const double* vp = val.data_ptr<double>();
  for (int64_t e = 0; e < T * k; ++e)
    TORCH_CHECK(ip[e] >= -1 && ip[e] < n, "indices must be in [-1, n), found ", ip[e]);

#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Private accumulators: present (finite listed entries), nonfinite, sum, fire, act, max, min.
  std::vector<int64_t> present(threads * n, 0), nonfin(threads * n, 0), fire(threads * n, 0);
  std::vector<double> sum(threads * n, 0.0), act(threads * n, 0.0);
  std::vector<double> mx(threads * n, -INFINITY), mn(threads * n, INFINITY);
  at::Tensor l0 = at::zeros({T}, idx.options());
  int64_t* l0p = l0.data_ptr<int64_t>();
  const bool zero_fires = 0.0 > threshold;

#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num();
#else
    const int64_t tid = 0;
#endif
    int64_t* P = present.data() + tid * n;
    int64_t* NF = nonfin.data() + tid * n;
    int64_t* F = fire.data() + tid * n;
    double* S = sum.data() + tid * n;
    double* A = act.data() + tid * n;
    double* MX = mx.data() + tid * n;
    double* MN = mn.data() + tid * n;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      int64_t listed = 0, fired = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = ip[t * k + j];
        if (f < 0) continue;
        ++listed;
        const double v = vp[t * k + j];
        if (!std::isfinite(v)) {
          ++NF[f];
          continue;
        }
        ++P[f];
        S[f] += v;
        MX[f] = std::max(MX[f], v);
        MN[f] = std::min(MN[f], v);
        if (v > threshold) {
          ++F[f];
          A[f] += v;
          ++fired;
        }
      }
      l0p[t] = fired + (zero_fires ? n - listed : 0);
    }
  }
  auto f64 = idx.options().dtype(at::kDouble);
  at::Tensor finite_count = at::empty({n}, idx.options()), fire_count = at::empty({n}, idx.options());
  at::Tensor mean = at::empty({n}, f64), m2 = at::zeros({n}, f64), vmax = at::empty({n}, f64),
             vmin = at::empty({n}, f64), active_sum = at::empty({n}, f64);
  int64_t* fc = finite_count.data_ptr<int64_t>();
  int64_t* fi = fire_count.data_ptr<int64_t>();
  double *me = mean.data_ptr<double>(), *m2p = m2.data_ptr<double>(), *mxp = vmax.data_ptr<double>(),
         *mnp = vmin.data_ptr<double>(), *ac = active_sum.data_ptr<double>();
  std::vector<int64_t> listed_finite(n);
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f) {
      int64_t p = 0, nf = 0, fr = 0;
      double s = 0, a = 0, hi = -INFINITY, lo = INFINITY;
      for (int th = 0; th < threads; ++th) {
        const int64_t o = th * n + f;
        p += present[o];
        nf += nonfin[o];
        fr += fire[o];
        s += sum[o];
        a += act[o];
        hi = std::max(hi, mx[o]);
        lo = std::min(lo, mn[o]);
      }
      const int64_t zeros = T - p - nf;  // implicit (unlisted) zeros
      listed_finite[f] = p;
      fc[f] = T - nf;
      fi[f] = fr + (zero_fires ? zeros : 0);
      me[f] = fc[f] > 0 ? s / static_cast<double>(fc[f]) : 0.0;
      ac[f] = a;
      if (zeros > 0) {
        hi = std::max(hi, 0.0);
        lo = std::min(lo, 0.0);
      }
      mxp[f] = hi;
      mnp[f] = lo;
      m2p[f] = static_cast<double>(zeros) * me[f] * me[f];
    }
  });
  // Second pass: centred squares of the listed finite entries. Serial over tokens keeps
  // the float64 sum order fixed; the codes are T*k values, cheap next to the dense path.
  for (int64_t e = 0; e < T * k; ++e) {
    const int64_t f = ip[e];
    if (f < 0) continue;
    const double v = vp[e];
    if (!std::isfinite(v)) continue;
    const double d = v - me[f];
    m2p[f] += d * d;
  }
  return {finite_count, fire_count, mean, m2, vmax, vmin, active_sum, l0};
}

}  // namespace supanalysis
