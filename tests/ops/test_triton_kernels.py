"""Triton launchers called directly: tile and split boundaries, merges, ties, edge inputs.

Runs on a CUDA device when there is one, else on the CPU under TRITON_INTERPRET=1 (set it
before Python starts: Triton reads it at import). Sizes are small for the interpreter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import assert_argmax_up_to_ties, assert_tolerance_rule

from supanalysis.ops.activation_stats import (
    activation_stats_reference,
    activation_stats_sparse_reference,
)
from supanalysis.ops.best_match import best_match_reference
from supanalysis.ops.coactivation import (
    coactivation_update_reference,
    coactivation_update_sparse_reference,
)
from supanalysis.ops.cross_moments import cross_moments_update_reference
from supanalysis.ops.interference import interference_reference

pytest.importorskip("triton")

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET", "0") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from supanalysis.kernels.activation_stats import (
    activation_stats_sparse_triton,
    activation_stats_triton,
)
from supanalysis.kernels.coactivation import (
    coactivation_update_sparse_triton,
    coactivation_update_triton,
)
from supanalysis.kernels.correlation import (
    best_match_triton,
    cross_moments_update_triton,
)
from supanalysis.kernels.interference import interference_triton

# bfloat16 has no arithmetic in the interpreter; on a GPU it is tested like float16.
LOW = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
STATS = ("finite_count", "fire_count", "mean", "m2", "max", "min", "active_sum", "l0")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_list(got, ref, same, *, atol_rel: float, names) -> None:
    """Integers exactly, floats by the tolerance rule against ``same`` (same-dtype torch)."""
    assert len(got) == len(ref)
    for name, g, r in zip(names, got, ref):
        assert g.device.type == torch.device(DEVICE).type, name
        assert g.dtype == r.dtype and g.shape == r.shape, (name, g.dtype, r.dtype, g.shape, r.shape)
        if not r.is_floating_point():
            assert torch.equal(g.cpu(), r.cpu()), name
        elif r.numel():
            fin = torch.isfinite(r.cpu())
            scale = r.cpu()[fin].abs().max().item() if fin.any() else 1.0
            s = same.get(name, r)
            assert_tolerance_rule(g, r, s, atol=atol_rel * max(scale, 1.0), what=name)


# ----------------------------------------------------------------------------- stats
def same_dtype_stats(x: torch.Tensor, thr: float) -> dict[str, torch.Tensor]:
    fin = torch.isfinite(x)
    z = torch.zeros((), dtype=x.dtype)
    cnt = fin.sum(0)
    mean = torch.where(fin, x, z).sum(0) / cnt.clamp_min(1).to(x.dtype)
    d = torch.where(fin, x - mean, z)
    fire = fin & (x.double() > thr)
    return {"mean": mean, "m2": (d * d).sum(0), "active_sum": torch.where(fire, x, z).sum(0)}


@pytest.mark.parametrize("T,n", [(0, 5), (5, 0), (1, 1), (67, 97), (300, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
@pytest.mark.parametrize("splits", [None, 3])
def test_activation_stats(T, n, dtype, splits):
    x = (torch.randn(T, n, generator=gen(T + n)) * 3 + 2).to(dtype)
    if T > 10 and n > 3:
        x[3, 2], x[4, 2], x[5, 2] = float("nan"), float("inf"), float("-inf")
        x[:, 0] = float("nan")  # a feature with no finite entry: max -inf, min +inf
        x[:, 1] = 7.0  # constant: m2 exactly 0
    ref = activation_stats_reference(x, 0.5)
    got = activation_stats_triton(x.to(DEVICE), 0.5, splits=splits)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    check_list(got, ref, same_dtype_stats(x, 0.5), atol_rel=rel, names=STATS)


def test_activation_stats_strided_and_threshold_edge():
    # A column slice of a wider tensor (row stride != n) and a transposed view (stride_n != 1).
    wide = torch.randn(70, 200, generator=gen(1))
    for x in (wide[:, 3:100], wide.t()[:, :40]):
        ref = activation_stats_reference(x, 0.0)
        got = activation_stats_triton(x.to(DEVICE), 0.0)
        check_list(got, ref, same_dtype_stats(x, 0.0), atol_rel=1e-6, names=STATS)
    # float32(0.1) > 0.1 in float64 (the reference's comparison), but not in float32.
    x = torch.full((3, 2), 0.1, dtype=torch.float32)
    got = activation_stats_triton(x.to(DEVICE), 0.1)
    assert got[1].tolist() == [3, 3] and got[7].tolist() == [2, 2, 2]


def test_activation_stats_large_offset():
    # Mean 1e3, spread 0.1: tile sums must not lose the spread to |mean|'s rounding.
    x = torch.randn(300, 16, generator=gen(2)) * 0.1 + 1000
    ref = activation_stats_reference(x, 0.0)
    got = activation_stats_triton(x.to(DEVICE), 0.0, splits=3)
    check_list(got, ref, same_dtype_stats(x, 0.0), atol_rel=1e-7, names=STATS)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("n", [1024, 1000])  # whole feature blocks (float32: 512 wide) and a ragged last block
def test_activation_stats_careful_chunk_mid_stream(n, splits):
    """Full 32-token chunks take the fast path; one with a non-finite entry is redone by the
    careful path between fast ones (its L0 rows rewritten: +inf never fires), and the
    running-mean shift carries on after it. Offsets of 1e3 make a wrong shift visible."""
    x = torch.randn(200, n, generator=gen(n + splits)) * 0.1 + 1000
    x[:, ::7] -= 1000  # features centred on 0, some of them firing
    x[100, 5] = float("nan")
    x[64, 9] = float("inf")
    x[131, -1] = float("-inf")
    ref = activation_stats_reference(x, 0.05)
    got = activation_stats_triton(x.to(DEVICE), 0.05, splits=splits)
    check_list(got, ref, same_dtype_stats(x, 0.05), atol_rel=1e-7, names=STATS)
    assert got[7][64].item() == ref[7][64].item()


def random_codes(T, n, k, seed):
    g = gen(seed)
    if T == 0:
        return torch.empty(0, k, dtype=torch.int64)
    idx = torch.stack([torch.randperm(n - 1, generator=g)[:k] + 1 for _ in range(T)])
    if T:
        idx[:, 0] = 0  # feature 0 listed by every token: the longest segment
        idx[::3, -1] = -1  # padding
    return idx.reshape(T, k)


@pytest.mark.parametrize("T,n,k", [(0, 5, 2), (1, 2, 1), (67, 97, 5), (300, 130, 8)])
@pytest.mark.parametrize("thr", [-0.25, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_activation_stats_sparse(T, n, k, thr, dtype):
    idx = random_codes(T, n, k, T + n)
    vals = torch.randn(T, k, generator=gen(3)).to(dtype)
    if T > 5:
        vals[2, 1] = float("nan")
        vals[4, 0] = float("inf")
    ref = activation_stats_sparse_reference(idx, vals, n, thr)
    for index_dtype in (torch.int64, torch.int32):
        got = activation_stats_sparse_triton(idx.to(index_dtype).to(DEVICE), vals.to(DEVICE), n, thr)
        check_list(got, ref, {}, atol_rel=1e-6, names=STATS)


# ----------------------------------------------------------------------------- interference
def same_dtype_interference(W, V):
    """A user's same-dtype computation: unit rows in W's dtype, Gram tile, sums."""

    def unit(X):
        nrm = X.float().norm(dim=1).to(X.dtype)
        return torch.where(nrm[:, None] > 0, X / nrm[:, None], torch.zeros((), dtype=X.dtype)), nrm

    Wn, nrm = unit(W)
    Cn, cn = (Wn, nrm) if V is None else unit(V)
    G = Wn @ Cn.T
    if V is None:
        G.fill_diagonal_(0)
    sq = (G * G * (cn * cn)[None, :]).sum(1)
    out = {"sq_interference": sq, "sq_cos": (G * G).sum(1), "max_abs_cos": G.abs().amax(1)}
    if V is None:
        nsq = nrm * nrm
        out["dims"] = torch.where(nsq > 0, nsq / (nsq + sq), torch.zeros((), dtype=W.dtype))
    return out


INTF = ("norms", "sq_interference", "sq_cos", "dims", "max_abs_cos", "argmax", "topk_cos", "topk_index")


@pytest.mark.parametrize(
    "n,m,nv,topk,block",
    [(1, 5, 0, 3, 0), (97, 33, 0, 5, 32), (130, 20, 0, 0, 0), (70, 12, 41, 4, 16), (30, 6, 0, 33, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interference_random(n, m, nv, topk, block, dtype):
    W = torch.randn(n, m, generator=gen(n)).to(dtype)
    if n > 3:
        W[2] = 0  # zero row: cosine 0 with everything, D = 0
    V = torch.randn(nv, m, generator=gen(7)).to(dtype) if nv else None
    ref = interference_reference(W, V, topk, 0)
    got = interference_triton(W.to(DEVICE), None if V is None else V.to(DEVICE), topk, block)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    # Integer outputs (argmax, top-k indices) must match exactly: random data has no ties.
    check_list(got, ref, same_dtype_interference(W, V), atol_rel=rel, names=INTF)


@pytest.mark.parametrize("dtype", LOW)
def test_interference_low_precision(dtype):
    W = torch.randn(80, 24, generator=gen(5)).to(dtype)
    ref = interference_reference(W, None, 3, 0)
    got = interference_triton(W.to(DEVICE), None, 3, 32)
    same = same_dtype_interference(W, None)
    for i in (1, 2, 3, 4):
        assert_tolerance_rule(got[i], ref[i], same[INTF[i]], atol=1e-6 * ref[i].abs().max().item(), what=INTF[i])
    # Top-k by |cos|: compare the magnitudes (16-bit rounding may swap near-ties).
    assert torch.allclose(got[6].abs().cpu(), ref[6].abs(), atol=1e-5)


def test_interference_exact_triangle_and_ties():
    s = math.sqrt(3) / 2
    W = torch.tensor([[1.0, 0.0], [-0.5, s], [-0.5, -s]])
    _, _, sqcos, dims, mx, am, tkc, tki = interference_triton(W.to(DEVICE), None, 2, 0)
    assert torch.allclose(dims.cpu(), torch.full((3,), 2 / 3, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(mx.cpu(), torch.full((3,), 0.5, dtype=torch.float64), atol=1e-7)
    assert abs(float(sqcos.sum()) - 1.5) < 1e-6
    assert am[0].item() == 1  # row 0's partners tie exactly (cos -1/2): smallest index
    assert tki[0].tolist() == [1, 2]
    assert torch.allclose(tkc.cpu(), torch.full((3, 2), -0.5, dtype=torch.float64), atol=1e-7)
    # Ties across column tiles: row 0 = e0 is parallel to rows 20 and 40 (different 16-tiles).
    W = torch.zeros(48, 20)
    W[torch.arange(48), torch.arange(48) % 20] = 1.0
    _, _, _, _, mx, am, tkc, tki = interference_triton(W.to(DEVICE), None, 3, 16)
    assert am[0].item() == 20 and mx[0].item() == 1.0
    assert tki[0].tolist() == [20, 40, -1]  # orthogonal partners are not listed
    assert tkc[0].tolist() == [1.0, 1.0, 0.0]
    assert am[5].item() == 25 and tki[45].tolist() == [5, 25, -1]


def test_interference_orthonormal_and_all_zero():
    _, _, _, dims, mx, am, _, tki = interference_triton(torch.eye(5, device=DEVICE), None, 2, 0)
    assert dims.tolist() == [1.0] * 5 and mx.tolist() == [0.0] * 5 and am.tolist() == [-1] * 5
    assert tki.tolist() == [[-1, -1]] * 5
    out = interference_triton(torch.zeros(3, 4, device=DEVICE), None, 1, 0)
    assert out[3].tolist() == [0.0] * 3 and out[5].tolist() == [-1] * 3
    out = interference_triton(torch.zeros(0, 4, device=DEVICE), torch.ones(2, 4, device=DEVICE), 2, 0)
    assert out[0].shape == (0,) and out[3].shape == (0,) and out[6].shape == (0, 2)


@pytest.mark.parametrize("n,m,block", [(1, 5, 0), (2, 3, 16), (37, 19, 16), (130, 33, 32), (97, 64, 0), (300, 40, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_interference_symmetric_tiles_match_row_sweeps(n, m, block, dtype):
    """Upper-triangle tiles merged by atomics == the row-sweeping kernel == the reference."""
    W = torch.randn(n, m, generator=gen(n + m)).to(dtype)
    if n > 8:
        W[3] = 0  # zero row
        W[8] = W[5]  # exact duplicate: |cos| 1 ties, smallest index wins at both ends
    ref = interference_reference(W, None, 0, 0)
    sym = interference_triton(W.to(DEVICE), None, 0, block, symmetric=True)
    rows = interference_triton(W.to(DEVICE), None, 0, block, symmetric=False)
    for got in (sym, rows):  # W[8] == W[5]: every row's |cos| to 5 and to 8 tie
        assert_argmax_up_to_ties(got[5], W, tol=1e-5)
    same = same_dtype_interference(W, None)
    for i in (1, 2, 3, 4):
        atol = 1e-6 * max(ref[i].abs().max().item(), 1.0)
        assert_tolerance_rule(sym[i], ref[i], same[INTF[i]], atol=atol, what=INTF[i])
        assert torch.allclose(sym[i].cpu(), rows[i].cpu(), rtol=1e-5, atol=1e-6), INTF[i]
    if n > 8:
        assert sym[5][5].item() == 8 and sym[5][8].item() == 5 and sym[5][3].item() == -1
        assert sym[4][3].item() == 0.0 and sym[3][3].item() == 0.0


def test_interference_symmetric_ties_across_tiles_and_refusals():
    # e0 is parallel to rows 20 and 40, in different 16-row tiles: the smallest index wins
    # whether the pair is seen from the row end or the column end of a tile.
    W = torch.zeros(48, 20)
    W[torch.arange(48), torch.arange(48) % 20] = 1.0
    _, _, _, dims, mx, am, tkc, tki = interference_triton(W.to(DEVICE), None, 0, 16, symmetric=True)
    assert dims[0].item() == 1 / 3  # three parallel unit rows: |W|^4 / (1 + 1 + 1)
    assert am[0].item() == 20 and am[20].item() == 0 and am[40].item() == 0 and mx[0].item() == 1.0
    assert am[45].item() == 5 and tkc.shape == (48, 0) and tki.shape == (48, 0)
    for bad in (dict(topk=2), dict(V=W[:3])):
        args = dict(V=None, topk=0) | bad
        with pytest.raises(ValueError, match="symmetric needs"):
            interference_triton(W.to(DEVICE), args["V"], args["topk"], 16, symmetric=True)


# ----------------------------------------------------------------------------- correlation
def same_dtype_cross(C, n_prev, pa, pb, xa, xb):
    ma, mb = xa.mean(0), xb.mean(0)
    ca, cb = xa - ma, xb - mb
    coef = n_prev * xa.shape[0] / (n_prev + xa.shape[0])
    upd = (ca.T @ cb).double() + coef * torch.outer(ma.double() - pa, mb.double() - pb)
    return C + upd, [ma, (ca * ca).sum(0), mb, (cb * cb).sum(0)]


@pytest.mark.parametrize("T,na,nb", [(0, 3, 4), (1, 1, 3), (67, 97, 33), (300, 20, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_cross_moments_update(T, na, nb, dtype):
    xa = (torch.randn(T, na, generator=gen(T)) * 2 + 5).to(dtype)
    xb = (torch.randn(T, nb, generator=gen(T + 1)) - 3).to(dtype)
    if T and nb > 1:
        xb[:, 1] = (xa[:, 0].float() * 0.5 - 1).to(dtype)  # a correlated pair
    C0 = torch.randn(na, nb, generator=gen(9), dtype=torch.float64)
    pa = torch.randn(na, generator=gen(10), dtype=torch.float64)
    pb = torch.randn(nb, generator=gen(11), dtype=torch.float64)
    C_ref = C0.clone()
    ref = cross_moments_update_reference(C_ref, 10, pa, pb, xa, xb)
    C_got = C0.to(DEVICE)
    got = cross_moments_update_triton(C_got, 10, pa.to(DEVICE), pb.to(DEVICE), xa.to(DEVICE), xb.to(DEVICE))
    C_same, same = same_dtype_cross(C0, 10, pa, pb, xa, xb) if T else (C_ref, ref)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    names = ("mean_a", "m2_a", "mean_b", "m2_b")
    check_list(got, ref, dict(zip(names, same)), atol_rel=rel, names=names)
    check_list([C_got], [C_ref], {"C": C_same}, atol_rel=rel, names=("C",))


def test_cross_moments_streaming_equals_one_shot():
    xa = torch.randn(130, 40, generator=gen(1)) + 2
    xb = torch.randn(130, 50, generator=gen(2)) - 1

    def z(k):
        return torch.zeros(k, dtype=torch.float64, device=DEVICE)

    C = torch.zeros(40, 50, dtype=torch.float64, device=DEVICE)
    ma1, _, mb1, _ = cross_moments_update_triton(C, 0, z(40), z(50), xa[:70].to(DEVICE), xb[:70].to(DEVICE))
    cross_moments_update_triton(C, 70, ma1, mb1, xa[70:].to(DEVICE), xb[70:].to(DEVICE))
    C_one = torch.zeros(40, 50, dtype=torch.float64)
    cross_moments_update_reference(C_one, 0, z(40).cpu(), z(50).cpu(), xa, xb)
    C_same, _ = same_dtype_cross(torch.zeros(40, 50, dtype=torch.float64), 0, z(40).cpu(), z(50).cpu(), xa, xb)
    assert_tolerance_rule(C, C_one, C_same, atol=1e-6 * C_one.abs().max().item(), what="streamed C")


@pytest.mark.parametrize("centred_bytes", [1 << 30, 64 * (37 + 19) * 4])  # one chunk; 64 tokens (float32 copies)
def test_cross_moments_bf16_centred_chunks(centred_bytes):
    """precision="bf16" centres each chunk of tokens into a buffer and runs the GEMM over it:
    the chunks add up to the one-shot bf16 reference (products of the same rounded values),
    Chan's correction is added exactly once, and the batch means are the float64 ones."""
    T, na, nb = 300, 37, 19
    xa = torch.randn(T, na, generator=gen(5)) * 2 + 5
    xb = torch.randn(T, nb, generator=gen(6)) - 3
    C0 = torch.randn(na, nb, generator=gen(7), dtype=torch.float64)
    pa = torch.randn(na, generator=gen(8), dtype=torch.float64)
    pb = torch.randn(nb, generator=gen(9), dtype=torch.float64)
    C_ref = C0.clone()
    ref = cross_moments_update_reference(C_ref, 50, pa, pb, xa, xb, "bf16")
    C_got = C0.to(DEVICE)
    got = cross_moments_update_triton(
        C_got, 50, pa.to(DEVICE), pb.to(DEVICE), xa.to(DEVICE), xb.to(DEVICE), "bf16", centred_bytes=centred_bytes
    )
    scale = (xa.double() - xa.double().mean(0)).abs().T @ (xb.double() - xb.double().mean(0)).abs()
    assert ((C_got.cpu() - C_ref).abs() / scale).max().item() < 2e-6
    for g, r, rtol in zip(got, ref, (1e-12, 1e-6, 1e-12, 1e-6)):  # means: float64 sums; M2: float32 chunks
        torch.testing.assert_close(g.cpu(), r, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("na,nb", [(1, 1), (0, 3), (97, 130), (33, 5), (70, 200)])
def test_best_match(na, nb):
    C = torch.randn(na, nb, generator=gen(na + nb), dtype=torch.float64) * 3
    ia = torch.rand(na, generator=gen(1), dtype=torch.float64)
    ib = torch.rand(nb, generator=gen(2), dtype=torch.float64)
    ia[::4], ib[::3] = 0.0, 0.0  # constant features: nobody's match
    if nb > 120 and na > 40:
        C[:, 4] = C[:, 70] = C[:, 120] = 100.0  # clamped ties at +1 across column groups
        C[5, :] = C[39, :] = C[66, :] = 100.0  # ... and across row tiles/groups
    got = best_match_triton(C.to(DEVICE), ia.to(DEVICE), ib.to(DEVICE))
    ref = best_match_reference(C, ia, ib)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and torch.equal(g.cpu(), r), (g, r)


def test_best_match_all_constant():
    C = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    ma, aa, _, ab = best_match_triton(C, torch.zeros(4, device=DEVICE), torch.ones(3, device=DEVICE))
    assert ma.tolist() == [0.0] * 4 and aa.tolist() == [-1] * 4 and ab.tolist() == [-1] * 3


# ----------------------------------------------------------------------------- coactivation
@pytest.mark.parametrize("T,n", [(0, 5), (1, 1), (67, 97), (300, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_coactivation_dense(T, n, dtype):
    x = torch.randn(T, n, generator=gen(T + n)).to(dtype)
    if T > 5:
        x[3, 2], x[4, 2], x[4, 3] = float("nan"), float("inf"), float("-inf")
    c0 = torch.randint(0, 5, (n, n), generator=gen(4))
    want = c0.clone()
    coactivation_update_reference(want, x, 0.3)
    got = c0.to(DEVICE)
    coactivation_update_triton(got, x.to(DEVICE), 0.3)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("T,n,k", [(0, 4, 2), (1, 3, 2), (67, 97, 5), (300, 130, 8), (20, 40, 33)])
@pytest.mark.parametrize("hot", [0, 3, 64])
def test_coactivation_sparse(T, n, k, hot):
    # hot=0: every pair by atomics; 3: the dense 0/1 tl.dot path takes the 3 most frequent
    # features (feature 0 is listed by every token); 64: most pairs go the dense way.
    idx = random_codes(T, n, k, T + k)
    for index_dtype in (torch.int64, torch.int32):
        want = torch.ones(n, n, dtype=torch.int64)
        coactivation_update_sparse_reference(want, idx)
        got = torch.ones(n, n, dtype=torch.int64, device=DEVICE)
        coactivation_update_sparse_triton(got, idx.to(index_dtype).to(DEVICE), hot=hot)
        assert torch.equal(got.cpu(), want)
