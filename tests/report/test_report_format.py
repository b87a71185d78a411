"""One value as a table cell, and site names as array keys."""

from __future__ import annotations

from sample_report import estimate

from supanalysis import report as rep


def test_sanitize_and_pair_key():
    assert rep.sanitize("mlp<hidden>.1") == "mlp_hidden_.1"
    assert rep.sanitize("blocks.3/hook resid") == "blocks.3_hook_resid"
    assert rep.pair_key("a b", "c") == "a_b__c"


def test_fmt_nulls_and_numbers():
    assert rep.fmt(None) == rep.MISSING
    assert rep.fmt(float("nan")) == rep.MISSING
    assert rep.fmt(True) == "yes"
    assert rep.fmt(1474560000) == "1,474,560,000"
    assert rep.fmt(2.5e-5) == "2.500e-05"
    assert rep.fmt(0.12345678) == "0.1235"
    assert rep.fmt(100000.0) == "100,000"
    assert rep.fmt(1234.5) == "1234"
    assert rep.fmt(123456.7) == "123,457"
    assert rep.fmt(1.4746e9) == "1.475e+09"
    assert rep.fmt(estimate(0.1, 0.05, 0.2, 30)).startswith("0.1 [0.05, 0.2] (n=30")
    assert rep.fmt(estimate(None, None, None, 0)) == rep.MISSING
