"""TopKCodes: codes checked once and shared by every pair they feed give the per-pair result."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_DEVICES

import supanalysis as sa
from supanalysis.accumulators import TopKCodes
from supanalysis.experiment.matching import update_dense
from supanalysis.ops.sparse_outer import sparse_outer_update

CPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cpu"]


def _codes(T: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    idx[::5, -1] = -1  # padding
    return idx, torch.rand(T, k, generator=g) * 2 + 0.1


def _same(x: sa.CrossCorrelation, y: sa.CrossCorrelation) -> bool:
    a, b = x.state_dict(), y.state_dict()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_shared_codes_give_each_pair_its_own_update_bitwise():
    """update_dense (one TopKCodes per site, moments reused across pairs) equals the
    per-pair update_sparse, non-finite tokens included, over two streamed batches."""
    T, take = 48, 40
    sites_a = [_codes(T, 30, 4, s) for s in (0, 1)]
    sites_b = [_codes(T, 20, 3, s) for s in (2, 3, 4)]
    sites_b[1][1][7, 0] = float("nan")  # dropped from the pairs of B site 1 only
    pairs = [(i, j) for i in range(2) for j in range(3)]
    shared = {p: sa.CrossCorrelation(30, 20) for p in pairs}
    alone = {p: sa.CrossCorrelation(30, 20) for p in pairs}
    for batch in (slice(0, 24), slice(24, T)):
        ca = [(i[batch], v[batch]) for i, v in sites_a]
        cb = [(i[batch], v[batch]) for i, v in sites_b]
        n = min(take, 24)
        update_dense(shared, {}, ca, cb, n, torch.empty(0))
        for (i, j), cc in alone.items():
            cc.update_sparse(ca[i][0][:n], ca[i][1][:n], cb[j][0][:n], cb[j][1][:n])
    assert shared[(0, 1)].n_skipped == 1 and shared[(0, 0)].n_skipped == 0
    for p in pairs:
        assert _same(shared[p], alone[p]), p


def test_baselines_share_the_unshuffled_moments():
    T = 32
    (ia, va), (ib, vb) = _codes(T, 12, 3, 5), _codes(T, 9, 2, 6)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    cb = TopKCodes(ib, vb, 9)
    shuffled = cb.permuted(perm)
    assert shuffled.moments() is cb.moments()  # computed once, on the original order
    assert torch.equal(shuffled.indices, ib[perm].long())
    base = {(0, 0): sa.CrossCorrelation(12, 9)}
    update_dense({}, base, [(ia, va)], [(ib, vb)], T, perm)
    want = sa.CrossCorrelation(12, 9).update_sparse(ia, va, ib[perm], vb[perm])
    got, ref = base[(0, 0)].state_dict(), want.state_dict()
    for key in ref:  # the moments' summation order differs: equal to float64 rounding
        assert torch.allclose(got[key], ref[key], rtol=1e-12, atol=1e-12), key
    with pytest.raises(ValueError, match="permutation of 32 tokens"):
        cb.permuted(perm[:5])


def test_codes_are_checked_once_with_the_callers_names():
    idx, val = _codes(6, 8, 3, 0)
    dup = idx.clone()
    dup[1, 1] = dup[1, 0]
    with pytest.raises(ValueError, match=r"indices_b.*twice"):
        TopKCodes(dup, val, 8, names=("indices_b", "values_b"))
    with pytest.raises(ValueError, match=r"indices must be in \[-1, 4\)"):
        TopKCodes(idx, val, 4)
    cc = sa.CrossCorrelation(8, 5)
    with pytest.raises(ValueError, match="n_a=8 and n_b=5"):
        cc.update_codes(TopKCodes(idx, val, 8), TopKCodes(idx, val, 8))
    assert cc.n_tokens == 0
    val[2, 0] = float("inf")
    c = TopKCodes(idx, val, 8)
    assert not c.all_finite and c.rows(c.finite()).n_tokens == 5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_outer_keeps_the_token_order_of_every_element(backend):
    """Rows bucketed before accumulating still take their updates in token order: the
    result equals a plain sequential float64 loop bitwise (rows repeat across tokens,
    padding on both sides, strided inputs)."""
    g = torch.Generator().manual_seed(3)
    T, ka, kb, na, nb = 120, 4, 3, 6, 5
    ia = torch.stack([torch.randperm(na, generator=g)[:ka] for _ in range(T)])
    ib = torch.stack([torch.randperm(nb, generator=g)[:kb] for _ in range(T)])
    ia[::7, 1], ib[::4, 0] = -1, -1
    va = torch.randn(T, 2 * ka, generator=g, dtype=torch.float64)[:, ::2]  # strided
    vb = torch.randn(T, kb, generator=g, dtype=torch.float64) * 1e3
    want = torch.zeros(na, nb, dtype=torch.float64)
    w = want.numpy()
    for t in range(T):
        for p in range(ka):
            for q in range(kb):
                if ia[t, p] >= 0 and ib[t, q] >= 0:
                    w[ia[t, p], ib[t, q]] += float(va[t, p]) * float(vb[t, q])
    got = torch.zeros(na, nb, dtype=torch.float64)
    sparse_outer_update(got, ia, va, ib, vb, backend=backend)
    if backend == "cpp":
        assert torch.equal(got, want)
    else:  # other backends sum in another order
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)
