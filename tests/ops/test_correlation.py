"""CrossCorrelation and best_match against numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import interpreting

import supanalysis as sa


def numpy_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa_, sb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (a.T @ b) / np.outer(sa_, sb)
    c[sa_ == 0, :] = 0
    c[:, sb == 0] = 0
    return c


def make_pair(T, na, nb, seed):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(T, na, generator=g, dtype=torch.float64)
    xb = torch.randn(T, nb, generator=g, dtype=torch.float64)
    k = min(na, nb, 3)
    xb[:, :k] = 2 * xa[:, :k] + 0.1 * xb[:, :k]  # strongly correlated pairs
    if nb > 4:
        xb[:, 4] = -xa[:, 0]  # perfectly anti-correlated: not a match
        xb[:, 3] = 7.0  # constant feature
    if na > 5:
        xa[:, 5] = 0.0  # always zero
    return xa, xb


@pytest.mark.parametrize("T,na,nb", [(1, 3, 2), (50, 7, 9), (300, 97, 33)])
def test_streaming_matches_numpy(backend_device, T, na, nb):
    backend, device = backend_device
    if interpreting(backend, device) and na > 50:
        na = 40
    xa, xb = make_pair(T, na, nb, seed=T + na)
    cc = sa.CrossCorrelation(na, nb, backend=backend)
    for pa, pb in zip(xa.float().split(37), xb.float().split(37)):
        cc.update(pa.to(device), pb.to(device))
    assert cc.n_tokens == T
    a32, b32 = xa.float().double().numpy(), xb.float().double().numpy()
    want = numpy_corr(a32, b32)
    got = cc.correlation().cpu().numpy()
    if T > 1:
        np.testing.assert_allclose(got, want, atol=2e-5)
    bm = cc.best_match()
    for t in (bm.max_corr_a, bm.max_corr_b):
        assert torch.isfinite(t).all()
    if T > 1:
        live_b = ~bm.constant_b.cpu().numpy()
        wa = np.where(live_b[None, :], want, -np.inf)
        for i in range(na):
            if bm.constant_a[i]:
                assert bm.match_a[i] == -1 and bm.max_corr_a[i] == 0
                continue
            j = int(bm.match_a[i])
            assert wa[i, j] >= wa[i].max() - 1e-5
            assert float(bm.max_corr_a[i]) == pytest.approx(wa[i].max(), abs=2e-5)
    if nb > 4 and T > 1:
        assert bool(bm.constant_b[3]) and int(bm.match_b[3]) == -1 and float(bm.max_corr_b[3]) == 0.0
        assert int(bm.match_b[0]) == 0 and float(bm.max_corr_b[0]) > 0.99
    if na > 5 and T > 1:
        assert bool(bm.constant_a[5])


def test_best_match_ops_agree_on_ties(backend_device):
    backend, device = backend_device
    from supanalysis.ops.best_match import best_match, best_match_reference

    C = torch.tensor([[1.0, 1.0, 0.5], [0.2, 0.2, 0.2], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    ia = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    ib = torch.ones(3, dtype=torch.float64)
    got = best_match(C.to(device), ia.to(device), ib.to(device), backend=backend)
    ref = best_match_reference(C, ia, ib)
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r), (g, r)
    assert got[1].tolist() == [0, 0, -1]  # ties to the smallest index; constant row -> -1
    assert got[3].tolist() == [0, 0, 0]


# (9, 16389): three of the C++ sweep's 8,192-column blocks, the tied column in the last one.
@pytest.mark.parametrize("na,nb", [(97, 1025), (513, 77), (6, 3), (9, 16389)])
def test_best_match_equals_reference_with_constant_features_and_ties(backend_device, na, nb):
    """Constant rows and columns scattered (so groups of rows mix live and constant ones),
    duplicated rows and columns (exact ties: the first index wins), every output exactly the
    float64 reference's, which computes the same products."""
    backend, device = backend_device
    from supanalysis.ops.best_match import best_match, best_match_reference

    if interpreting(backend, device):
        na, nb = min(na, 40), min(nb, 70)
    g = torch.Generator().manual_seed(na * nb)
    C = torch.randn(na, nb, generator=g, dtype=torch.float64)
    ia = torch.rand(na, generator=g, dtype=torch.float64) + 0.5
    ib = torch.rand(nb, generator=g, dtype=torch.float64) + 0.5
    ia[1::5], ib[2::3] = 0.0, 0.0
    C[:, -1], ib[-1] = C[:, 0], ib[0]  # a later column equal to the first: row ties
    C[-1], ia[-1] = C[0], ia[0]  # a later row equal to the first: column ties
    got = best_match(C.to(device), ia.to(device), ib.to(device), backend=backend)
    ref = best_match_reference(C, ia, ib)
    for name, g_, r in zip(("max_a", "arg_a", "max_b", "arg_b"), got, ref):
        assert torch.equal(g_.cpu(), r), name


