"""Report rendering: Markdown, figures, HTML, and the report folder round trip, on a synthetic report
that follows docs/report-schema.md field by field."""

from __future__ import annotations

import copy
import io
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from supanalysis import report as rep
from supanalysis import science

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Verdict",
    "## Premises",
    "## Models",
    "## Neuron-counting conventions",
    "## Sites",
    "## Site pairs",
    "## Any-layer matches",
    "## Notes",
)
# A site name with characters HTML must escape and array keys must sanitise.
ODD_SITE = "mlp<hidden>.1"


def _estimate(value, lo, hi, n):
    return {"value": value, "lo": lo, "hi": hi, "n": n, "level": 0.95}


def _site(model, name, layer, n_layers, m, n_alive, median_p, pressure=True):
    sigma = n_alive / m
    g_med = -1.0 / (median_p * math.log(median_p))
    return {
        "model": model,
        "site": name,
        "layer": layer,
        "depth": (layer + 1) / n_layers,
        "m": m,
        "dictionary": "TopK SAE (k=16, 8x)",
        "n_latents": 8 * m,
        "n_alive": n_alive,
        "sigma": sigma,
        "median_density": median_p,
        "g_median": g_med,
        "C_star": sigma / g_med,
        "p_star": science.g_inv(sigma) if pressure else None,  # C = 1
        "pressure": pressure,
        "tokens": 100_000,
        "mean_l0": 16.0,
        "dims_sum": 0.9 * m,
        "d_star": 0.8,
        "mean_max_abs_cos": 0.31,
        "welch_bound": 0.05,
        "total_sq_cos": 1234.5,
        "fvu": 0.12,
    }


def _verdict(outcome, mf, bf, r, pi):
    return {
        "outcome": outcome,
        "reason": f"synthetic reason for {outcome}",
        "numbers": {
            "matched_fraction": mf,
            "baseline_fraction": bf,
            "phi": 0.5,
            "median_log_ratio": r,
            "predicted_ratio": pi,
            "log_predicted_ratio": math.log(pi) if pi else None,
        },
    }


def _pair(site_a, site_b, depth_a, depth_b, pi, outcome):
    r = _estimate(0.02, -0.1, 0.15, 40)
    return {
        "site_a": site_a,
        "site_b": site_b,
        "depth_a": depth_a,
        "depth_b": depth_b,
        "tokens": 50_000,
        "mean_max_corr_a": 0.71,
        "mean_max_corr_b": 0.64,
        "baseline_mean_max_corr_a": 0.08,
        "baseline_mean_max_corr_b": 0.07,
        "matched_fraction_a": 0.62,
        "matched_fraction_b": 0.55,
        "baseline_fraction_a": 0.01,
        "baseline_fraction_b": 0.0,
        "n_matched": 40,
        "median_log_ratio": r,
        "predicted_ratio": pi,
        "log_predicted_ratio": math.log(pi) if pi else None,
        "verdict": _verdict(outcome, 0.62, 0.01, r, pi),
    }


