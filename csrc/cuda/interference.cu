// Feature interference on the GPU, tile by tile, never holding the n x n Gram matrix.
//
// Rows of unit directions go in row blocks of R (the `block` argument, or a default that
// keeps the workspace near 2^25 elements); each row block's cosines against every column
// direction, G = Ŵ[rows] Ĉ^T [R, n_cols], come from cuBLAS (at::mm_out into one reused
// workspace: memory O(R * n_cols), never n x n). float16/bfloat16 rows are not rounded to
// unit length (that would cost 8 bits of every bfloat16 cosine): they stay in their dtype,
// bfloat16 ones scaled by a power of two (exact) so no product leaves float32's range, and
// cuBLAS multiplies them on the tensor cores into a float32 tile (each 16-bit product is
// exact in float32); the kernels turn the tile into cosines with the rows' inverse norms,
// g_ij * (inv_i * inv_j), as they read it. _interference_kernel then reduces each
// row of the tile in one CUDA block:
//   sum_j cos^2 * |C_j|^2 and sum_j cos^2 (float64, fixed-order block reduction),
//   max |cos| and its argmax (ties to the smallest index; -1 when the max is 0),
//   top-k by |cos| for k <= 32: each thread keeps its best KMAX candidates sorted in
//   registers (fully unrolled insertion, so no local memory), then k rounds of a block
//   argmax pop the winners in order (|cos| descending, ties to the smallest index).
// Self pairs are skipped when V is None. k > 32 takes ATen's topk over the tile instead
// (ties in ATen's order, as the reference's).
//
// Symmetry (W against itself, top-k 0; the default there): row block [r0, r0+R) is
// multiplied only against columns j >= r0, so each off-diagonal cosine is computed once
// (about n^2/2 + nR/2 products instead of n^2). The row kernel reduces each row over its
// columns j >= r0; _interference_cols_kernel reduces each later column j >= r0+R over the
// block's rows into running column accumulators (one thread per column, row blocks in
// order, so no atomics and strict > keeps the smallest row on ties); the two halves are
// merged at the end (a column-side partner always has the smaller index). With top-k or
// V every row block sweeps all columns: a full-width row tile lets one CUDA block finish a
// feature in one pass with no running state across tiles. The row kernel and its launchers
// live in interference_rows.cuh.
//
// Variant "sliced_columns" (interference_cuda_sliced_columns), same outputs: the column
// kernel gives each column 8 row slices (one warp each, partials merged in warp order),
// the default workspace is 4x larger (taller GEMMs), and the rows are prepared in chunks,
// so the float64 temporaries stay bounded however many rows W has.
#include "interference_rows.cuh"

namespace supanalysis {
namespace {

using namespace cuda_detail;

constexpr int64_t kWorkspaceElems = int64_t(1) << 25;
constexpr int64_t kDefaultMaxRows = 1024;
// Variant "sliced_columns": 2^27 float32 = 512 MiB, R = 1024 rows at n = 65,536 (GEMMs tall
// enough to run near the card's rate), still 128 at n = 2^20; rows prepared in chunks of
// 2^24 float64 elements.
constexpr int64_t kSlicedWorkspaceElems = int64_t(1) << 27;
constexpr int64_t kPrepElems = int64_t(1) << 24;

// Symmetric mode, column side: G holds rows r0..r0+R against columns col0.. (ld of them);
// thread t owns local column j = j_begin + t (a column after the block) and folds the
// block's R cosines into that column's running sums and maximum. Adjacent threads read
// adjacent columns of each row, so the reads coalesce.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _interference_cols_kernel(double* __restrict__ col_sq, double* __restrict__ col_sqcos,
                              double* __restrict__ col_max, int64_t* __restrict__ col_arg,
                              const acc_t* __restrict__ G, const double* __restrict__ row_nsq,
                              const acc_t* __restrict__ row_inv, const acc_t* __restrict__ col_inv,
                              int64_t R, int64_t ld, int64_t j_begin, int64_t col0, int64_t r0) {
  const int64_t j = j_begin + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= ld) return;
  const acc_t c_inv = row_inv ? col_inv[j] : acc_t(1);
  double s_sq = 0.0, s_c = 0.0;
  acc_t bv = 0;
  int64_t bi = -1;
  for (int64_t r = 0; r < R; ++r) {
    // The same product order as the row kernel: g * (inv_row * inv_col).
    const acc_t c = row_inv ? G[r * ld + j] * (row_inv[r] * c_inv) : G[r * ld + j];
    const double c2 = static_cast<double>(c) * static_cast<double>(c);
    s_sq += c2 * row_nsq[r];
    s_c += c2;
    const acc_t a = c < acc_t(0) ? -c : c;
    if (a > bv) {  // rows in increasing order: strict > keeps the smallest on ties
      bv = a;
      bi = r0 + r;
    }
  }
  const int64_t jg = col0 + j;
  col_sq[jg] += s_sq;
  col_sqcos[jg] += s_c;
  // Earlier row blocks hold smaller rows: they keep a tie.
  if (bi >= 0 && static_cast<double>(bv) > col_max[jg]) {
    col_max[jg] = static_cast<double>(bv);
    col_arg[jg] = bi;
  }
}

