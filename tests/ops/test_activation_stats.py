"""activation_stats (dense and sparse) and ActivationStats against float64 ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FAST_BACKEND_DEVICES, assert_tolerance_rule, ids, interpreting

import supanalysis as sa
from supanalysis.ops.activation_stats import activation_stats_reference, densify_codes

FIELDS = ("finite_count", "fire_count", "mean", "m2", "max", "min", "active_sum", "l0")


def numpy_stats(x: np.ndarray, thr: float) -> dict[str, np.ndarray]:
    """Independent float64 numpy ground truth (not the library's reference)."""
    x = x.astype(np.float64)
    fin = np.isfinite(x)
    cnt = fin.sum(0)
    xf = np.where(fin, x, 0.0)
    mean = xf.sum(0) / np.maximum(cnt, 1)
    m2 = (np.where(fin, x - mean, 0.0) ** 2).sum(0)
    fire = fin & (x > thr)
    return {
        "finite_count": cnt,
        "fire_count": fire.sum(0),
        "mean": mean,
        "m2": m2,
        "max": np.where(fin, x, -np.inf).max(0, initial=-np.inf),
        "min": np.where(fin, x, np.inf).min(0, initial=np.inf),
        "active_sum": np.where(fire, x, 0.0).sum(0),
        "l0": fire.sum(1),
    }


def same_dtype_stats(x: torch.Tensor, thr: float) -> dict[str, torch.Tensor]:
    """What a user would compute in x's own dtype (the error yardstick of the tolerance rule)."""
    fin = torch.isfinite(x)
    xf = torch.where(fin, x, torch.zeros((), dtype=x.dtype))
    cnt = fin.sum(0)
    mean = xf.sum(0) / cnt.clamp_min(1).to(x.dtype)
    d = torch.where(fin, x - mean, torch.zeros((), dtype=x.dtype))
    fire = fin & (x > thr)
    return {
        "mean": mean,
        "m2": (d * d).sum(0),
        "active_sum": torch.where(fire, x, torch.zeros((), dtype=x.dtype)).sum(0),
    }


def test_reference_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 97, generator=g, dtype=torch.float64)
    x[5, 3] = float("nan")
    x[7, 3] = float("inf")
    x[:, 10] = float("nan")  # a feature with no finite value at all
    ref = activation_stats_reference(x, 0.25)
    want = numpy_stats(x.numpy(), 0.25)
    for name, got in zip(FIELDS, ref):
        np.testing.assert_allclose(got.numpy(), want[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_exact_small_case(backend_device):
    backend, device = backend_device
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, -1.0, nan, 0.0], [2.0, 0.0, inf, 0.0], [3.0, 5.0, 0.5, 0.0]], device=device)
    b = sa.activation_stats(x, 0.0, backend=backend)
    assert b.finite_count.tolist() == [3, 3, 1, 3]
    assert b.fire_count.tolist() == [3, 1, 1, 0]
    assert b.l0.tolist() == [1, 1, 3]
    assert b.mean.tolist() == pytest.approx([2.0, 4.0 / 3.0, 0.5, 0.0], abs=1e-6)
    assert b.m2.tolist() == pytest.approx([2.0, 49 / 9 + 16 / 9 + 121 / 9, 0.0, 0.0], abs=1e-5)
    assert b.max.tolist() == [3.0, 5.0, 0.5, 0.0]
    assert b.min.tolist() == [1.0, -1.0, 0.5, 0.0]
    assert b.active_sum.tolist() == pytest.approx([6.0, 5.0, 0.5, 0.0])
    for t in (b.finite_count, b.fire_count, b.l0):
        assert t.dtype == torch.int64
    for t in (b.mean, b.m2, b.max, b.min, b.active_sum):
        assert t.dtype == torch.float64