def make_report() -> dict:
    """A schema-complete report: A has 2 sites (one with an odd name), B has 4; 2 pairs; 1 any-layer entry."""
    sites_a = [
        _site("A", "resid_post.0", 0, 2, 64, 400, 3e-3),
        _site("A", ODD_SITE, 1, 2, 64, 380, 5e-3),
    ]
    sites_b = [
        _site("B", f"resid_post.{i}", i, 4, 48, (60, 310, 330, 350)[i], (0.2, 4e-3, 2e-3, 1e-3)[i], pressure=i != 0)
        for i in range(4)
    ]
    return {
        "schema": rep.SCHEMA,
        "created": "2026-11-25T01:00:00Z",
        "library": {
            "supanalysis": "0.1.0",
            "torch": torch.__version__,
            "python": "3.11",
            "device": "cpu",
            "backend": "reference",
        },
        "config": {"seed": 0, "thresholds": {"tau": 0.5, "phi": 0.5, "density_floor": 1e-5, "C": 1.0}},
        "verdict": {
            "outcome": "contradiction",
            "reason": "all 2 site pairs agree: contradiction",
            "numbers": {"tally": {"contradiction": 2}},
        },
        "premises": [
            {
                "name": "P1 equal parameters",
                "holds": True,
                "detail": "relative difference 1.2% ≤ 5%",
                "numbers": {"N_a": 98304, "N_b": 99500, "relative_difference": 0.012, "tolerance": 0.05},
            },
            {
                "name": "P2 equal performance",
                "holds": True,
                "detail": "within ±3%",
                "numbers": {"relative_difference": _estimate(0.01, -0.005, 0.02, 20000), "tolerance": 0.03},
            },
            {
                "name": "P3 different neuron counts",
                "holds": True,
                "detail": "64 vs 48; 128 vs 192",
                "numbers": {"m_a": 64, "m_b": 48, "M_a": 128, "M_b": 192},
            },
        ],
        "models": {
            m: {
                "name": f"tiny-{m}",
                "source": "in-memory",
                "architecture": "TinyTransformer",
                "n_layers": L,
                "d_model": d,
                "d_ff": 4 * d,
                "n_heads": 4,
                "vocab_size": 512,
                "non_embedding_params": 12 * L * d * d + 17,
                "kaplan_params": 12 * L * d * d,
                "aspect_ratio": d / L,
                "eval_loss": _estimate(3.21 + 0.01 * L, 3.19, 3.25, 20000),
            }
            for m, L, d in (("A", 2, 64), ("B", 4, 48))
        },
        "per_model": {
            "A": {"neurons_total": 128, "features_total": 780, "sigma_model": 780 / 128, "sigma_mean_site": 6.09},
            "B": {"neurons_total": 192, "features_total": 1260, "sigma_model": 1260 / 192, "sigma_mean_site": 6.56},
        },
        "sites": {"A": sites_a, "B": sites_b},
        "pairs": [
            _pair("resid_post.0", "resid_post.1", 0.5, 0.5, 1.7, "contradiction"),
            _pair(ODD_SITE, "resid_post.3", 1.0, 1.0, 1.4, "contradiction"),
        ],
        "any_layer": [
            {
                "site_a": "resid_post.0",
                "best_site_b": "resid_post.1",
                "mean_max_corr": {f"resid_post.{i}": 0.4 + 0.1 * (i == 1) for i in range(4)},
                "matched_fraction": 0.62,
            }
        ],
        "notes": ["densities use a floor of 1e-5", "baseline: B's tokens shuffled"],
    }


