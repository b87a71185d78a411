"""The report as one HTML page: the verdict box first, escaped names, every figure inline."""

from __future__ import annotations

import warnings

import pytest
from sample_report import ODD_SITE, SECTIONS

from supanalysis import report as rep

pytest.importorskip("matplotlib")


def test_html_verdict_box_before_figures_and_escaped(report, arrays, figures):
    page = rep.render_html(report, arrays, figures)
    assert page.startswith("<!DOCTYPE html>")
    verdict = page.index('class="verdict"')
    assert verdict < page.index("<img")
    assert verdict < page.index('id="premises"')
    assert page.count("<img") == len(rep.FIGURES)
    assert page.count("data:image/png;base64,") == len(rep.FIGURES)
    assert ODD_SITE not in page
    assert "mlp&lt;hidden&gt;.1" in page
    for s in SECTIONS[1:]:
        assert f"<h2>{s[3:]}</h2>" in page


def test_minimal_report_renders():
    """Even a report with nothing but a schema renders (every section says what is missing)."""
    md = rep.render_markdown({"schema": rep.SCHEMA})
    assert md.index("## Verdict") < md.index("## Notes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = rep.render_html({"schema": rep.SCHEMA}, None)
    assert "Inconclusive" in page
    assert page.count("<img") == len(rep.FIGURES)