@pytest.mark.parametrize("n", [1, 97, 1025])
@pytest.mark.parametrize("T", [0, 1, 67, 300])
def test_random_float32_against_reference(backend_device, T, n):
    backend, device = backend_device
    if interpreting(backend, device) and T * n > 40_000:
        T = 37
    g = torch.Generator().manual_seed(T * 7919 + n)
    x = (torch.randn(T, n, generator=g) * 3 + 1).to(device)
    if T > 2:
        x[1, 0] = float("nan")
        x[2, -1] = float("-inf")
    thr = 0.5
    got = sa.activation_stats(x, thr, backend=backend)
    ref = activation_stats_reference(x.double(), thr)
    same = same_dtype_stats(x, thr)
    for name, g_, r in zip(FIELDS, got, ref):
        assert g_.device.type == device
        if name in ("finite_count", "fire_count", "l0", "max", "min"):
            assert torch.equal(g_.cpu().to(r.dtype), r.cpu()), name  # exact: counts and float32 extrema
        else:
            scale = {"mean": 4.0, "m2": 16.0 * max(T, 1), "active_sum": 8.0 * max(T, 1)}[name]
            assert_tolerance_rule(g_, r, same[name], atol=1e-6 * scale, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# Vector loads throughout; a ragged last group (GPU); a last feature in the C++ scalar tail.
@pytest.mark.parametrize("n", [1024, 1000, 1001])
def test_chunked_pass_with_non_finite_entries_mid_stream(backend_device, n, dtype):
    """600 tokens: several token splits on a GPU, whole 32-token chunks on the fast paths
    (no per-entry finiteness tests), chunks with NaN/+-inf between them redone carefully
    (+inf never fires in L0), a short tail; features offset by 1e3 expose a wrong shift."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(n)
    x = torch.randn(600, n, generator=g) * 0.5 + 1000
    x[:, ::7] -= 1000  # features centred on 0, firing about half the time
    x[100, 5], x[64, 9], x[131, -1], x[599, 3] = float("nan"), float("inf"), float("-inf"), float("inf")
    x = x.to(dtype)
    got = sa.activation_stats(x.to(device), 0.05, backend=backend)
    ref = activation_stats_reference(x.double(), 0.05)
    same = same_dtype_stats(x, 0.05)
    for name, g_, r in zip(FIELDS, got, ref):
        if name in ("finite_count", "fire_count", "l0", "max", "min"):
            assert torch.equal(g_.cpu().to(r.dtype), r.cpu()), name
        else:
            scale = {"mean": 1e3, "m2": 600.0, "active_sum": 600e3}[name]
            assert_tolerance_rule(g_, r, same[name], atol=1e-6 * scale, what=f"{dtype} {name}")


def test_features_that_jump_or_drift_far_from_their_early_values(backend_device):
    """Kernels that take deviations from a running mean must stay at float32 rounding of the
    total M2 when a feature leaves its early values far behind: zeros, then values 1e4 above
    them; and a steady drift of 3e3 over the batch (the mean lags the values throughout)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    T = 2000
    x = torch.randn(T, 16, generator=g, dtype=torch.float64)
    x[:700, :8] = 0.0
    x[700:, :8] += 1e4
    x[:, 8:] += torch.linspace(0, 3e3, T, dtype=torch.float64)[:, None]
    x = x.float()
    got = sa.activation_stats(x.to(device), 0.0, backend=backend)
    ref = activation_stats_reference(x.double(), 0.0)
    same = same_dtype_stats(x, 0.0)
    for cols, what in ((slice(0, 8), "jump"), (slice(8, 16), "drift")):
        m2 = ref[3][cols]
        assert_tolerance_rule(got.m2[cols], m2, same["m2"][cols], atol=1e-7 * m2.max().item(), what=f"{what} m2")
        assert_tolerance_rule(got.mean[cols], ref[2][cols], same["mean"][cols], atol=1e-3, what=f"{what} mean")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_far_shift_falls_back_to_the_two_pass(backend_device, threads):
    """One-pass kernels (deviations from an earlier mean, then M2 = sum d^2 - (sum d)^2 / n)
    must notice when a tile's mean is far from that shift and take deviations from the
    tile's own mean instead: a jump of 1e4 at a tile boundary, and a feature whose only
    early finite value is an outlier (its first mean is that value). Both cancelled in
    float32 to ~10x the error of a float32 two-pass before the check existed."""
    backend, device = backend_device
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        jump = torch.randn(1024, 8, generator=g)
        jump[128:] += 1e4
        outlier = torch.randn(1024, 8, generator=g)
        outlier[:128, 0] = float("nan")
        outlier[0, 0] = 1000.0
        for x, what in ((jump, "jump"), (outlier, "outlier first")):
            got = sa.activation_stats(x.to(device), 0.5, backend=backend)
            ref = activation_stats_reference(x.double(), 0.5)
            same = same_dtype_stats(x, 0.5)
            assert_tolerance_rule(got.m2, ref[3], same["m2"], atol=1e-6 * 16 * 1024, what=f"{what} m2")
            assert_tolerance_rule(got.mean, ref[2], same["mean"], atol=4e-6, what=f"{what} mean")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [8, 9, 1])  # whole vectors, a ragged last lane, a lone one
