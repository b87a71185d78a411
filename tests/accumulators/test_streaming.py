"""Streaming equals one-shot for any split of the tokens into batches (property tests)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import supanalysis as sa

T = 240


def splits(total: int):
    """Cut points of [0, total) into consecutive, possibly empty, batches."""
    return st.lists(st.integers(0, total), max_size=6).map(lambda cuts: [0, *sorted(cuts), total])


def batches(x: torch.Tensor, cuts: list[int]):
    return [x[a:b] for a, b in itertools.pairwise(cuts)]


DATA = torch.randn(T, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5 + 100
DATA[7, 3] = float("nan")
DATA_B = (
    torch.randn(T, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + DATA.nan_to_num(0.0)[:, :11]
)


@settings(max_examples=20, deadline=None)
@given(cuts=splits(T), backend=st.sampled_from(["reference", "cpp"]))
def test_activation_stats_any_split(cuts, backend):
    one = sa.ActivationStats(23, threshold=100.0, backend=backend).update(DATA)
    many = sa.ActivationStats(23, threshold=100.0, backend=backend)
    for b in batches(DATA, cuts):
        many.update(b)
    a, b = one.state_dict(), many.state_dict()
    for k in ("n_tokens", "finite_count", "fire_count", "max", "min", "l0_hist"):
        assert torch.equal(a[k], b[k]), k
    for k in ("mean", "m2", "active_sum"):
        assert torch.allclose(a[k], b[k], rtol=1e-12, atol=1e-9), k


@settings(max_examples=20, deadline=None)
@given(cuts=splits(T), backend=st.sampled_from(["reference", "cpp"]))
def test_cross_correlation_any_split(cuts, backend):
    xa, xb = DATA.nan_to_num(0.0), DATA_B
    one = sa.CrossCorrelation(23, 11, backend=backend).update(xa, xb)
    many = sa.CrossCorrelation(23, 11, backend=backend)
    for pa, pb in zip(batches(xa, cuts), batches(xb, cuts)):
        many.update(pa, pb)
    assert many.n_tokens == T
    assert torch.allclose(one.comoment, many.comoment, rtol=1e-10, atol=1e-8)
    assert torch.allclose(one.mean_a, many.mean_a, rtol=1e-14)


@settings(max_examples=20, deadline=None)
@given(cuts=splits(T), backend=st.sampled_from(["reference", "cpp"]))
def test_coactivation_any_split(cuts, backend):
    one = sa.CoActivation(23, threshold=100.0, backend=backend).update(DATA)
    many = sa.CoActivation(23, threshold=100.0, backend=backend)
    for b in batches(DATA, cuts):
        many.update(b)
    assert torch.equal(one.counts(), many.counts())


@settings(max_examples=20, deadline=None)
@given(cuts=splits(T))
def test_merge_of_shards_equals_one_pass(cuts):
    parts = []
    for b in batches(DATA, cuts):
        parts.append(sa.ActivationStats(23).update(b))
    total = parts[0]
    for p in parts[1:]:
        total.merge(p)
    one = sa.ActivationStats(23).update(DATA)
    assert torch.allclose(total.mean, one.mean, rtol=1e-12)
    assert torch.allclose(total.var, one.var, rtol=1e-10)
    assert torch.equal(total.l0_hist, one.l0_hist)