def test_large_offset_precision():
    # 10^6 tokens around a common offset of 1e6: raw-sum E[xy] - E[x]E[y] in float64 loses
    # ~1e-16 * 1e12 per term of a unit covariance; the centred Chan state keeps ~1e-9.
    g = torch.Generator().manual_seed(0)
    cc = sa.CrossCorrelation(2, 2)
    raw_xy = raw_x = raw_y = 0.0
    n = 0
    for _ in range(10):
        z = torch.randn(100_000, 2, generator=g, dtype=torch.float64)
        a = 1e6 + z
        b = 1e6 + torch.stack([z[:, 0], torch.randn(100_000, generator=g, dtype=torch.float64)], 1)
        cc.update(a, b)
        raw_xy += float((a[:, 0] * b[:, 0]).sum())
        raw_x += float(a[:, 0].sum())
        raw_y += float(b[:, 0].sum())
        n += 100_000
    cov = cc.comoment[0, 0].item() / n
    corr = cc.correlation()
    assert corr[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert abs(corr[0, 1].item()) < 5e-3
    raw_cov = raw_xy / n - (raw_x / n) * (raw_y / n)
    assert abs(cov - 1.0) < 1e-2  # the sample variance of 10^6 normals
    assert abs(raw_cov - cov) > 1e-7  # the naive formula visibly drifts from the centred one


def test_nonfinite_tokens_are_dropped_and_counted():
    xa = torch.randn(20, 3)
    xb = torch.randn(20, 2)
    xa[2, 1] = float("nan")
    xb[5, 0] = float("inf")
    cc = sa.CrossCorrelation(3, 2).update(xa, xb)
    ok = torch.ones(20, dtype=torch.bool)
    ok[[2, 5]] = False
    ref = sa.CrossCorrelation(3, 2, backend="reference").update(xa[ok], xb[ok])
    assert cc.n_tokens == 18 and cc.n_skipped == 2
    assert torch.allclose(cc.comoment, ref.comoment, atol=1e-5)


def test_merge_save_load(tmp_path):
    xa, xb = make_pair(200, 6, 5, seed=3)
    one = sa.CrossCorrelation(6, 5).update(xa, xb)
    a = sa.CrossCorrelation(6, 5).update(xa[:77], xb[:77])
    b = sa.CrossCorrelation(6, 5).update(xa[77:], xb[77:])
    a.merge(b)
    assert torch.allclose(a.comoment, one.comoment, rtol=1e-12, atol=1e-10)
    assert torch.allclose(a.mean_a, one.mean_a, rtol=1e-14, atol=1e-15)
    a.save(tmp_path / "cc.safetensors")
    c = sa.CrossCorrelation.load(tmp_path / "cc.safetensors")
    assert torch.equal(c.comoment, a.comoment) and c.n_tokens == 200


def test_bad_input_leaves_state_unchanged():
    cc = sa.CrossCorrelation(3, 2).update(torch.randn(10, 3), torch.randn(10, 2))
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    with pytest.raises(ValueError, match="same tokens"):
        cc.update(torch.randn(10, 3), torch.randn(9, 2))
    with pytest.raises(ValueError, match="xa must have n_a=3"):
        cc.update(torch.randn(10, 4), torch.randn(10, 2))
    with pytest.raises(ValueError, match="xb must have n_b=2"):
        cc.update(torch.randn(10, 3), torch.randn(10, 5))
    with pytest.raises(TypeError, match="xb must be float16"):
        cc.update(torch.randn(10, 3), torch.ones(10, 2, dtype=torch.int64))
    with pytest.raises(MemoryError, match="co-moment"):
        sa.CrossCorrelation(100_000, 100_000)
    for k, v in cc.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- sparse codes
def _topk_codes(T, n, k, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    # Feature 0 fires on every token; the others are drawn without repeats.
    rows = [torch.cat([torch.zeros(1).long(), 1 + torch.randperm(n - 1, generator=g)[: k - 1]]) for _ in range(T)]
    idx = torch.stack(rows) if T else torch.zeros(0, k).long()
    val = torch.rand(T, k, generator=g) * 3 + offset
    if T > 3:
        idx[::3, -1] = -1  # padding
    return idx, val


def _densify(idx, val, n):
    x = torch.zeros(idx.shape[0], n, dtype=torch.float64)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    m = idx >= 0
    x[rows[m], idx[m]] = val[m].double()
    return x


@pytest.mark.parametrize("T,na,nb,ka,kb", [(1, 3, 2, 2, 1), (0, 5, 4, 2, 2), (257, 97, 33, 7, 4)])
def test_update_sparse_equals_dense_update(backend_device, T, na, nb, ka, kb):
    backend, device = backend_device
    ia, va = _topk_codes(T, na, ka, seed=T + 1, offset=20.0)
    ib, vb = _topk_codes(T, nb, kb, seed=T + 2)
    sparse = sa.CrossCorrelation(na, nb, backend=backend)
    dense = sa.CrossCorrelation(na, nb, backend="reference")
    for s in (slice(0, T // 3), slice(T // 3, T)):  # streaming, uneven splits
        sparse.update_sparse(ia[s].to(device), va[s].to(device), ib[s].to(device), vb[s].to(device))
        dense.update(_densify(ia[s], va[s], na), _densify(ib[s], vb[s], nb))
    got, want = sparse.state_dict(), dense.state_dict()
    assert int(got["n_tokens"]) == int(want["n_tokens"]) == T
    # Triton's per-feature moments accumulate in float32 inside the kernel.
    tol = 1e-4 if backend == "triton" else 1e-9
    for key in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment"):
        assert torch.allclose(got[key].cpu(), want[key], rtol=tol, atol=tol), key
    if T > 1:
        np.testing.assert_allclose(sparse.correlation().cpu().numpy(), dense.correlation().numpy(), atol=1e-6)


def test_update_sparse_drops_nonfinite_tokens_and_rejects_bad_input():
    ia, va = _topk_codes(20, 9, 3, seed=0)
    ib, vb = _topk_codes(20, 6, 2, seed=1)
    va[4, 1] = float("nan")
    cc = sa.CrossCorrelation(9, 6).update_sparse(ia, va, ib, vb)
    assert cc.n_tokens == 19 and cc.n_skipped == 1
    before = cc.state_dict()
    bad = [
        ((ia[:5], va[:5], ib, vb), ValueError, "same tokens"),
        ((ia + 20, va, ib, vb), ValueError, "indices_a must be in"),
        ((ia, va, ib, vb.double()), TypeError, "share a dtype"),
        ((ia.float(), va, ib, vb), TypeError, "indices_a must be int"),
        ((ia, va[:, :2], ib, vb), ValueError, "values_a must have the shape"),
    ]
    dup = ib.clone()
    dup[0, 1] = dup[0, 0]
    bad.append(((ia, va, dup, vb), ValueError, "twice"))
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            cc.update_sparse(*args)
    after = cc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bfloat16 tensor-core dot runs on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_dot_on_gpu_within_bfloat16_rounding(backend, dtype):
    """precision "bf16" on the GPU's tensor cores: centred values rounded to bfloat16 cost
    ~2^-9 relative each, so the co-moment stays within a few 2^-9 of the exact one (in units
    of sum |ca||cb|), and a planted best match survives."""
    from supanalysis.ops.cross_moments import ENTRY

    g = torch.Generator().manual_seed(7)
    T, na, nb = 3000, 150, 70
    xa = torch.randn(T, na, generator=g, dtype=torch.float64) * 2 + 5
    xb = torch.randn(T, nb, generator=g, dtype=torch.float64) - 3
    xb[:, 11] = 0.9 * xa[:, 40] + 0.1 * xb[:, 11]  # planted: a40 ~ b11
    xa, xb = xa.to(dtype), xb.to(dtype)
    a, b = xa.double(), xb.double()
    ca, cb = a - a.mean(0), b - b.mean(0)
    exact, scale = ca.T @ cb, ca.abs().T @ cb.abs()
    zeros = lambda n: torch.zeros(n, dtype=torch.float64, device="cuda")  # noqa: E731
    C = torch.zeros(na, nb, dtype=torch.float64, device="cuda")
    ENTRY.implementation(backend)(C, 0, zeros(na), zeros(nb), xa.cuda(), xb.cuda(), "bf16")
    err = ((C.cpu() - exact).abs() / scale).max().item()
    assert err < 4 * 2**-9, err
    corr = C.cpu() / torch.outer(ca.norm(dim=0), cb.norm(dim=0))
    assert corr[:, 11].argmax().item() == 40 and corr[40, 11] > 0.95


# ----------------------------------------------------------------------------- precision "bf16"
def _bf16_case(seed: int, dtype: torch.dtype, T: int = 700, na: int = 37, nb: int = 19):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(T, na, generator=g, dtype=torch.float64) * 2 + 5
    xb = torch.randn(T, nb, generator=g, dtype=torch.float64) - 3
    xb[:, 7] = 0.9 * xa[:, 20] + 0.1 * xb[:, 7]  # planted: a20 ~ b7
    return xa.to(dtype), xb.to(dtype)


@pytest.mark.parametrize(
    "dtype,T,na,nb",
    [(torch.float32, 700, 37, 19), (torch.float16, 700, 37, 19), (torch.float32, 4500, 150, 70)],
    ids=["fp32", "fp16", "fp32-tiles"],  # the last: several 64/128-wide tiles, T > one float32 run
)
def test_bf16_precision_multiplies_the_rounded_values(backend_device, dtype, T, na, nb):
    """Every backend's "bf16" update multiplies exactly the bfloat16-rounded centred values:
    it matches the float64 product of those values to float32 summation error, and it is
    measurably not the "ieee" update (the test fails if the rounding is skipped)."""
    from supanalysis.ops.cross_moments import ENTRY, cross_moments_update_reference

    backend, device = backend_device
    xa, xb = _bf16_case(11, dtype, T, na, nb)
    z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    want = torch.zeros(na, nb, dtype=torch.float64)
    exact = torch.zeros(na, nb, dtype=torch.float64)
    cross_moments_update_reference(want, 0, z(na), z(nb), xa, xb, "bf16")
    cross_moments_update_reference(exact, 0, z(na), z(nb), xa, xb)
    a, b = xa.double(), xb.double()
    scale = (a - a.mean(0)).abs().T @ (b - b.mean(0)).abs()
    C = torch.zeros(na, nb, dtype=torch.float64, device=device)
    zd = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
    ENTRY.implementation(backend)(C, 0, zd(na), zd(nb), xa.to(device), xb.to(device), "bf16")
    err = ((C.cpu() - want).abs() / scale).max().item()
    rounding = ((exact - want).abs() / scale).max().item()
    assert err < 2e-6, err  # measured: 5e-8 (cpp, Triton interpreter)
    assert rounding > 100 * 2e-6, rounding  # the rounding is visible at this tolerance
    assert rounding < 4 * 2**-9, rounding


def test_bf16_cross_correlation_keeps_the_best_match(backend_device):
    """The accumulator's opt-in precision: streamed in three batches, the correlations stay
    within a few 2^-9 of the exact ones, the planted match survives, and means and variances
    are as exact as with the default."""
    backend, device = backend_device
    xa, xb = _bf16_case(12, torch.float32, T=900)
    exact = sa.CrossCorrelation(xa.shape[1], xb.shape[1], backend=backend, device=device)
    rounded = sa.CrossCorrelation(xa.shape[1], xb.shape[1], backend=backend, device=device, precision="bf16")
    for lo, hi in ((0, 250), (250, 251), (251, 900)):
        exact.update(xa[lo:hi].to(device), xb[lo:hi].to(device))
        rounded.update(xa[lo:hi].to(device), xb[lo:hi].to(device))
    ce, cr = exact.correlation().cpu(), rounded.correlation().cpu()
    assert (ce - cr).abs().max().item() < 4 * 2**-9
    assert not torch.equal(ce, cr)
    bm = rounded.best_match()
    assert bm.match_b[7].item() == 20 and bm.max_corr_b[7].item() > 0.95
    assert torch.equal(bm.match_a.cpu(), exact.best_match().match_a.cpu())
    torch.testing.assert_close(rounded.mean_a, exact.mean_a, rtol=0, atol=0)
    assert "precision='bf16'" in repr(rounded)


def test_precision_bad_values_refused_and_state_kept(tmp_path):
    from supanalysis.ops.cross_moments import cross_moments_update

    with pytest.raises(ValueError, match="precision"):
        sa.CrossCorrelation(3, 2, precision="tf32")
    cc = sa.CrossCorrelation(3, 2, precision="bf16")
    with pytest.raises(ValueError, match=r"precision='bf16'.*float64"):
        cc.update(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    assert cc.n_tokens == 0 and not cc.comoment.any()
    C = torch.zeros(3, 2, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="precision"):
        cross_moments_update(C, 0, z, z[:2], torch.randn(4, 3), torch.randn(4, 2), precision="fp8")
    with pytest.raises(ValueError, match="float64"):
        cross_moments_update(C, 0, z, z[:2], torch.randn(4, 3).double(), torch.randn(4, 2), precision="bf16")
    assert not C.any()
    # The precision travels with a saved accumulator; a file from before the option loads as "ieee".
    cc.update(torch.randn(6, 3), torch.randn(6, 2))
    cc.save(tmp_path / "cc.safetensors")
    back = sa.CrossCorrelation.load(tmp_path / "cc.safetensors")
    assert back.precision == "bf16" and torch.equal(back.comoment, cc.comoment)
    from supanalysis.accumulators._state import FORMAT_VERSION, atomic_save

    meta = {"kind": "CrossCorrelation", "version": FORMAT_VERSION, "n_a": 3, "n_b": 2}
    atomic_save(cc.state_dict(), meta, tmp_path / "old.safetensors")
    old = sa.CrossCorrelation.load(tmp_path / "old.safetensors")
    assert old.precision == "ieee" and torch.equal(old.comoment, cc.comoment)
    meta["precision"] = "fp8"
    atomic_save(cc.state_dict(), meta, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="precision"):
        sa.CrossCorrelation.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="match_precision"):
        sa.TestConfig(match_precision="half")