def test_few_early_finite_values_do_not_loosen_the_one_pass_check(backend_device, n):
    """A feature with only two finite values in its first tile (-1 and 1), then values near 1
    with a spread of 1e-3: the second tile's mean sits far from the shift (0) against its own
    spread, so it must take deviations from its own mean (an allowance scaled by the
    feature's variance per tile once let it through: 150x the float32 two-pass error). One
    update and the same data split in two must agree to rounding."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(n)
    x = torch.full((1024, n), float("nan"))
    x[0], x[1] = -1.0, 1.0
    x[128:] = 1.0 + 1e-3 * torch.randn(896, n, generator=g)
    ref = activation_stats_reference(x.double(), 0.5)
    same = same_dtype_stats(x, 0.5)
    whole = sa.activation_stats(x.to(device), 0.5, backend=backend)
    assert_tolerance_rule(whole.m2, ref[3], same["m2"], atol=1e-9, what="m2")
    acc = sa.ActivationStats(n, backend=backend)
    for part in x.split([2, 1022]):
        acc.update(part.to(device))
    var = whole.m2.cpu().double() / whole.finite_count.cpu().double()
    assert torch.allclose(acc.var.cpu(), var, rtol=1e-6, atol=1e-12), (acc.var, var)


def test_large_values_keep_finite_moments(backend_device):
    """Deviations whose squares overflow float32 over a tile (values near 2e18 after zeros,
    0.1% apart) are redone about the tile's mean, where they are ~2e15; a float64 constant
    of 1e200 has M2 0, not NaN (0 * inf in the merge into an empty state)."""
    backend, device = backend_device
    x = torch.zeros(256, 1)
    x[128:] = 2e18 * (1 + 1e-3 * torch.randn(128, 1, generator=torch.Generator().manual_seed(0)))
    got = sa.activation_stats(x.to(device), 0.5, backend=backend)
    ref = activation_stats_reference(x.double(), 0.5)
    assert torch.isfinite(got.m2).all(), got.m2
    assert got.m2.cpu().double().sub(ref[3]).abs().item() <= 1e-6 * ref[3].item()
    # A ragged last lane (the C++ kernel's scalar tail) where v - shift overflows float32:
    # the mean stays right (M2 overflows float32 there, as in torch's float32 two-pass).
    edge = torch.randn(512, 9, generator=torch.Generator().manual_seed(1))  # rows 0-255: one thread
    edge[:, 8] = float("nan")
    edge[0, 8], edge[128, 8], edge[129, 8] = -3e38, 1e38, 1.1e38
    got = sa.activation_stats(edge.to(device), 0.5, backend=backend)
    want = activation_stats_reference(edge.double(), 0.5)[2][8].item()
    assert abs(got.mean[8].item() - want) <= 1e-6 * abs(want), (got.mean[8].item(), want)
    if backend != "triton" or device != "cpu":  # no float64 arithmetic change under the interpreter
        big = sa.activation_stats(torch.full((10, 3), 1e200, dtype=torch.float64).to(device), 0.0, backend=backend)
        assert big.m2.cpu().tolist() == [0.0] * 3 and big.mean.cpu().tolist() == [1e200] * 3


@pytest.mark.parametrize("lead", [32, 45])  # one whole chunk, and past a chunk boundary
def test_leading_non_finite_rows_then_offset_values(backend_device, lead):
    """Features whose first rows are all NaN (left padding) and whose values then sit 1e4
    from 0 with unit spread, over enough tokens that a token split holds several chunks: a
    kernel must not take deviations from a made-up shift of 0 (that cancelled to a negative
    M2). And a constant feature's M2 is exactly 0, never negative."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(lead)
    x = (1e4 + torch.randn(1000, 20, generator=g, dtype=torch.float64)).float()
    x[:lead] = float("nan")
    got = sa.activation_stats(x.to(device), 0.0, backend=backend)
    ref = activation_stats_reference(x.double(), 0.0)
    same = same_dtype_stats(x, 0.0)
    assert_tolerance_rule(got.m2, ref[3], same["m2"], atol=1e-6 * 1000, what="m2")
    assert_tolerance_rule(got.mean, ref[2], same["mean"], atol=1e-6 * 1e4, what="mean")
    for T in (75, 77, 91, 200):
        const = sa.activation_stats(torch.full((T, 8), 0.3).to(device), 0.0, backend=backend)
        assert const.m2.cpu().tolist() == [0.0] * 8, (T, const.m2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend_device, dtype):
    backend, device = backend_device
    if interpreting(backend, device) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(257, 130, generator=g).to(dtype).to(device)
    got = sa.activation_stats(x, 0.0, backend=backend)
    ref = activation_stats_reference(x, 0.0)  # float64 of the same low-precision values
    same = same_dtype_stats(x, 0.0)
    assert torch.equal(got.fire_count.cpu(), ref[1].cpu())
    assert torch.equal(got.max.cpu(), ref[4].cpu())
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    for name, scale in (("mean", 1.0), ("m2", 257.0), ("active_sum", 257.0)):
        i = FIELDS.index(name)
        assert_tolerance_rule(getattr(got, name), ref[i], same[name], atol=rel * scale, what=f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend_device", FAST_BACKEND_DEVICES, ids=ids(FAST_BACKEND_DEVICES))
def test_every_16_bit_value_widens_exactly(backend_device, dtype):
    """All 65,536 bit patterns, one per feature, in 5 equal rows (the 4-row and 1-row paths)."""
    backend, device = backend_device
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    x = values.expand(5, -1).contiguous().to(device)
    got = sa.activation_stats(x, 0.0, backend=backend)
    v = values.double()
    finite = torch.isfinite(v)
    assert torch.equal(got.finite_count.cpu(), torch.where(finite, 5, 0))
    assert torch.equal(got.max.cpu()[finite], v[finite])
    assert torch.equal(got.min.cpu()[finite], v[finite])
    assert torch.equal(got.fire_count.cpu(), torch.where(finite & (v > 0), 5, 0))
    small = finite & (v.abs() < 1e30)  # 5 v stays finite in float32
    assert torch.equal(got.mean.cpu()[small], v[small])


def test_leading_dims_and_strided_rows(backend_device):
    backend, device = backend_device
    x = torch.randn(4, 5, 60, device=device)
    a = sa.activation_stats(x, backend=backend)
    b = sa.activation_stats(x.reshape(20, 60), backend=backend)
    assert torch.equal(a.fire_count, b.fire_count)
    wide = torch.randn(50, 90, device=device)
    sl = wide[:, 10:40]  # rows strided by 90, features contiguous
    c = sa.activation_stats(sl, backend=backend)
    d = sa.activation_stats(sl.contiguous(), backend=backend)
    assert torch.allclose(c.mean, d.mean) and torch.equal(c.l0, d.l0)
    t = sa.activation_stats(wide.T, backend=backend)  # features strided: copied once
    assert torch.equal(t.fire_count.cpu(), activation_stats_reference(wide.T.double(), 0.0)[1].cpu())


# ------------------------------------------------------------------ sparse
def random_codes(T, k, n, seed, device="cpu", pad=True):
    g = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
        if T
        else torch.zeros(0, k, dtype=torch.long)
    )
    val = torch.rand(T, k, generator=g) * 2 - 0.3
    if pad and T > 3 and k > 1:
        idx[0, -1] = -1
        idx[3, 0] = -1
    return idx.to(device), val.to(device)


