"""Universality relative to its reproducibility ceiling, and the adequate-dictionaries premise."""

from __future__ import annotations

import math

import pytest
import torch

from supanalysis.calibration import (
    NON_UNIVERSAL,
    UNIVERSAL,
    DictionaryQuality,
    decide_universality,
    matched_fraction,
    mean_best_match,
    premise_adequate_dictionaries,
    ratio_of_means,
    relative_universality,
)
from supanalysis.science import Estimate


def _best(n_matched: int, n_unmatched: int, hi: float = 0.9, lo: float = 0.1) -> torch.Tensor:
    return torch.tensor([hi] * n_matched + [lo] * n_unmatched, dtype=torch.float64)


def test_matched_fraction_leaves_out_undefined_correlations():
    est = matched_fraction(torch.tensor([0.9, 0.2, math.nan, 0.6]), tau=0.5)
    assert est.value == pytest.approx(2 / 3)
    assert est.n == 3
    assert 0.0 <= est.lo <= est.value <= est.hi <= 1.0
    assert mean_best_match(torch.tensor([0.9, math.nan, 0.3])).value == pytest.approx(0.6)


def test_identical_match_is_universal_within_reproducibility():
    g = torch.Generator().manual_seed(0)
    ceiling = torch.rand(400, generator=g, dtype=torch.float64)
    u = relative_universality(ceiling, ceiling, tau=0.5)
    assert u.value == pytest.approx(1.0)
    assert u.contains(1.0)
    d = decide_universality({"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 0.0}, {"a": u, "b": u})
    assert d.outcome == UNIVERSAL and d.calibrated


def test_half_the_features_missing_is_non_universal_with_u_near_one_half():
    ceiling = _best(300, 100)  # 75% of A's features recur in another seed of A
    cross = torch.cat([_best(150, 50), _best(0, 200)])  # only the first half recur in B
    u = relative_universality(cross, ceiling, tau=0.5, seed=1)
    assert u.value == pytest.approx(0.5)
    assert u.hi < 1.0 and u.lo > 0.3
    full = relative_universality(ceiling, ceiling, tau=0.5)
    d = decide_universality({"a": 0.375, "b": 0.75}, {"a": 0.0, "b": 0.0}, {"a": u, "b": full})
    assert d.outcome == NON_UNIVERSAL and d.calibrated
    assert "U_A = 0.500" in d.reason


def test_low_absolute_match_at_the_ceiling_is_not_called_non_universal():
    # Two seeds of one shape match only 0.35; the cross-shape pair matches as often.
    g = torch.Generator().manual_seed(3)
    ceiling = torch.where(torch.rand(500, generator=g) < 0.35, 0.8, 0.2).double()
    cross = torch.where(torch.rand(500, generator=g) < 0.35, 0.8, 0.2).double()
    u = relative_universality(cross, ceiling, tau=0.5, paired=False)
    assert u.contains(1.0)
    d = decide_universality({"a": float((cross >= 0.5).double().mean())}, {"a": 0.0}, {"a": u})
    assert d.outcome == UNIVERSAL and d.calibrated
    # The absolute rule, without the control, would have called it non-universal.
    d0 = decide_universality({"a": float((cross >= 0.5).double().mean())}, {"a": 0.0}, {"a": None})
    assert d0.outcome == NON_UNIVERSAL and not d0.calibrated
    assert d0.reason.startswith("uncalibrated: ")


def test_paired_bootstrap_is_tighter_for_the_same_features():
    g = torch.Generator().manual_seed(5)
    ceiling = torch.where(torch.rand(300, generator=g) < 0.6, 0.9, 0.1).double()
    cross = torch.where((ceiling > 0.5) & (torch.rand(300, generator=g) < 0.8), 0.9, 0.1).double()
    paired = relative_universality(cross, ceiling, tau=0.5, paired=True)
    indep = relative_universality(cross, ceiling, tau=0.5, paired=False)
    assert paired.value == pytest.approx(indep.value)
    assert paired.hi - paired.lo < 0.8 * (indep.hi - indep.lo)


def test_a_ceiling_that_matches_nothing_gives_no_ratio_and_an_uncalibrated_decision():
    u = relative_universality(_best(10, 10), _best(0, 20), tau=0.5)
    assert math.isnan(u.value)
    d = decide_universality({"a": 0.6}, {"a": 0.0}, {"a": u})
    assert not d.calibrated and d.outcome == UNIVERSAL


def test_paired_needs_the_same_features():
    with pytest.raises(ValueError, match="one value per feature"):
        relative_universality(_best(3, 3), _best(2, 2), tau=0.5, paired=True)


def test_bootstrap_is_deterministic_for_a_seed():
    a, b = _best(40, 60), _best(70, 30)
    assert relative_universality(a, b, 0.5, paired=False, seed=7) == relative_universality(
        a, b, 0.5, paired=False, seed=7
    )


def test_adequate_dictionaries_premise():
    good = [DictionaryQuality("A resid_post.0", 0.05, 0.02), DictionaryQuality("B neurons", None, 0.0)]
    p = premise_adequate_dictionaries(good)
    assert p.holds and p.name.startswith("P4")
    bad = [*good, DictionaryQuality("B resid_post.3", 0.31, 0.84)]
    p = premise_adequate_dictionaries(bad)
    assert not p.holds
    assert "B resid_post.3 (FVU 0.310, dead 84.0%)" in p.detail
    assert p.numbers["worst_fvu"] == pytest.approx(0.31)
    nan = premise_adequate_dictionaries([DictionaryQuality("A x", math.nan, 0.0)])
    assert not nan.holds
    loose = premise_adequate_dictionaries(bad, max_fvu=0.5, max_dead=0.9)
    assert loose.holds


def test_estimate_type_is_the_science_estimate():
    assert isinstance(relative_universality(_best(5, 5), _best(8, 2), 0.5), Estimate)


def test_a_shortfall_within_the_margin_is_not_non_universal():
    # 1,000 features, 95% of the ceiling's matches recur across shapes: U = 0.95, CI well below 1.
    ceiling = _best(1000, 0)
    cross = _best(950, 50)
    u = relative_universality(cross, ceiling, tau=0.5)
    assert u.value == pytest.approx(0.95) and u.hi < 1.0
    strict = decide_universality({"a": 0.95}, {}, {"a": u})
    assert strict.outcome == NON_UNIVERSAL
    loose = decide_universality({"a": 0.95}, {}, {"a": u}, margin=0.1)
    assert loose.outcome == UNIVERSAL and "0.9 of the ceiling" in loose.reason
    half = relative_universality(_best(500, 500), ceiling, tau=0.5)
    assert decide_universality({"a": 0.5}, {}, {"a": half}, margin=0.1).outcome == NON_UNIVERSAL


def test_ratio_of_means_takes_fractional_numerators():
    # A numerator that is the fraction of two cross-shape models a feature recurs in.
    num = torch.tensor([1.0, 0.5, 0.5, 0.0] * 50, dtype=torch.float64)
    den = torch.tensor([1.0, 1.0, 1.0, 0.0] * 50, dtype=torch.float64)
    u = ratio_of_means(num, den, n_boot=500)
    assert u.value == pytest.approx(2 / 3) and u.lo < 2 / 3 < u.hi and u.n == 200
    # The indicator form is relative_universality's: the same draws, the same CI.
    c, k = _best(120, 80), _best(150, 50)
    assert ratio_of_means((c >= 0.5).double(), (k >= 0.5).double(), n_boot=300) == relative_universality(
        c, k, tau=0.5, n_boot=300
    )
    assert math.isnan(ratio_of_means(num, torch.zeros(200, dtype=torch.float64)).value)
    with pytest.raises(ValueError, match="one value per feature"):
        ratio_of_means(num, den[:10])