// Variant "sliced_columns" of _interference_cols_kernel (same inputs and outputs): each block owns 32 columns after the block's rows (j >= j_begin) and folds the R cosines
// of each into that column's running sums and maximum. Warp w of the block takes rows
// w, w + 8, ... (a warp reads 32 adjacent columns of one row: coalesced), so eight warps
// share a column's rows; their partials meet in shared memory in warp order (fixed-order
// sums: deterministic) and the argmax keeps the smallest row on ties.
constexpr int kColLanes = 32;
constexpr int kColSlices = kThreads / kColLanes;

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _interference_cols_sliced_kernel(double* __restrict__ col_sq, double* __restrict__ col_sqcos,
                              double* __restrict__ col_max, int64_t* __restrict__ col_arg,
                              const acc_t* __restrict__ G, const double* __restrict__ row_nsq,
                              const acc_t* __restrict__ row_inv, const acc_t* __restrict__ col_inv,
                              int64_t R, int64_t ld, int64_t j_begin, int64_t col0, int64_t r0) {
  __shared__ double s_sq[kColSlices][kColLanes];
  __shared__ double s_c[kColSlices][kColLanes];
  __shared__ acc_t s_v[kColSlices][kColLanes];
  __shared__ int64_t s_i[kColSlices][kColLanes];
  const int lane = threadIdx.x % kColLanes, slice = threadIdx.x / kColLanes;
  const int64_t j = j_begin + static_cast<int64_t>(blockIdx.x) * kColLanes + lane;
  const bool live = j < ld;
  double sq = 0.0, sc = 0.0;
  acc_t bv = 0;
  int64_t bi = -1;
  if (live) {
    const acc_t c_inv = row_inv ? col_inv[j] : acc_t(1);
    for (int64_t r = slice; r < R; r += kColSlices) {
      // The same product order as the row kernel: g * (inv_row * inv_col).
      const acc_t c = row_inv ? G[r * ld + j] * (row_inv[r] * c_inv) : G[r * ld + j];
      const double c2 = static_cast<double>(c) * static_cast<double>(c);
      sq += c2 * row_nsq[r];
      sc += c2;
      const acc_t a = c < acc_t(0) ? -c : c;
      if (a > bv) {  // rows in increasing order within the slice: strict > keeps the smallest
        bv = a;
        bi = r0 + r;
      }
    }
  }
  s_sq[slice][lane] = sq;
  s_c[slice][lane] = sc;
  s_v[slice][lane] = bv;
  s_i[slice][lane] = bi;
  __syncthreads();
  if (slice != 0 || !live) return;
  for (int w = 1; w < kColSlices; ++w) {
    sq += s_sq[w][lane];
    sc += s_c[w][lane];
    if (better(s_v[w][lane], s_i[w][lane], bv, bi)) {  // a partner (index >= 0) has |cos| > 0
      bv = s_v[w][lane];
      bi = s_i[w][lane];
    }
  }
  const int64_t jg = col0 + j;
  col_sq[jg] += sq;
  col_sqcos[jg] += sc;
  // Earlier row blocks hold smaller rows: they keep a tie.
  if (bi >= 0 && static_cast<double>(bv) > col_max[jg]) {
    col_max[jg] = static_cast<double>(bv);
    col_arg[jg] = bi;
  }
}

