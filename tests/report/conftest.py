"""Fixtures of the report tests: the synthetic report, its arrays, and its figures drawn once."""

from __future__ import annotations

import warnings

import pytest
from sample_report import make_arrays, make_family_report, make_report

from supanalysis import report as rep
from supanalysis.report import figures as report_figures


@pytest.fixture(scope="package")
def report():
    return make_report()


@pytest.fixture(scope="package")
def arrays(report):
    return make_arrays(report)


@pytest.fixture(scope="package")
def figures(report, arrays):
    """Every figure, drawn once for the module; densities as numpy, the rest as tensors (both accepted)."""
    pytest.importorskip("matplotlib")
    given = {k: v.numpy() if k.startswith("density/") else v for k, v in arrays.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a figure that silently fell back to its error PNG fails here
        return rep.render_figures(report, given)


@pytest.fixture
def cached_figures(monkeypatch, figures):
    """render_figures replaced by the module's already drawn figures (drawing is the slow part);
    records the arrays it was given so a test can check what write_report hands it."""
    calls = []

    def fake(report, arrays):
        calls.append(arrays)
        return dict(figures)

    monkeypatch.setattr(report_figures, "render_figures", fake)
    return calls


@pytest.fixture(scope="package")
def family_report():
    return make_family_report()


@pytest.fixture(scope="package")
def family_figures(family_report, arrays):
    """Every figure of the family report (the base ones and the family's), drawn once."""
    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return rep.render_figures(family_report, arrays)
