"""The test's quantities and decision rules on hand-computed cases (SCIENCE.md)."""

from __future__ import annotations

import math

import pytest
import torch

from supanalysis import science as S


def test_g_minimum_and_inverse():
    assert S.g(1 / math.e) == pytest.approx(math.e)
    assert S.g(0.1) > math.e and S.g(0.5) > math.e
    assert S.g_inv(10.0) == pytest.approx(0.027955, abs=1e-6)
    for p in (1e-6, 1e-3, 0.02, 0.3):
        assert S.g_inv(S.g(p)) == pytest.approx(p, rel=1e-10)
    assert S.g_inv(2.0) is None  # below the minimum e: no superposition pressure
    assert S.g_inv(math.e) == pytest.approx(1 / math.e)
    with pytest.raises(ValueError):
        S.g(0.0)


def test_predicted_ratio_by_hand():
    # σ_A = 10, σ_B = 20, C = 1: p*_A = g⁻¹(10) ≈ 0.027955, p*_B = g⁻¹(20).
    pa, pb = S.g_inv(10.0), S.g_inv(20.0)
    assert S.g(pb) == pytest.approx(20.0)
    assert S.predicted_ratio(10.0, 20.0, 1.0) == pytest.approx(pb / pa)
    assert S.predicted_ratio(10.0, 20.0, 1.0) < 1  # more features per neuron -> sparser
    assert S.predicted_ratio(2.0, 20.0, 1.0) is None
    assert S.predicted_ratio(20.0, 40.0, 2.0) == pytest.approx(pb / pa)


def test_bound_tightness_and_kaplan():
    assert S.bound_tightness(S.g(0.01) * 3, 0.01) == pytest.approx(3.0)
    assert S.bound_tightness(1.0, 0.0) is None
    assert S.kaplan_params(48, 1600) == pytest.approx(1.4746e9, rel=1e-4)
    assert S.kaplan_params(6, 4288) == pytest.approx(1.3239e9, rel=1e-4)
    assert S.kaplan_params(2, 128) == S.kaplan_params(8, 64) == 393_216


def test_bootstrap_median_ci():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g, dtype=torch.float64) + 3
    est = S.bootstrap(x, "median", n_boot=500, seed=1)
    assert est.contains(3.0) and est.lo < est.value < est.hi
    assert est.hi - est.lo < 0.2
    assert S.bootstrap(x, "median", n_boot=500, seed=1) == est  # deterministic
    assert S.bootstrap([], "median").n == 0


def test_paired_relative_difference():
    a = torch.full((500,), 2.0, dtype=torch.float64) + torch.rand(500, generator=torch.Generator().manual_seed(0))
    est = S.paired_relative_difference(a, a * 1.02, n_boot=300)
    assert est.value == pytest.approx(0.02) and est.contains(0.02)
    with pytest.raises(ValueError, match="same tokens"):
        S.paired_relative_difference(a, a[:10])


def _premises(ok=True):
    return [S.premise_equal_params(100, 100 if ok else 200), S.premise_different_neurons(64, 128, 512, 256)]


def test_premises():
    assert S.premise_equal_params(393_216, 393_216).holds
    p = S.premise_equal_params(100, 110)
    assert not p.holds and "9.09%" in p.detail
    ok = S.premise_equal_performance(S.Estimate(0.01, -0.005, 0.02, 100))
    assert ok.holds
    assert not S.premise_equal_performance(S.Estimate(0.01, -0.005, 0.04, 100)).holds
    assert not S.premise_different_neurons(64, 64, 128, 512).holds


def est(v, lo, hi):
    return S.Estimate(v, lo, hi, 50)


@pytest.mark.parametrize(
    "premises,mf,base,lr,pi,outcome",
    [
        (_premises(False), 0.9, 0.1, est(0, -0.1, 0.1), 0.5, S.PREMISES_NOT_MET),
        (_premises(), 0.3, 0.1, est(0, -0.1, 0.1), 0.5, S.NON_UNIVERSAL),
        (_premises(), 0.6, 0.7, est(0, -0.1, 0.1), 0.5, S.NON_UNIVERSAL),  # no better than baseline
        (_premises(), 0.9, 0.1, est(0.0, -0.1, 0.1), 0.5, S.CONTRADICTION),
        (_premises(), 0.9, 0.1, est(-0.7, -0.8, -0.6), 0.5, S.SPARSITY_FOLLOWS),
        (_premises(), 0.9, 0.1, est(0.0, -1.0, 1.0), 0.5, S.INCONCLUSIVE),  # too wide
        (_premises(), 0.9, 0.1, est(1.0, 0.9, 1.1), 0.5, S.INCONCLUSIVE),  # neither
        (_premises(), 0.9, 0.1, est(0.0, -0.1, 0.1), None, S.INCONCLUSIVE),  # no pressure
    ],
)
def test_verdict_branches(premises, mf, base, lr, pi, outcome):
    v = S.site_verdict(premises, mf, base, lr, pi, phi=0.5)
    assert v.outcome == outcome, v.reason
    assert v.reason and "matched_fraction" in v.numbers


def test_overall_verdict():
    a = S.Verdict(S.CONTRADICTION, "x")
    b = S.Verdict(S.NON_UNIVERSAL, "y")
    assert S.overall_verdict([a, a]).outcome == S.CONTRADICTION
    mixed = S.overall_verdict([a, b, a])
    assert mixed.outcome == S.INCONCLUSIVE and mixed.numbers["tally"][S.CONTRADICTION] == 2
    assert S.overall_verdict([]).outcome == S.INCONCLUSIVE