// The rows as the GEMM sees them: norms in float64; for float32/float64 input, unit rows
// in the compute dtype (zero rows stay zero), as the CPU kernel and the reference form
// them, and no inverse norms; for float16/bfloat16 input, the rows in their own dtype
// (bfloat16 ones scaled by 2^-e so the largest entry lies in [0.5, 1): exact) and the
// float32 inverse norms of the rows as scaled (0 for zero rows).
struct Rows {
  at::Tensor norm;  // [n] float64
  at::Tensor mat;   // [n, m] what cuBLAS multiplies
  at::Tensor inv;   // [n] float32 for 16-bit input, else undefined
};

// keep16: multiply 16-bit rows as they are (false: make them unit float32 rows like any other).
Rows prepare_rows(const at::Tensor& X, at::ScalarType compute, bool keep16) {
  const at::Tensor X64 = X.to(at::kDouble);
  at::Tensor nrm = X64.pow(2).sum(1).sqrt();
  if (keep16 && is_16bit(X)) {
    at::Tensor mat = X.contiguous(), nrm_s = nrm;
    if (X.scalar_type() == at::kBFloat16 && X.numel() > 0) {
      // |x| up to 3e38 would overflow a float32 product; fp16 (|x| <= 65504) cannot.
      const at::Tensor amax = X64.abs().amax(1);
      const at::Tensor scale = std::get<1>(amax.frexp()).to(at::kDouble).neg().exp2();
      mat = X64.mul(scale.unsqueeze(1)).to(at::kBFloat16).contiguous();
      nrm_s = nrm.mul(scale);
    }
    at::Tensor inv = at::where(nrm_s.gt(0), nrm_s.reciprocal(), at::zeros_like(nrm_s)).to(at::kFloat);
    return {nrm, mat, inv};
  }
  at::Tensor inv = at::where(nrm.gt(0), nrm.reciprocal(), at::zeros_like(nrm));
  return {nrm, X64.mul(inv.unsqueeze(1)).to(compute).contiguous(), at::Tensor()};
}

// prepare_rows in row chunks (variant "sliced_columns"): the same rows, bounded temporaries.
Rows prepare_rows_chunked(const at::Tensor& X, at::ScalarType compute, bool keep16) {
  // Row chunks of kPrepElems, so the float64 temporaries stay bounded (a whole float64 copy
  // of a million 4096-d rows would be 32 GiB).
  const int64_t n = X.size(0), m = X.size(1);
  const bool sixteen = keep16 && is_16bit(X);
  // fp16 (|x| <= 65504) cannot overflow a float32 product; an empty X has no row maxima.
  const bool scale_rows = sixteen && X.scalar_type() == at::kBFloat16 && X.numel() > 0;
  Rows out;
  out.norm = at::empty({n}, X.options().dtype(at::kDouble));
  out.mat = sixteen && !scale_rows ? X.contiguous() : at::empty({n, m}, X.options().dtype(sixteen ? X.scalar_type() : compute));
  at::Tensor nrm_s = sixteen ? at::empty({n}, X.options().dtype(at::kDouble)) : at::Tensor();
  const int64_t step = std::max<int64_t>(1, kPrepElems / std::max<int64_t>(1, m));
  for (int64_t a = 0; a < n; a += step) {
    const int64_t len = std::min(step, n - a);
    const at::Tensor x64 = X.narrow(0, a, len).to(at::kDouble);
    const at::Tensor nrm = x64.pow(2).sum(1).sqrt();
    out.norm.narrow(0, a, len).copy_(nrm);
    if (!sixteen) {
      const at::Tensor inv = at::where(nrm.gt(0), nrm.reciprocal(), at::zeros_like(nrm));
      out.mat.narrow(0, a, len).copy_(x64.mul(inv.unsqueeze(1)));
    } else if (scale_rows) {
      // |x| up to 3e38 would overflow a float32 product: scale by 2^-e (exact) so the largest
      // entry of the row lies in [0.5, 1).
      const at::Tensor scale = std::get<1>(x64.abs().amax(1).frexp()).to(at::kDouble).neg().exp2();
      out.mat.narrow(0, a, len).copy_(x64.mul(scale.unsqueeze(1)));
      nrm_s.narrow(0, a, len).copy_(nrm.mul(scale));
    } else {
      nrm_s.narrow(0, a, len).copy_(nrm);
    }
  }
  if (sixteen) out.inv = at::where(nrm_s.gt(0), nrm_s.reciprocal(), at::zeros_like(nrm_s)).to(at::kFloat);
  return out;
}

