// Feature interference on the CPU, tile by tile, never holding the n x n Gram matrix.
//
// Each tile of cosines G = Ŵ[rows] Ŵ[cols]^T goes through ATen's BLAS; the epilogue
// (sum of squares weighted by the partner's squared norm, sum of squared cosines, running
// max |cos| and argmax, running top-k) runs over the tile while it is still in cache.
// Without V the Gram matrix is symmetric: each off-diagonal tile is computed once and feeds
// both its rows' and its columns' accumulators, halving the GEMM work.
//
// Partners are met in increasing index order for every feature (column-pass tiles of
// earlier row blocks first, then this block's row-pass tiles left to right), and running
// maxima only move on a strict increase, so ties go to the smallest index.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include <ATen/ATen.h>

#include "ops.h"

namespace supanalysis {
namespace {

// Top-k of |cos| per feature kept as k unsorted slots and the position of the weakest;
// replacing the weakest costs O(k), and after warm-up almost every candidate is rejected
// by a single compare.
template <typename acc_t>
struct TopK {
  int64_t k;
  acc_t* val;      // [n, k] |cos|
  acc_t* sval;     // [n, k] signed cos
  int64_t* idx;    // [n, k] partner, -1 = empty
  int64_t* worst;  // [n] slot holding the smallest |cos|

  inline void offer(int64_t i, acc_t a, acc_t s, int64_t j) {
    acc_t* v = val + i * k;
    int64_t w = worst[i];
    if (!(a > v[w])) return;
    v[w] = a;
    sval[i * k + w] = s;
    idx[i * k + w] = j;
    int64_t nw = 0;
    for (int64_t q = 1; q < k; ++q)
      if (v[q] < v[nw]) nw = q;
    worst[i] = nw;
  }
};

template <typename acc_t>
struct RowAcc {
  double* sq;
  double* sqcos;
  acc_t* maxabs;
  int64_t* argmax;
};

// Rows r of tile G [R, C] (global rows r0.., global cols c0..) update their own accumulators.
template <typename acc_t>
void row_epilogue(const acc_t* G, int64_t R, int64_t C, int64_t r0, int64_t c0,
                  const double* col_nsq, bool diagonal, RowAcc<acc_t> acc, TopK<acc_t>* top) {
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t i = r0 + r;
      const acc_t* g = G + r * C;
      double sq = 0, sqc = 0;
      acc_t best = acc.maxabs[i];
      int64_t arg = acc.argmax[i];
      for (int64_t c = 0; c < C; ++c) {
        const int64_t j = c0 + c;
        if (diagonal && j == i) continue;
        const acc_t cs = g[c];
        const double c2 = static_cast<double>(cs) * static_cast<double>(cs);
        sq += c2 * col_nsq[j];
        sqc += c2;
        const acc_t a = std::abs(cs);
        if (a > best) {
          best = a;
          arg = j;
        }
        if (top) top->offer(i, a, cs, j);
      }
      acc.sq[i] += sq;
      acc.sqcos[i] += sqc;
      acc.maxabs[i] = best;
      acc.argmax[i] = arg;
    }
  });
}

// Columns of an off-diagonal tile update the column features' accumulators (symmetry).
// Threads own disjoint column ranges and walk the rows in order, so the inner loop is
// contiguous and partners arrive in increasing row index.
template <typename acc_t>
void col_epilogue(const acc_t* G, int64_t R, int64_t C, int64_t r0, int64_t c0,
                  const double* row_nsq, RowAcc<acc_t> acc, TopK<acc_t>* top) {
  at::parallel_for(0, C, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = r0 + r;
      const acc_t* g = G + r * C;
      const double w = row_nsq[i];
      for (int64_t c = b; c < e; ++c) {
        const int64_t j = c0 + c;
        const acc_t cs = g[c];
        const double c2 = static_cast<double>(cs) * static_cast<double>(cs);
        acc.sq[j] += c2 * w;
        acc.sqcos[j] += c2;
        const acc_t a = std::abs(cs);
        if (a > acc.maxabs[j]) {
          acc.maxabs[j] = a;
          acc.argmax[j] = i;
        }
        if (top) top->offer(j, a, cs, i);
      }
    }
  });
}

// Row norms in float64 and the unit rows in the compute dtype (zero rows stay zero), one
// row at a time: no float64 copy of X, so the only O(n·m) extra memory is the unit rows.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> normalise(const at::Tensor& X) {
  const int64_t n = X.size(0), m = X.size(1);
  at::Tensor nrm = at::empty({n}, X.options().dtype(at::kDouble));
  at::Tensor unit = at::empty({n, m}, X.options());
  const acc_t* x = X.data_ptr<acc_t>();
  acc_t* u = unit.data_ptr<acc_t>();
  double* r = nrm.data_ptr<double>();
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const acc_t* xi = x + i * m;
      double ss = 0.0;
      for (int64_t j = 0; j < m; ++j) ss += static_cast<double>(xi[j]) * static_cast<double>(xi[j]);
      r[i] = std::sqrt(ss);
      const double inv = r[i] > 0 ? 1.0 / r[i] : 0.0;
      for (int64_t j = 0; j < m; ++j) u[i * m + j] = static_cast<acc_t>(static_cast<double>(xi[j]) * inv);
    }
  });
  return {nrm, unit};
}

