"""interference against the exact cases of SCIENCE.md and the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BACKEND_DEVICES, assert_argmax_up_to_ties, assert_tolerance_rule, interpreting

import supanalysis as sa
from supanalysis.ops.interference import interference_reference


def same_dtype_interference(W: torch.Tensor, V: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The plain-PyTorch computation in the inputs' dtype: unit rows rounded to it and their
    Gram product in it (norms and weights in float64, so huge rows do not overflow)."""
    dt = W.dtype if V is None else torch.promote_types(W.dtype, V.dtype)

    def unit(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        X64 = X.double()
        nrm = X64.norm(dim=1)
        return nrm, (X64 * torch.where(nrm > 0, 1 / nrm, 0.0)[:, None]).to(dt)

    nrm, Wn = unit(W)
    col_nrm, Cn = (nrm, Wn) if V is None else unit(V)
    G = (Wn @ Cn.T).double()
    if V is None:
        G.fill_diagonal_(0)
    sqcos = (G * G).sum(1)
    sq = (G * G * col_nrm**2).sum(1)
    nsq = nrm**2
    dims = torch.where(nsq > 0, nsq / (nsq + sq), 0.0)
    maxabs = G.abs().amax(1) if G.shape[1] else torch.zeros(len(W), dtype=torch.float64)
    return [nrm, sq, sqcos, dims, maxabs]


FIELDS = ("norms", "sq_interference", "sq_cos", "dims", "max_abs_cos")


def assert_rule(r, W: torch.Tensor, V: torch.Tensor | None = None, atol: float = 1e-6) -> None:
    """Every per-feature sum against the float64 reference of the same values, within twice
    the error of the same-dtype PyTorch computation (+ atol): the kernel tolerance rule."""
    ref = interference_reference(W.double(), None if V is None else V.double(), 0, 0)
    same = same_dtype_interference(W, V)
    for i, name in enumerate(FIELDS):
        if name == "dims" and V is not None:
            continue
        got = getattr(r, name)
        assert_tolerance_rule(got, ref[i if i < 4 else 4], same[i], atol=atol, what=name)


def polygon(k: int) -> torch.Tensor:
    a = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return torch.stack([a.cos(), a.sin()], 1)


def tetrahedron() -> torch.Tensor:
    v = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    return v / math.sqrt(3)


# (name, W, D_i, Σ_{i≠j} cos², max |cos|) from SCIENCE.md's table.
EXACT = [
    ("orthonormal", torch.eye(4, dtype=torch.float64), 1.0, 0.0, 0.0),
    ("antipodal", torch.tensor([[1.0], [-1.0]], dtype=torch.float64), 0.5, 2.0, 1.0),
    ("triangle", polygon(3), 2 / 3, 1.5, 0.5),
    ("pentagon", polygon(5), 0.4, 7.5, math.cos(math.radians(36))),
    ("tetrahedron", tetrahedron(), 0.75, 4 / 3, 1 / 3),
]


def numpy_interference(W: np.ndarray):
    """Independent ground truth through the dense Gram matrix."""
    G = W @ W.T
    nsq = np.diag(G).copy()
    nrm = np.sqrt(nsq)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = G / np.outer(nrm, nrm)
    cos = np.nan_to_num(cos)
    np.fill_diagonal(cos, 0.0)
    sq = (cos**2 * nsq[None, :]).sum(1)
    dims = np.where(nsq > 0, nsq**2 / np.where(nsq > 0, (G**2).sum(1), 1), 0.0)
    return nrm, sq, (cos**2).sum(1), dims, np.abs(cos).max(1) if len(W) > 1 else np.zeros(len(W))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", EXACT, ids=[c[0] for c in EXACT])
def test_exact_cases(backend_device, case, dtype):
    backend, device = backend_device
    _, W, d, sum_cos2, maxcos = case
    r = sa.interference(W.to(dtype).to(device), topk=2, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert r.dims.cpu().tolist() == pytest.approx([d] * W.shape[0], abs=tol)
    assert r.total_sq_cos == pytest.approx(sum_cos2, abs=10 * tol)
    assert r.max_abs_cos.cpu().tolist() == pytest.approx([maxcos] * W.shape[0], abs=tol)
    assert r.sum_dims == pytest.approx(d * W.shape[0], abs=10 * tol)
    if maxcos == 0:
        assert (r.argmax == -1).all() or dtype == torch.float32  # float32 rounding may leave ~1e-8


def test_tight_frame_welch_bound(backend_device):
    # n unit vectors forming a tight frame in R^m: Σ D_i = m and Σ_{i≠j} cos² = n²/m − n.
    backend, device = backend_device
    n, m = 12, 4
    # A tight frame with unit rows: the harmonic frame (rows of a partial DFT, real form).
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(1, m // 2 + 1, dtype=torch.float64)[None, :]
    ang = 2 * math.pi * k * j / n
    F = torch.cat([ang.cos(), ang.sin()], 1) / math.sqrt(m / 2)
    assert torch.allclose(F.norm(dim=1), torch.ones(n, dtype=torch.float64))
    r = sa.interference(F.to(device), backend=backend)
    assert r.sum_dims == pytest.approx(m, abs=1e-9)
    assert r.total_sq_cos == pytest.approx(n * n / m - n, abs=1e-9)
    assert r.welch_bound == pytest.approx(n * n / m - n)


@pytest.mark.parametrize("n,m", [(1, 3), (2, 1), (97, 13), (300, 33)])
def test_random_against_numpy(backend_device, n, m):
    backend, device = backend_device
    if interpreting(backend, device) and n > 100:
        n = 70
    g = torch.Generator().manual_seed(n * 31 + m)
    W = torch.randn(n, m, generator=g, dtype=torch.float64)
    if n > 5:
        W[4] = 0  # a zero row: D = 0, cos 0 with everything, never NaN
    r = sa.interference(W.float().to(device), topk=3, block=32, backend=backend)
    nrm, sq, sqc, dims, mx = numpy_interference(W.float().double().numpy())
    np.testing.assert_allclose(r.norms.cpu().numpy(), nrm, rtol=1e-6)
    np.testing.assert_allclose(r.sq_interference.cpu().numpy(), sq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(r.sq_cos.cpu().numpy(), sqc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.dims.cpu().numpy(), dims, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.max_abs_cos.cpu().numpy(), mx, atol=1e-5)
    assert_rule(r, W.float())
    for t in (r.norms, r.sq_interference, r.dims, r.max_abs_cos, r.topk_cos):
        assert torch.isfinite(t).all()
    if n > 5:
        assert r.dims[4] == 0 and r.max_abs_cos[4] == 0 and r.argmax[4] == -1
        assert (r.topk_index[4] == -1).all()
    # argmax and top-k agree with the float64 reference except for near-ties.
    ref = interference_reference(W.float(), None, 3, 0)
    cos = torch.from_numpy(W.numpy() / np.maximum(nrm[:, None], 1e-300))
    C = (cos @ cos.T).abs().fill_diagonal_(-1)
    assert_argmax_up_to_ties(r.argmax, W.float(), tol=1e-5)
    for i in range(n):
        kk = int((ref[7][i] >= 0).sum())
        got_set = set(r.topk_index[i].cpu().tolist()) - {-1}
        assert len(got_set) == kk
        if kk:
            assert C[i, list(got_set)].min() >= torch.sort(C[i], descending=True).values[kk - 1] - 1e-5
            got_cos = r.topk_cos[i].cpu()[: len(got_set)]
            assert torch.allclose(got_cos.abs(), got_cos.abs().sort(descending=True).values)


def test_cross_version(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 8, generator=g)
    V = torch.cat([W[:5] * 3, torch.randn(30, 8, generator=g)])  # V's first 5 rows parallel W's
    r = sa.interference(W.to(device), V.to(device), topk=2, backend=backend)
    ref = interference_reference(W.double(), V.double(), 2, 0)
    assert r.dims is None
    assert_rule(r, W, V)
    assert torch.allclose(r.sq_interference.cpu(), ref[1], rtol=1e-4)
    assert torch.allclose(r.max_abs_cos.cpu(), ref[4], atol=1e-5)
    assert r.argmax[:5].cpu().tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(r.max_abs_cos[:5].cpu(), torch.ones(5, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend_device, dtype):
    backend, device = backend_device
    if interpreting(backend, device) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    W = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    r = sa.interference(W.to(device), backend=backend)
    ref = interference_reference(W.double(), None, 0, 0)  # exact float64 of the same values
    assert_rule(r, W)
    assert torch.allclose(r.dims.cpu(), ref[3], rtol=1e-4, atol=1e-5)
    assert torch.allclose(r.max_abs_cos.cpu(), ref[4], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("topk", [0, 3, 40])
@pytest.mark.parametrize("v_dtype", [None, "same", torch.float32], ids=["noV", "sameV", "fp32V"])
def test_16bit_paths_against_float64_of_the_same_values(backend_device, dtype, topk, v_dtype):
    """16-bit rows are multiplied as they are (GPU: on the tensor cores, rows rescaled by
    powers of two and cosines formed from inverse norms in the epilogue): every path (symmetric
    tiles, row sweeps with top-k <= 32 and > 32, a second dictionary V of the same or another
    dtype, rows at 1e30 and 1e-30 in bfloat16) agrees with float64 on the same values."""
    backend, device = backend_device
    if interpreting(backend, device) and (dtype == torch.bfloat16 or v_dtype is torch.float32):
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    g = torch.Generator().manual_seed(topk * 7 + (v_dtype is None))
    W = torch.randn(70, 24, generator=g, dtype=torch.float64)
    W[5] = 0
    W[8] = W[3] * 0.5  # an exact duplicate direction: |cos| = 1
    if dtype == torch.bfloat16:
        W[10] *= 1e30  # scaled rows: float32 products of unscaled ones would overflow
        W[11] *= 1e-30  # ... or underflow
    W = W.to(dtype)
    V = None
    if v_dtype is not None:
        V = torch.randn(33, 24, generator=g, dtype=torch.float64)
        V[2] = W[7].double() * -4  # antipodal partner in V (a power of two: exact in any dtype)
        V = V.to(dtype if v_dtype == "same" else v_dtype)
    r = sa.interference(W.to(device), None if V is None else V.to(device), topk=topk, block=16, backend=backend)
    # topk is clamped to the partners a row has (69 without V, 33 with it).
    ref = interference_reference(W.double(), None if V is None else V.double(), r.topk_cos.shape[1], 0)
    assert_rule(r, W, V)
    torch.testing.assert_close(r.sq_cos.cpu(), ref[2], rtol=1e-5, atol=1e-5)
    if V is None:
        torch.testing.assert_close(r.dims.cpu(), ref[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.max_abs_cos.cpu(), ref[4], rtol=0, atol=1e-5)
    if topk:
        torch.testing.assert_close(
            r.topk_cos.cpu().abs().sort(1).values, ref[6].abs().sort(1).values, atol=1e-5, rtol=0
        )
    if V is None:
        assert_argmax_up_to_ties(r.argmax, W, tol=1e-5)
        assert r.argmax[5] == -1 and r.dims[5] == 0
        assert r.max_abs_cos[3].item() == pytest.approx(1.0, abs=1e-6)
    else:
        assert r.argmax[7].item() == 2 and r.max_abs_cos[7].item() == pytest.approx(1.0, abs=1e-6)


def test_huge_and_tiny_rows_float32(backend_device):
    """|W_j|^2 of a row at 1e30 is 1e60, past float32: the weighted sums must not overflow
    (a float32 tile sum of cos^2 |W_j|^2 did in the Triton kernels, caught on a GPU)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W[3] *= 1e30
    W[4] *= 1e-30
    W = W.float()
    r = sa.interference(W.to(device), backend=backend)
    ref = interference_reference(W.double(), None, 0, 0)
    assert_rule(r, W)
    # A float32 cosine of 0.01 carries ~1e-7 absolute error: 1e-5 relative once squared
    # and weighted by 1e60, so the weighted sum is held to 1e-3 (an overflow gives inf).
    torch.testing.assert_close(r.sq_interference.cpu(), ref[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(r.sq_cos.cpu(), ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.dims.cpu(), ref[3], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(r.max_abs_cos.cpu(), ref[4], rtol=0, atol=1e-5)


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="W must be 2-D"):
        sa.interference(torch.randn(5))
    with pytest.raises(TypeError, match="W must be float16"):
        sa.interference(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="V must have W's dim m=4"):
        sa.interference(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="W contains non-finite"):
        sa.interference(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="topk must be a non-negative int"):
        sa.interference(torch.randn(3, 2), topk=-1)


def test_dense_matrix_refuses_beyond_budget():
    W = torch.randn(100, 4)
    M = sa.interference_matrix(W)
    assert M.shape == (100, 100) and torch.allclose(M.diagonal(), torch.ones(100, dtype=torch.float64))
    with pytest.raises(MemoryError, match=r"use supanalysis.interference\(W\)"):
        sa.interference_matrix(W, max_bytes=1000)


# ----------------------------------------------------------------------------- TF32 opt-in
def near_duplicates(n: int, m: int, seed: int, copies: int = 3) -> torch.Tensor:
    """Random directions where groups of `copies` rows are near duplicates (|cos| ~ 1 - 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n // copies + 1, m, generator=g, dtype=torch.float64)
    W = base.repeat_interleave(copies, 0)[:n]
    return W + 1e-2 * torch.randn(n, m, generator=g, dtype=torch.float64) / math.sqrt(m)


def noisy_candidates(W: torch.Tensor, K: int, err: float, seed: int):
    """Each row's top-K partners by |cos| + noise in [-err, err]: what a TF32 kernel hands over."""
    Wn = W / W.norm(dim=1, keepdim=True)
    G = Wn @ Wn.T
    G.fill_diagonal_(0.0)
    g = torch.Generator().manual_seed(seed)
    noisy = G + (torch.rand(G.shape, generator=g, dtype=torch.float64) * 2 - 1) * err
    noisy.fill_diagonal_(0.0)
    i = noisy.abs().topk(K, dim=1).indices
    return noisy.gather(1, i), i


# (candidates, copies per near-duplicate group, rows recomputed: at least, at most):
# spare candidates; just enough (only the lone last row's random partners may be close);
# groups larger than the list, whose rankings are ambiguous.
@pytest.mark.parametrize("K,copies,redo", [(2 + 8, 3, (0, 0)), (3, 3, (0, 1)), (3, 12, (50, 61))])
def test_rescore_partners_fixes_an_approximate_ranking(monkeypatch, K, copies, redo):
    import supanalysis.kernels.interference as ki

    redone = []
    exact_rows = ki._exact_rows
    monkeypatch.setattr(ki, "_exact_rows", lambda *a: redone.append(a[4].numel()) or exact_rows(*a))
    W = near_duplicates(61, 24, seed=K, copies=copies)
    err = 1e-3
    cand_cos, cand_idx = noisy_candidates(W, K, err, seed=1)
    nrm = W.norm(dim=1)
    got = ki.rescore_partners(W, W, nrm, nrm, cand_cos, cand_idx, 2, err, self_=True)
    assert redo[0] <= sum(redone) <= redo[1]
    ref = interference_reference(W, None, 2, 0)
    assert torch.equal(got[1], ref[5])  # argmax
    assert torch.equal(got[3], ref[7])  # top-k indices
    torch.testing.assert_close(got[0], ref[4], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2], ref[6], rtol=0, atol=1e-12)
    # The noise really reordered partners: the approximate ranking alone was wrong somewhere.
    assert not torch.equal(cand_idx[:, :2], ref[7])


def test_rescore_partners_cross_and_zero_rows():
    from supanalysis.kernels.interference import rescore_partners

    g = torch.Generator().manual_seed(5)
    W = torch.randn(9, 7, generator=g, dtype=torch.float64)
    W[4] = 0.0
    V = torch.cat(
        [
            W[:5] + 1e-3 * torch.randn(5, 7, generator=g, dtype=torch.float64),
            torch.randn(6, 7, generator=g, dtype=torch.float64),
        ]
    )
    nw, nv = W.norm(dim=1), V.norm(dim=1)
    cos = (W / nw.clamp_min(1e-300)[:, None]) @ (V / nv[:, None]).T
    v, i = cos.abs().topk(4, dim=1)
    i = torch.where(v > 0, i, -1)
    got = rescore_partners(W, V, nw, nv, cos.gather(1, i.clamp_min(0)), i, 1, 1e-3, self_=False)
    ref = interference_reference(W, V, 1, 0)
    assert torch.equal(got[1], ref[5]) and torch.equal(got[3], ref[7])
    assert got[1][4] == -1 and got[0][4] == 0.0  # the zero row has no partner
    torch.testing.assert_close(got[0], ref[4], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend_device", [p for p in BACKEND_DEVICES if p[0] == "triton"] or [None])
def test_triton_tf32_keeps_partners_exact(backend_device):
    if backend_device is None:
        pytest.skip("no Triton backend on this machine")
    backend, device = backend_device
    W = near_duplicates(70, 40, seed=3).float().to(device)
    got = sa.interference(W, topk=3, backend=backend, precision="tf32")
    ref = interference_reference(W.double(), None, 3, 0)
    assert torch.equal(got.argmax.cpu(), ref[5].cpu())
    assert torch.equal(got.topk_index.cpu(), ref[7].cpu())
    torch.testing.assert_close(got.max_abs_cos.cpu(), ref[4].cpu(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.topk_cos.cpu(), ref[6].cpu(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.sq_interference.cpu(), ref[1].cpu(), rtol=1e-2, atol=1e-3)


def test_precision_is_checked_and_full_precision_backends_ignore_tf32():
    W = near_duplicates(20, 8, seed=0).float()
    with pytest.raises(ValueError, match="precision"):
        sa.interference(W, precision="tf16")
    a = sa.interference(W, topk=2, backend="cpp", precision="tf32")
    b = sa.interference(W, topk=2, backend="cpp")
    assert torch.equal(a.topk_index, b.topk_index) and torch.equal(a.sq_interference, b.sq_interference)


# ----------------------------------------------------------------------------- symmetric tiles (GPU)
@pytest.mark.skipif(not any(p == ("cuda", "cuda") for p in BACKEND_DEVICES), reason="needs the CUDA backend on a GPU")
@pytest.mark.parametrize("n,m,block", [(1, 5, 0), (37, 19, 16), (300, 33, 64), (1000, 24, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_symmetric_blocks_match_row_sweeps(n, m, block, dtype):
    from supanalysis.ops.interference import interference_cuda

    g = torch.Generator().manual_seed(n)
    W = torch.randn(n, m, generator=g).to(dtype)
    if n > 8:
        W[3] = 0
        W[8] = W[5]  # exact duplicate: ties resolve to the smallest index at both ends
    ref = interference_reference(W, None, 0, 0)
    sym = interference_cuda(W.cuda(), None, 0, block, symmetric=True)
    rows = interference_cuda(W.cuda(), None, 0, block, symmetric=False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got in (sym, rows):  # W[8] == W[5]: every row's |cos| to 5 and to 8 tie
        assert_argmax_up_to_ties(got[5], W, tol=tol)
    for i in (1, 2, 3, 4):
        torch.testing.assert_close(sym[i].cpu(), rows[i].cpu(), rtol=tol, atol=tol)
        torch.testing.assert_close(sym[i].cpu().double(), ref[i].double(), rtol=max(tol, 1e-4), atol=tol)
    if n > 8:
        assert sym[5][5].item() == 8 and sym[5][8].item() == 5 and sym[5][3].item() == -1
