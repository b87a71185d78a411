"""best_match_tiled: row blocks recomputed over stored activations equal the one-pass best match."""

from __future__ import annotations

import pytest
import torch

import supanalysis as sa
from supanalysis.accumulators.tiled import best_match_tiled


def _batches(T=400, na=29, nb=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(T, na, generator=g)
    xb = torch.randn(T, nb, generator=g)
    xb[:, 0] = 2 * xa[:, 20] + 0.1 * xb[:, 0]  # B0's partner lives in a late block
    xb[:, 1] = -xa[:, 3]  # anti-correlated only: not a match
    xb[:, 2] = 5.0  # constant
    xa[:, 7] = xa[:, 8]  # two identical A features: B's tie goes to the smaller index
    xb[:, 3] = xa[:, 7] + 0.01 * xb[:, 3]
    return list(zip(xa.split(64), xb.split(64)))


def _assert_same(got: sa.BestMatch, want: sa.BestMatch):
    for f in ("max_corr_a", "max_corr_b"):
        assert torch.allclose(getattr(got, f), getattr(want, f), atol=1e-12), f
    for f in ("match_a", "match_b", "constant_a", "constant_b"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


@pytest.mark.parametrize("budget_rows", [1, 4, 10, 29])
def test_tiled_equals_one_pass(budget_rows):
    data = _batches()
    one = sa.CrossCorrelation(29, 11)
    for xa, xb in data:
        one.update(xa, xb)
    r = best_match_tiled(lambda: iter(data), 29, 11, max_bytes=budget_rows * 11 * 8, progress=False)
    assert r.mode == ("dense" if budget_rows == 29 else "tiled")
    assert r.passes == -(-29 // budget_rows) and r.n_tokens == 400
    _assert_same(r.best, one.best_match())
    assert int(r.best.match_b[0]) == 20 and int(r.best.match_b[3]) == 7


def test_tiled_sparse_codes_equal_one_pass():
    g = torch.Generator().manual_seed(1)
    T, na, nb, k = 300, 40, 17, 4
    ia = torch.stack([torch.randperm(na, generator=g)[:k] for _ in range(T)])
    ib = torch.stack([torch.randperm(nb, generator=g)[:k] for _ in range(T)])
    va, vb = torch.rand(T, k, generator=g), torch.rand(T, k, generator=g)
    vb[:, 0] = 2 * va[:, 0]  # shared structure wherever the leading codes coincide
    ia[::5, -1] = -1  # padding
    rows = [(ia[s], va[s], ib[s], vb[s]) for s in (slice(0, 100), slice(100, 300))]
    one = sa.CrossCorrelation(na, nb)
    for r in rows:
        one.update_sparse(*r)
    got = best_match_tiled(lambda: iter(rows), na, nb, max_bytes=7 * nb * 8, progress=False)
    assert got.mode == "tiled" and got.passes == 6 and got.n_tokens == T
    _assert_same(got.best, one.best_match())


def test_tiled_refuses_a_stream_that_changes_and_a_tiny_budget():
    data = _batches()
    calls = [0]

    def shrinking():
        calls[0] += 1
        return iter(data[: len(data) - calls[0]])

    with pytest.raises(ValueError, match="same stored activations"):
        best_match_tiled(shrinking, 29, 11, max_bytes=10 * 11 * 8, progress=False)
    with pytest.raises(MemoryError, match="one row"):
        best_match_tiled(lambda: iter(data), 29, 11, max_bytes=8, progress=False)
    with pytest.raises(ValueError, match="n_a"):
        best_match_tiled(lambda: iter(data), 0, 11, progress=False)
