"""CoActivation: exact pair counts, dense and sparse, and partner rankings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import supanalysis as sa


def numpy_counts(active: np.ndarray) -> np.ndarray:
    a = active.astype(np.int64)
    return a.T @ a


@pytest.mark.parametrize("T,n", [(0, 3), (1, 1), (67, 97), (300, 33)])
def test_dense_counts_exact(backend_device, T, n):
    backend, device = backend_device
    g = torch.Generator().manual_seed(T + n)
    x = torch.randn(T, n, generator=g)
    if T > 3:
        x[3, 0] = float("nan")
    c = sa.CoActivation(n, threshold=0.2, backend=backend)
    for part in x.split(50):
        c.update(part.to(device))
    active = np.isfinite(x.numpy()) & (x.numpy() > 0.2)
    np.testing.assert_array_equal(c.counts().cpu().numpy(), numpy_counts(active))
    assert c.n_tokens == T


@pytest.mark.parametrize("int8", ["0", "1"], ids=["float32-gemm", "int8-gemm"])
def test_cpu_dense_gemm_paths_agree(monkeypatch, int8):
    """The C++ backend forms B^T B as an int8 GEMM where the CPU has int8 dot products and as
    a float32 GEMM elsewhere; SUPANALYSIS_CPU_INT8_GEMM forces either: both are exact."""
    monkeypatch.setenv("SUPANALYSIS_CPU_INT8_GEMM", int8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(129, 70, generator=g).to(torch.bfloat16)
    x[7, 3], x[8, 4] = float("inf"), float("nan")
    c = sa.CoActivation(70, threshold=0.1, backend="cpp")
    c.update(x)
    xd = x.double().numpy()
    np.testing.assert_array_equal(c.counts().numpy(), numpy_counts(np.isfinite(xd) & (xd > 0.1)))


@pytest.mark.parametrize("int8", ["0", "1"], ids=["float32-gemm", "int8-gemm"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("T", [1, 5, 67, 300])
def test_cpu_dense_few_features_match_the_reference(monkeypatch, int8, n, T):
    """One feature makes B^T a [1, T] view with strides (1, 1), which the int8 GEMM once read as
    a row-major matrix of leading dimension 1 (garbage counts); two features is the next case
    up. Both GEMM paths, on a contiguous input and on a column slice of a wider one."""
    from supanalysis.ops.coactivation import coactivation_update, coactivation_update_reference

    monkeypatch.setenv("SUPANALYSIS_CPU_INT8_GEMM", int8)
    g = torch.Generator().manual_seed(10 * T + n)
    wide = torch.randn(T, n + 3, generator=g)
    wide[0, 0] = float("nan")
    for x in (wide[:, :n].contiguous(), wide[:, 1 : 1 + n], wide.t().contiguous().t()[:, :n]):
        got, want = torch.zeros(n, n, dtype=torch.int64), torch.zeros(n, n, dtype=torch.int64)
        coactivation_update(got, x, 0.1, backend="cpp")
        coactivation_update_reference(want, x, 0.1)
        assert torch.equal(got, want), (x.stride(), got.tolist(), want.tolist())


@pytest.mark.parametrize("T,k,n", [(0, 2, 5), (1, 1, 1), (60, 4, 97), (200, 8, 33)])
def test_sparse_counts_exact(backend_device, T, k, n):
    backend, device = backend_device
    g = torch.Generator().manual_seed(T * k + n)
    idx = (
        torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
        if T
        else torch.zeros(0, k, dtype=torch.long)
    )
    if T > 2 and k > 1:
        idx[2, 1] = -1
    c = sa.CoActivation(n, backend=backend).update_sparse(idx.to(device))
    active = np.zeros((T, n), dtype=bool)
    for t in range(T):
        for f in idx[t].tolist():
            if f >= 0:
                active[t, f] = True
    np.testing.assert_array_equal(c.counts().cpu().numpy(), numpy_counts(active))


def test_top_partners_metrics():
    # Features 0 and 1 always fire together; 2 fires with 0 half the time; 3 never fires.
    x = torch.zeros(8, 4)
    x[:4, 0] = 1
    x[:4, 1] = 1
    x[:2, 2] = 1
    x[6:, 2] = 1
    c = sa.CoActivation(4).update(x)
    idx, val = c.top_partners(2, "count")
    assert idx[0].tolist() == [1, 2] and val[0].tolist() == [4.0, 2.0]
    idx, val = c.top_partners(1, "jaccard")
    assert idx[0].tolist() == [1] and val[0].tolist() == [1.0]
    assert val[3].tolist() == [0.0]  # a dead feature: Jaccard undefined -> 0, never NaN
    _, lift = c.top_partners(1, "lift")
    assert lift[0].tolist() == pytest.approx([8 * 4 / (4 * 4)])
    idx, _ = sa.CoActivation(2).update(x[:, :2]).top_partners(5)
    assert idx[0].tolist() == [1]  # k clamped to the n - 1 partners a feature has
    with pytest.raises(ValueError, match="metric must be one of"):
        c.top_partners(1, "pmi")


def test_bad_input_and_round_trip(tmp_path):
    c = sa.CoActivation(5).update(torch.randn(30, 5))
    before = c.counts()
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 5\)"):
        c.update_sparse(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="x must have 5 features"):
        c.update(torch.randn(3, 4))
    assert torch.equal(c.counts(), before)
    c.save(tmp_path / "c.safetensors")
    d = sa.CoActivation.load(tmp_path / "c.safetensors")
    assert torch.equal(d.counts(), before) and d.n_tokens == 30
    e = sa.CoActivation(5).update(torch.randn(7, 5))
    tot = before + e.counts()
    assert torch.equal(c.merge(e).counts(), tot)


def test_threshold_compared_in_float64(backend_device):
    # float32(0.1) > 0.1 in float64; rounding the threshold to the nearest float32 would say no.
    backend, device = backend_device
    x = torch.tensor([[0.1, 0.2], [0.05, 0.1]], dtype=torch.float32, device=device)
    c = sa.CoActivation(2, threshold=0.1, backend=backend).update(x)
    s = sa.ActivationStats(2, threshold=0.1, backend=backend).update(x)
    assert c.counts().diagonal().tolist() == s.fire_count.tolist() == [1, 2]