def make_arrays(report: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Arrays for every key of the schema: densities over ~6 decades (some dead), D_i in [0, 1], correlations."""
    g = torch.Generator().manual_seed(seed)
    arrays = {}
    for model in ("A", "B"):
        for s in report["sites"][model]:
            n, key = s["n_latents"], rep.sanitize(s["site"])
            dens = 10 ** (-6 * torch.rand(n, generator=g, dtype=torch.float64))
            dens[: n // 10] = 0.0  # dead latents
            arrays[f"density/{model}/{key}"] = dens
            arrays[f"dims/{model}/{key}"] = torch.rand(n, generator=g, dtype=torch.float64) ** 0.5
    for p in report["pairs"]:
        key = rep.pair_key(p["site_a"], p["site_b"])
        na = next(s["n_latents"] for s in report["sites"]["A"] if s["site"] == p["site_a"])
        nb = next(s["n_latents"] for s in report["sites"]["B"] if s["site"] == p["site_b"])
        for side, n in (("a", na), ("b", nb)):
            arrays[f"max_corr/{key}/{side}"] = torch.rand(n, generator=g, dtype=torch.float64) ** 0.5
            arrays[f"baseline_corr/{key}/{side}"] = 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
        pa = 10 ** (-1 - 3 * torch.rand(40, generator=g, dtype=torch.float64))
        arrays[f"matched/{key}/p_a"] = pa
        arrays[f"matched/{key}/p_b"] = pa * torch.exp(0.3 * torch.randn(40, generator=g, dtype=torch.float64))
    return arrays


@pytest.fixture(scope="module")
def report():
    return make_report()


@pytest.fixture(scope="module")
def arrays(report):
    return make_arrays(report)


@pytest.fixture(scope="module")
def figures(report, arrays):
    """Every figure, drawn once for the module; densities as numpy, the rest as tensors (both accepted)."""
    given = {k: v.numpy() if k.startswith("density/") else v for k, v in arrays.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a figure that silently fell back to its error PNG fails here
        return rep.render_figures(report, given)


def _png_shape(png: bytes) -> tuple[int, ...]:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png").shape


# ----------------------------------------------------------------------------- helpers
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
    assert rep.fmt(_estimate(0.1, 0.05, 0.2, 30)).startswith("0.1 [0.05, 0.2] (n=30")
    assert rep.fmt(_estimate(None, None, None, 0)) == rep.MISSING


# ----------------------------------------------------------------------------- markdown
def test_markdown_verdict_first_and_every_section(report):
    md = rep.render_markdown(report)
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    verdict = md[md.index("## Verdict") : md.index("## Premises")]
    assert "`contradiction`" in verdict and "Contradiction:" in verdict
    assert "all 2 site pairs agree" in verdict
    assert "tally.contradiction" in verdict
    # The decision table carries the numbers the rules compare (matched fraction, CI, ln π).
    assert "0.62" in verdict and "[-0.1, 0.15]" in verdict and f"{math.log(1.7):.4g}" in verdict
    assert "| yes | no | contradiction |" in verdict  # 0 in the CI, ln π not
    # Every field of every object appears as a header or a row label.
    every = (rep.MODEL_FIELDS, rep.PER_MODEL_FIELDS, rep.SITE_SPARSITY_FIELDS, rep.SITE_GEOMETRY_FIELDS)
    for fields in (*every, rep.PAIR_MATCH_FIELDS, rep.PAIR_SPARSITY_FIELDS):
        for f in fields:
            assert f in md, f
    assert "tiny-A" in md and "resid_post.3" in md
    assert "3.23 [3.19, 3.25]" in md  # eval loss with its CI
    assert "baseline: B's tokens shuffled" in md


def test_failed_premise_is_named_in_the_verdict(report):
    failed = copy.deepcopy(report)
    failed["premises"][1].update(holds=False, detail="(B−A)/A = 0.066 [0.060, 0.071]; not within ±3%")
    failed["verdict"] = {"outcome": "premises_not_met", "reason": "all 2 site pairs agree", "numbers": {}}
    md = rep.render_markdown(failed)
    verdict = md[: md.index("## Premises")]
    assert "Premises not met" in verdict
    assert "P2 equal performance: (B−A)/A = 0.066 [0.060, 0.071]" in verdict
    assert "P1 equal parameters:" not in verdict


def test_markdown_nulls_show_dash(report):
    md = rep.render_markdown(report)
    # B's first site has no pressure: p_star is null.
    row = next(line for line in md.splitlines() if line.startswith("| resid_post.0 | 0 | 0.25 |"))
    assert rep.MISSING in row


# ----------------------------------------------------------------------------- figures
def test_figures_are_pngs(figures):
    assert list(figures) == [name for name, _, _ in rep.FIGURES]
    for name, png in figures.items():
        assert png[:8] == PNG_MAGIC, name
        assert len(png) > 5_000, name
    h, w, _ = _png_shape(figures["sigma_vs_capacity"])
    assert 300 <= h <= 2000 and 400 <= w <= 2000


# ----------------------------------------------------------------------------- html
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


@pytest.fixture
def cached_figures(monkeypatch, figures):
    """render_figures replaced by the module's already drawn figures (drawing is the slow part);
    records the arrays it was given so a test can check what write_report hands it."""
    calls = []

    def fake(report, arrays):
        calls.append(arrays)
        return dict(figures)

    monkeypatch.setattr(rep, "render_figures", fake)
    return calls


# ----------------------------------------------------------------------------- files
def test_write_and_load_round_trip(tmp_path, report, arrays, cached_figures):
    bad = copy.deepcopy(report)
    bad["sites"]["A"][0]["fvu"] = float("nan")
    bad["sites"]["A"][1]["C_star"] = float("inf")
    mixed = dict(arrays)
    mixed["density/A/resid_post.0"] = arrays["density/A/resid_post.0"].float().numpy()  # numpy float32
    mixed["extra/int"] = torch.arange(5, dtype=torch.int32)
    mixed["extra/reversed"] = np.arange(4.0)[::-1]  # negative strides
    paths = rep.write_report(tmp_path / "out", bad, mixed)
    assert {p.name for p in paths.values()} == {"report.json", "arrays.safetensors", "report.md", "report.html"}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded, loaded_arrays = rep.load_report(tmp_path / "out")
    expected = copy.deepcopy(report)
    expected["sites"]["A"][0]["fvu"] = None
    expected["sites"]["A"][1]["C_star"] = None
    assert loaded == json.loads(json.dumps(expected))
    assert set(loaded_arrays) == set(mixed)
    for k, v in arrays.items():
        if k != "density/A/resid_post.0":
            assert loaded_arrays[k].dtype == torch.float64
            assert torch.equal(loaded_arrays[k], v), k
    assert torch.equal(loaded_arrays["density/A/resid_post.0"], arrays["density/A/resid_post.0"].float().double())
    assert loaded_arrays["extra/int"].dtype == torch.int64
    assert loaded_arrays["extra/reversed"].tolist() == [3.0, 2.0, 1.0, 0.0]
    # The figures were drawn from the stored (float64, contiguous) tensors.
    (given,) = cached_figures
    assert all(t.dtype in (torch.float64, torch.int64) and t.is_contiguous() for t in given.values())
    assert "## Verdict" in paths["markdown"].read_text()
    assert paths["html"].read_text().count("<img") == len(rep.FIGURES)


def test_load_rejects_other_schema(tmp_path, cached_figures):
    rep.write_report(tmp_path, {"schema": "something/else"}, {})
    with pytest.raises(ValueError, match=re.escape(rep.SCHEMA)):
        rep.load_report(tmp_path)
    with pytest.raises(FileNotFoundError):
        rep.load_report(tmp_path / "missing")


# ----------------------------------------------------------------------------- degenerate reports
def test_degenerate_report_still_renders(tmp_path, report):
    """No pairs, no any-layer entries, sites without densities, and no arrays at all."""
    thin = copy.deepcopy(report)
    thin["pairs"] = []
    thin["any_layer"] = []
    thin["verdict"] = {"outcome": "inconclusive", "reason": "no site pairs were analysed", "numbers": {}}
    for s in thin["sites"]["B"]:
        s.update(p_star=None, pressure=False, median_density=None, C_star=None, g_median=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = rep.write_report(tmp_path, thin, {})
    md = paths["markdown"].read_text()
    assert md.index("Inconclusive") < md.index("## Premises")
    assert "No site pairs were analysed." in md
    assert paths["html"].read_text().count("<img") == len(rep.FIGURES)
    assert rep.load_report(tmp_path)[1] == {}


def test_null_predicted_ratio_missing_and_empty_arrays(report, arrays):
    """π null everywhere, an empty median-ratio estimate, half the arrays missing, the rest empty."""
    nulls = copy.deepcopy(report)
    for p in nulls["pairs"]:
        p.update(predicted_ratio=None, log_predicted_ratio=None, median_log_ratio=_estimate(None, None, None, 0))
        p["verdict"]["numbers"].update(predicted_ratio=None, log_predicted_ratio=None)
    partial = {k: v[:0] for k, v in arrays.items() if not k.startswith(("density/", "matched/"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = rep.render_figures(nulls, partial)
    assert list(figs) == [name for name, _, _ in rep.FIGURES]
    assert all(png[:8] == PNG_MAGIC for png in figs.values())
    md = rep.render_markdown(nulls)
    row = next(line for line in md.splitlines() if line.startswith("| resid_post.0 | resid_post.1 | 40 |"))
    assert row.count(rep.MISSING) >= 3  # median ratio, π and ln π


def test_minimal_report_renders():
    """Even a report with nothing but a schema renders (every section says what is missing)."""
    md = rep.render_markdown({"schema": rep.SCHEMA})
    assert md.index("## Verdict") < md.index("## Notes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = rep.render_html({"schema": rep.SCHEMA}, None)
    assert "Inconclusive" in page
    assert page.count("<img") == len(rep.FIGURES)