template <typename acc_t>
std::vector<at::Tensor> run(const at::Tensor& W, const std::optional<at::Tensor>& V, int64_t topk,
                            int64_t block) {
  const int64_t n = W.size(0);
  auto [w_norm, Wn] = normalise<acc_t>(W);
  at::Tensor w_nsq = w_norm.pow(2).contiguous();
  at::Tensor Vn, v_nsq;
  int64_t nv = n;
  if (V) {
    auto [v_norm, vunit] = normalise<acc_t>(*V);
    Vn = vunit;
    v_nsq = v_norm.pow(2).contiguous();
    nv = V->size(0);
  }
  auto f64 = W.options().dtype(at::kDouble);
  auto i64 = W.options().dtype(at::kLong);
  at::Tensor sq = at::zeros({n}, f64), sqcos = at::zeros({n}, f64);
  at::Tensor maxabs = at::zeros({n}, W.options());
  at::Tensor argmax = at::full({n}, -1, i64);
  at::Tensor tk_val = at::zeros({n, topk}, W.options()), tk_cos = at::zeros({n, topk}, W.options());
  at::Tensor tk_idx = at::full({n, topk}, -1, i64), tk_worst = at::zeros({n}, i64);
  RowAcc<acc_t> acc{sq.data_ptr<double>(), sqcos.data_ptr<double>(), maxabs.data_ptr<acc_t>(),
                    argmax.data_ptr<int64_t>()};
  TopK<acc_t> top{topk, tk_val.data_ptr<acc_t>(), tk_cos.data_ptr<acc_t>(),
                  tk_idx.data_ptr<int64_t>(), tk_worst.data_ptr<int64_t>()};
  TopK<acc_t>* topp = topk > 0 ? &top : nullptr;

  const int64_t B = block > 0 ? block : 1024;
  for (int64_t r0 = 0; r0 < n; r0 += B) {
    const int64_t R = std::min(B, n - r0);
    const at::Tensor rows = Wn.narrow(0, r0, R);
    const int64_t c_start = V ? 0 : r0;  // symmetric: only tiles on or above the diagonal
    for (int64_t c0 = c_start; c0 < nv; c0 += B) {
      const int64_t C = std::min(B, nv - c0);
      const at::Tensor cols = (V ? Vn : Wn).narrow(0, c0, C);
      const at::Tensor G = at::mm(rows, cols.t()).contiguous();
      const acc_t* g = G.data_ptr<acc_t>();
      const double* col_nsq = (V ? v_nsq : w_nsq).data_ptr<double>();
      if (!V && c0 != r0) {
        // Column features first: their partners in this row block precede (in index
        // order) the partners they meet later in their own row pass.
        col_epilogue<acc_t>(g, R, C, r0, c0, w_nsq.data_ptr<double>(), acc, topp);
      }
      row_epilogue<acc_t>(g, R, C, r0, c0, col_nsq, !V && c0 == r0, acc, topp);
    }
  }

  // Order each feature's top-k by decreasing |cos|, ties by index; empty slots last.
  if (topk > 0) {
    acc_t* tv = tk_val.data_ptr<acc_t>();
    acc_t* tc = tk_cos.data_ptr<acc_t>();
    int64_t* ti = tk_idx.data_ptr<int64_t>();
    at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
      std::vector<int64_t> order(topk);
      std::vector<acc_t> c(topk);
      std::vector<int64_t> ix(topk);
      for (int64_t i = b; i < e; ++i) {
        std::iota(order.begin(), order.end(), 0);
        const acc_t* v = tv + i * topk;
        const int64_t* id = ti + i * topk;
        std::sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
          if ((id[p] < 0) != (id[q] < 0)) return id[q] < 0;
          if (v[p] != v[q]) return v[p] > v[q];
          return id[p] < id[q];
        });
        for (int64_t q = 0; q < topk; ++q) {
          c[q] = tc[i * topk + order[q]];
          ix[q] = id[order[q]];
        }
        std::copy(c.begin(), c.end(), tc + i * topk);
        std::copy(ix.begin(), ix.end(), ti + i * topk);
      }
    });
  }

  at::Tensor dims;
  if (!V) {
    // D_i = |W_i|^4 / sum_j (W_i.W_j)^2 = |W_i|^2 / (|W_i|^2 + sum_{j!=i} (Ŵ_i.W_j)^2).
    at::Tensor denom = w_nsq + sq;
    dims = at::where(w_nsq > 0, w_nsq / denom, at::zeros_like(w_nsq));
  } else {
    dims = at::empty({0}, f64);
  }
  return {w_norm, sq, sqcos, dims, maxabs.to(at::kDouble), argmax, tk_cos.to(at::kDouble), tk_idx};
}

}  // namespace

std::vector<at::Tensor> interference_cpu(const at::Tensor& W_in, const std::optional<at::Tensor>& V_in,
                                         int64_t topk, int64_t block) {
  TORCH_CHECK(W_in.device().is_cpu(), "W must be a CPU tensor");
  TORCH_CHECK(W_in.dim() == 2, "W must be 2-D [features, dim]");
  TORCH_CHECK(at::isFloatingType(W_in.scalar_type()), "W must be floating point");
  TORCH_CHECK(topk >= 0, "topk must be >= 0");
  // Half and bfloat16 directions are widened once: the tiles accumulate in float32 anyway.
  const auto compute = W_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor W = W_in.to(compute).contiguous();
  std::optional<at::Tensor> V;
  if (V_in) {
    TORCH_CHECK(V_in->device().is_cpu(), "V must be a CPU tensor");
    TORCH_CHECK(V_in->dim() == 2 && V_in->size(1) == W_in.size(1),
                "V must be 2-D with the same dim as W");
    V = V_in->to(compute).contiguous();
  }
  if (compute == at::kDouble) return run<double>(W, V, topk, block);
  return run<float>(W, V, topk, block);
}

}  // namespace supanalysis
