"""SparseCoActivation: exact sparse pair counts equal the dense CoActivation."""

from __future__ import annotations

import pytest
import torch

import supanalysis as sa
from supanalysis.accumulators import sparse_coactivation as SC
from supanalysis.accumulators.sparse_coactivation import SparseCoActivation


def _codes(T=300, n=50, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    idx[::4, -1] = -1  # padding
    idx[:, 0] = torch.where(torch.arange(T) % 2 == 0, 7, idx[:, 0])  # a hot feature ...
    # ... without listing it twice in a row
    dup = (idx[:, 1:] == 7).any(1) & (idx[:, 0] == 7)
    idx[dup, 0] = -1
    val = torch.rand(T, k, generator=g) - 0.3
    return idx, val


@pytest.mark.parametrize("chunk", [SC.CHUNK_PAIRS, 7])
def test_counts_equal_dense_and_stream(monkeypatch, chunk):
    monkeypatch.setattr(SC, "CHUNK_PAIRS", chunk)  # 7 pairs: many chunks per batch
    idx, _ = _codes()
    dense = sa.CoActivation(50).update_sparse(idx)
    sparse = SparseCoActivation(50)
    for part in idx.split(41):
        sparse.update_sparse(part)
    assert torch.equal(sparse.to_dense(), dense.counts())
    assert torch.equal(sparse.fire_count, dense.counts().diagonal())
    assert sparse.n_tokens == 300 and 0 < sparse.n_pairs < 50 * 49 // 2


def test_values_and_threshold_equal_dense_update():
    idx, val = _codes(seed=1)
    x = torch.zeros(300, 50)
    rows = torch.arange(300)[:, None].expand_as(idx)
    m = idx >= 0
    x[rows[m], idx[m]] = val[m]
    dense = sa.CoActivation(50, threshold=0.2).update(x)
    sparse = SparseCoActivation(50, threshold=0.2).update_sparse(idx, val)
    assert torch.equal(sparse.to_dense(), dense.counts())


@pytest.mark.parametrize("metric", ["count", "jaccard", "lift"])
def test_top_partners_equal_dense_on_co_firing_partners(metric):
    idx, _ = _codes(seed=2)
    dense = sa.CoActivation(50).update_sparse(idx)
    sparse = SparseCoActivation(50).update_sparse(idx)
    di, dv = dense.top_partners(5, metric)
    si, sv = sparse.top_partners(5, metric)
    pos = dv > 0  # partners that co-fired; the dense one also lists zero-score partners
    assert torch.equal(si[pos], di[pos]) and torch.allclose(sv[pos], dv[pos])
    assert bool((si[~pos] == -1).all()) and bool((sv[~pos] == 0).all())


def test_merge_save_load_and_refusals(tmp_path):
    idx, _ = _codes(seed=3)
    a = SparseCoActivation(50).update_sparse(idx[:100])
    b = SparseCoActivation(50).update_sparse(idx[100:])
    whole = SparseCoActivation(50).update_sparse(idx)
    a.merge(b)
    assert torch.equal(a.to_dense(), whole.to_dense()) and a.n_tokens == 300
    path = tmp_path / "co.safetensors"
    a.save(path)
    back = SparseCoActivation.load(path)
    assert torch.equal(back.to_dense(), whole.to_dense()) and back.n_tokens == 300
    # States no update can produce are refused, and bad input leaves the state unchanged.
    st = a.state_dict()
    for key, edit in (("keys", lambda t: t.flip(0)), ("counts", lambda t: t + 10**6), ("fire_count", lambda t: -t)):
        bad = dict(st)
        bad[key] = edit(st[key])
        with pytest.raises(ValueError, match="inconsistent"):
            SparseCoActivation(50).load_state_dict(bad)
    before = a.state_dict()
    for args, exc in (((idx + 50,), ValueError), ((idx.float(),), TypeError), ((idx[0],), ValueError)):
        with pytest.raises(exc):
            a.update_sparse(*args)
    with pytest.raises(ValueError, match="values"):
        a.update_sparse(idx, torch.rand(3, 3))
    assert all(torch.equal(before[k], a.state_dict()[k]) for k in before)
    with pytest.raises(ValueError, match="n must be"):
        SparseCoActivation(0)
    with pytest.raises(MemoryError):
        SparseCoActivation(10**6).to_dense()