// G = A B^T into the float `out` (a float32 tile from 16-bit A and B: cuBLAS's tensor-core
// GEMM with float32 output; the same dtype otherwise).
void tile_product(at::Tensor& out, const at::Tensor& A, const at::Tensor& Bt) {
  if (A.scalar_type() == out.scalar_type()) {
    at::mm_out(out, A, Bt);
  } else {
    at::mm_out(out, A, Bt, out.scalar_type());
  }
}

template <typename acc_t>
void launch_cols(const at::Tensor& Gt, int64_t R, int64_t ld, int64_t j_begin, int64_t col0, int64_t r0,
                 const at::Tensor& w_nsq, const at::Tensor& w_inv, at::Tensor& col_sq, at::Tensor& col_sqcos,
                 at::Tensor& col_max, at::Tensor& col_arg, bool sliced) {
  if (j_begin >= ld) return;
  const int cols_per_block = sliced ? kColLanes : kThreads;
  const auto grid = static_cast<unsigned>((ld - j_begin + cols_per_block - 1) / cols_per_block);
  auto kernel = sliced ? _interference_cols_sliced_kernel<acc_t> : _interference_cols_kernel<acc_t>;
  kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      col_sq.data_ptr<double>(), col_sqcos.data_ptr<double>(), col_max.data_ptr<double>(),
      col_arg.data_ptr<int64_t>(), Gt.data_ptr<acc_t>(), w_nsq.data_ptr<double>() + r0,
      ptr_or_null<acc_t>(w_inv, r0), ptr_or_null<acc_t>(w_inv, col0), R, ld, j_begin, col0, r0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What the tile driver's variants change: the default row-block workspace (elements of the
// compute dtype), the symmetric column kernel, and how rows are prepared.
struct TileVariant {
  int64_t workspace_elems;
  bool sliced_cols;
  bool chunked_prep;
};
constexpr TileVariant kDefaultTiles{kWorkspaceElems, false, false};
constexpr TileVariant kSlicedColumns{kSlicedWorkspaceElems, true, true};

std::vector<at::Tensor> interference_tiles(const at::Tensor& W_in, const std::optional<at::Tensor>& V_in,
                                           int64_t topk, int64_t block, int64_t symmetric,
                                           const TileVariant& variant) {
  check_cuda(W_in, "W");
  TORCH_CHECK(W_in.dim() == 2, "W must be 2-D [features, dim], got ", W_in.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(W_in.scalar_type()), "W must be floating point, got ", W_in.scalar_type());
  TORCH_CHECK(topk >= 0, "topk must be >= 0, got ", topk);
  TORCH_CHECK(block >= 0, "block must be >= 0, got ", block);
  if (V_in) {
    check_cuda(*V_in, "V");
    check_same_device(*V_in, W_in, "V", "W");
    TORCH_CHECK(V_in->dim() == 2 && V_in->size(1) == W_in.size(1),
                "V must be 2-D [k, m] with W's dim m = ", W_in.size(1), ", got ", V_in->sizes());
    TORCH_CHECK(at::isFloatingType(V_in->scalar_type()), "V must be floating point, got ", V_in->scalar_type());
  }
  const c10::cuda::CUDAGuard device_guard(W_in.device());
  // The tile's dtype: float64 for float64 input, float32 otherwise (16-bit rows multiplied
  // on the tensor cores into float32).
  const auto compute = W_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = W_in.size(0);
  const bool has_v = V_in.has_value();
  const int64_t ncols = has_v ? V_in->size(0) : n;
  TORCH_CHECK(ncols <= std::numeric_limits<int>::max(), "too many column directions: ", ncols);
  auto f64 = W_in.options().dtype(at::kDouble);
  auto i64 = W_in.options().dtype(at::kLong);

  // 16-bit rows go to the tensor cores when W (and V) share one 16-bit dtype; any other mix
  // meets in unit rows of the compute dtype.
  const bool keep16 = is_16bit(W_in) && (!has_v || V_in->scalar_type() == W_in.scalar_type());
  const Rows w_rows = variant.chunked_prep ? prepare_rows_chunked(W_in, compute, keep16)
                                           : prepare_rows(W_in, compute, keep16);
  const at::Tensor& w_norm = w_rows.norm;
  const at::Tensor& Wn = w_rows.mat;
  const at::Tensor w_nsq = w_norm.pow(2).contiguous();
  at::Tensor Cn = Wn, col_nsq = w_nsq, col_inv = w_rows.inv;
  if (has_v) {
    const Rows v_rows = variant.chunked_prep ? prepare_rows_chunked(*V_in, compute, keep16)
                                             : prepare_rows(*V_in, compute, keep16);
    Cn = v_rows.mat;
    col_nsq = v_rows.norm.pow(2).contiguous();
    col_inv = v_rows.inv;
  }
  const auto tile_opts = W_in.options().dtype(compute);
  at::Tensor sq = at::zeros({n}, f64), sqcos = at::zeros({n}, f64), maxabs = at::zeros({n}, f64);
  at::Tensor argmax = at::full({n}, -1, i64);
  at::Tensor tk_cos = at::zeros({n, topk}, f64);
  at::Tensor tk_idx = at::full({n, topk}, -1, i64);

  // symmetric: -1 = wherever it applies (no V, no top-k), 0 = never, 1 = required.
  const bool can_sym = !has_v && topk == 0;
  TORCH_CHECK(symmetric != 1 || can_sym, "symmetric tiles need V = None and topk = 0");
  if (n > 0 && can_sym && symmetric != 0) {
    const int64_t R = block > 0 ? std::min(block, n)
                                : std::min({n, kDefaultMaxRows, std::max<int64_t>(1, variant.workspace_elems / n)});
    at::Tensor ws = at::empty({R * n}, tile_opts);
    at::Tensor col_sq = at::zeros({n}, f64), col_sqcos = at::zeros({n}, f64), col_max = at::zeros({n}, f64);
    at::Tensor col_arg = at::full({n}, -1, i64);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t Rb = std::min(R, n - r0), ld = n - r0;  // rows r0.. against columns r0..
      at::Tensor Gt = ws.narrow(0, 0, Rb * ld).view({Rb, ld});
      tile_product(Gt, Wn.narrow(0, r0, Rb), Wn.narrow(0, r0, ld).t());
      const at::Tensor& w_inv = w_rows.inv;
      if (compute == at::kDouble) {
        launch_rows_k<double>(Gt, Rb, r0, ld, r0, w_nsq, w_inv, w_inv, 0, true, sq, sqcos, maxabs, argmax, tk_cos,
                              tk_idx);
        launch_cols<double>(Gt, Rb, ld, Rb, r0, r0, w_nsq, w_inv, col_sq, col_sqcos, col_max, col_arg,
                            variant.sliced_cols);
      } else {
        launch_rows_k<float>(Gt, Rb, r0, ld, r0, w_nsq, w_inv, w_inv, 0, true, sq, sqcos, maxabs, argmax, tk_cos,
                             tk_idx);
        launch_cols<float>(Gt, Rb, ld, Rb, r0, r0, w_nsq, w_inv, col_sq, col_sqcos, col_max, col_arg,
                            variant.sliced_cols);
      }
    }
    // Feature j's partners: rows before its block (column side, all smaller indices, so
    // they win a tie) and columns from its block on (row side).
    sq.add_(col_sq);
    sqcos.add_(col_sqcos);
    const at::Tensor use_col = col_arg.ge(0).logical_and(argmax.lt(0).logical_or(col_max.ge(maxabs)));
    maxabs = at::where(use_col, col_max, maxabs);
    argmax = at::where(use_col, col_arg, argmax);
  } else if (n > 0 && ncols > 0) {
    const int64_t R = block > 0 ? std::min(block, n)
                                : std::min({n, kDefaultMaxRows,
                                            std::max<int64_t>(1, variant.workspace_elems / ncols)});
    at::Tensor ws = at::empty({R, ncols}, tile_opts);
    const at::Tensor CnT = Cn.t();
    const int64_t k_eff = std::min(topk, ncols);
    for (int64_t r0 = 0; r0 < n; r0 += R) {
      const int64_t Rb = std::min(R, n - r0);
      at::Tensor Gt = ws.narrow(0, 0, Rb);  // contiguous: a prefix of rows
      tile_product(Gt, Wn.narrow(0, r0, Rb), CnT);
      if (w_rows.inv.defined() && topk > 32) {
        // ATen's top-k below reads the tile: make it cosines first (the kernel then needs no scaling).
        Gt.mul_(w_rows.inv.narrow(0, r0, Rb).unsqueeze(1)).mul_(col_inv.unsqueeze(0));
      }
      const bool scaled = w_rows.inv.defined() && topk <= 32;
      const at::Tensor none;
      const at::Tensor& r_inv = scaled ? w_rows.inv : none;
      const at::Tensor& c_inv = scaled ? col_inv : none;
      if (compute == at::kDouble) {
        launch_rows_k<double>(Gt, Rb, r0, ncols, 0, col_nsq, r_inv, c_inv, topk, !has_v, sq, sqcos, maxabs, argmax,
                              tk_cos, tk_idx);
      } else {
        launch_rows_k<float>(Gt, Rb, r0, ncols, 0, col_nsq, r_inv, c_inv, topk, !has_v, sq, sqcos, maxabs, argmax,
                             tk_cos, tk_idx);
      }
      if (topk > 32 && k_eff > 0) {
        // Large k: ATen's topk over the tile, self masked to -1 as the reference does.
        at::Tensor A = Gt.abs();
        if (!has_v) A.diagonal(r0).fill_(-1);
        auto [tv, ti] = A.topk(k_eff, 1);
        const at::Tensor pos = tv.gt(0);
        tk_cos.narrow(0, r0, Rb).narrow(1, 0, k_eff).copy_(
            at::where(pos, Gt.gather(1, ti), at::zeros_like(tv)).to(at::kDouble));
        tk_idx.narrow(0, r0, Rb).narrow(1, 0, k_eff).copy_(at::where(pos, ti, at::full_like(ti, -1)));
      }
    }
  }

  at::Tensor dims;
  if (!has_v) {
    // D_i = |W_i|^4 / sum_j (W_i.W_j)^2 = |W_i|^2 / (|W_i|^2 + sum_{j!=i} (Ŵ_i.W_j)^2).
    dims = at::where(w_nsq.gt(0), w_nsq.div(w_nsq.add(sq)), at::zeros_like(w_nsq));
  } else {
    dims = at::empty({0}, f64);
  }
  return {w_norm, sq, sqcos, dims, maxabs, argmax, tk_cos, tk_idx};
}

}  // namespace

std::vector<at::Tensor> interference_cuda(const at::Tensor& W, const std::optional<at::Tensor>& V,
                                          int64_t topk, int64_t block, int64_t symmetric) {
  return interference_tiles(W, V, topk, block, symmetric, kDefaultTiles);
}

std::vector<at::Tensor> interference_cuda_sliced_columns(const at::Tensor& W, const std::optional<at::Tensor>& V,
                                                         int64_t topk, int64_t block, int64_t symmetric) {
  return interference_tiles(W, V, topk, block, symmetric, kSlicedColumns);
}

}  // namespace supanalysis