@pytest.mark.parametrize("T,k,n", [(0, 4, 10), (1, 1, 1), (50, 5, 97), (200, 8, 130)])
@pytest.mark.parametrize("thr", [0.0, -0.5])
def test_sparse_matches_dense(backend_device, T, k, n, thr):
    backend, device = backend_device
    idx, val = random_codes(T, k, n, seed=T + k + n, device=device)
    if T > 5:
        val[5, 0] = float("nan")
    got = sa.activation_stats_sparse(idx, val, n, thr, backend=backend)
    ref = activation_stats_reference(densify_codes(idx, val, n), thr)
    for name, g_, r in zip(FIELDS, got, ref):
        if r.dtype == torch.int64:
            assert torch.equal(g_.cpu(), r.cpu()), name
        else:
            assert torch.allclose(g_.cpu(), r.cpu(), rtol=1e-5, atol=1e-5), name


def test_sparse_bad_input_leaves_state_unchanged():
    s = sa.ActivationStats(10)
    s.update_sparse(*random_codes(20, 3, 10, seed=1))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    idx, val = random_codes(5, 3, 10, seed=2)
    bad = idx.clone()
    bad[0, 0] = 10
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 10\)"):
        s.update_sparse(bad, val)
    dup = idx.clone()
    dup[1, 1] = dup[1, 0]
    with pytest.raises(ValueError, match="twice"):
        s.update_sparse(dup, val)
    with pytest.raises(ValueError, match="shape of indices"):
        s.update_sparse(idx, val[:, :2])
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        s.update_sparse(idx.float(), val)
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ accumulator
def test_accumulator_results_match_numpy(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 33, generator=g, dtype=torch.float64)
    x[3, 4] = float("nan")
    s = sa.ActivationStats(33, threshold=0.1, backend=backend)
    for part in x.to(device).split(97):
        s.update(part)
    want = numpy_stats(x.numpy(), 0.1)
    assert s.n_tokens == 400
    np.testing.assert_array_equal(s.fire_count.cpu().numpy(), want["fire_count"])
    np.testing.assert_allclose(s.density.cpu().numpy(), want["fire_count"] / 400)
    np.testing.assert_allclose(s.mean.cpu().numpy(), want["mean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.var.cpu().numpy(), want["m2"] / want["finite_count"], rtol=1e-9)
    np.testing.assert_allclose(s.mean_active.cpu().numpy(), want["active_sum"] / want["fire_count"], rtol=1e-9)
    assert s.nonfinite_count.tolist()[4] == 1 and int(s.nonfinite_count.sum()) == 1
    hist = s.l0_hist.cpu().numpy()
    np.testing.assert_array_equal(hist, np.bincount(want["l0"], minlength=34))
    assert s.mean_l0 == pytest.approx(want["l0"].mean())


def test_log10_density_hist_and_saelens_file(tmp_path):
    s = sa.ActivationStats(4)
    x = torch.zeros(1000, 4)
    x[:500, 0] = 1  # density 0.5
    x[:10, 1] = 1  # 0.01
    x[:1, 2] = 1  # 0.001
    s.update(x)  # feature 3 dead
    ld = s.log10_density()
    assert ld.tolist() == pytest.approx([math.log10(p + 1e-10) for p in (0.5, 0.01, 0.001, 0.0)], abs=1e-12)
    counts, edges = s.log10_density_hist()
    assert int(counts.sum()) == 4 and counts[0] == 1 and edges.numel() == 51
    from safetensors.torch import load_file

    s.save_saelens_sparsity(tmp_path / "sparsity.safetensors")
    sp = load_file(str(tmp_path / "sparsity.safetensors"))["sparsity"]
    assert sp.dtype == torch.float32 and torch.allclose(sp.double(), ld, atol=1e-6)
    with pytest.raises(ValueError, match="increasing"):
        s.log10_density_hist(bins=[0.0, -1.0])


def test_save_load_round_trip_and_refusals(tmp_path):
    s = sa.ActivationStats(7, threshold=0.3)
    s.update(torch.randn(50, 7))
    p = tmp_path / "stats.safetensors"
    s.save(p)
    t = sa.ActivationStats.load(p)
    assert t.n_features == 7 and t.threshold == 0.3 and t.n_tokens == 50
    for k, v in s.state_dict().items():
        assert torch.equal(v, t.state_dict()[k]), k
    c = sa.CoActivation(3)
    c.save(tmp_path / "coact.safetensors")
    with pytest.raises(ValueError, match="not a 'ActivationStats'"):
        sa.ActivationStats.load(tmp_path / "coact.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        sa.ActivationStats.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        sa.ActivationStats.load(tmp_path / "missing.safetensors")
    u = sa.ActivationStats(7)
    with pytest.raises(ValueError, match=r"mean must be torch.float64 of shape \(7,\)"):
        u.load_state_dict(s.state_dict() | {"mean": torch.zeros(7, dtype=torch.float32)})
    with pytest.raises(ValueError, match="missing"):
        sa.ActivationStats(8).load_state_dict({"mean": torch.zeros(8, dtype=torch.float64)})


def test_bad_input_names_argument_and_keeps_state():
    s = sa.ActivationStats(5)
    s.update(torch.randn(10, 5))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.raises(ValueError, match="x must have 5 features"):
        s.update(torch.randn(10, 6))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        s.update(torch.ones(10, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        s.update([[1.0] * 5])
    with pytest.raises(ValueError, match="merge"):
        s.merge(sa.ActivationStats(6))
    with pytest.raises(ValueError, match="n_features must be a positive int"):
        sa.ActivationStats(0)
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mismatched_devices_refused():
    s = sa.ActivationStats(3, device="meta")
    with pytest.raises(ValueError, match="state is on meta"):
        s.update(torch.randn(4, 3))
