"""A family report: the calibrated universality verdict leads, the family and its ceilings have
their section, U stands beside every cross-shape number, and each figure sits beside its numbers."""

from __future__ import annotations

import re

import pytest
from sample_report import FAMILY_SECTIONS, PNG_MAGIC, make_family_report

from supanalysis import report as rep
from supanalysis.report import figures as report_figures
from supanalysis.report import figures_family, print_summary


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_markdown_leads_with_calibrated_universality(family_report):
    md = rep.render_markdown(family_report)
    positions = [md.index(s) for s in FAMILY_SECTIONS]
    assert positions == sorted(positions)
    verdict = _between(md, "## Verdict", "## Premises")
    assert verdict.index("(`non_universal_features`)") < verdict.index("Reason:")
    assert "U_min = 0.35 [0.28, 0.43] · calibrated against within-shape ceilings" in verdict
    assert "UNCALIBRATED" not in verdict
    assert "- upper CI bound of U (cross-shape matched fraction / within-shape ceiling) below 1" in verdict
    assert "P4 adequate dictionaries holds: worst FVU 0.08, dead 25.0%" in verdict
    # The heatmap is the verdict's figure, right under the outcome; the match correlations move to the pairs.
    assert "](figures/matched_fraction_matrix.png)" in verdict
    assert "match_correlations.png" not in verdict
    # The decision table carries the ceiling and U beside the matched fraction.
    assert "| 0.62 | 0.8 | 0.3875 [0.31, 0.46] | 0.78 | 0.35 [0.28, 0.43] | yes | non_universal_features |" in verdict


def test_family_section_and_pairs_ceiling(family_report):
    md = rep.render_markdown(family_report)
    family = _between(md, "## Family", "## Neuron-counting conventions")
    assert "| A' | tiny-A' | L2d64 | 1 | 2 | 64 | 98,321 | 32 | 3.222 [3.18, 3.26]" in family
    assert "](figures/loss_vs_aspect.png)" in family
    assert "| B | resid_post.3 | 1 | 48 | 350 |" in family  # σ per model and site
    assert "| L4d48 | B | B' | resid_post.1 | resid_post.1 | 0.8 [0.75, 0.85]" in family  # the ceilings
    pairs = _between(md, "## Site pairs", "## Any-layer matches")
    row = "| resid_post.0 ↔ resid_post.1 | A → B | 0.31 | 0.8 | A' | 0.3875 [0.31, 0.46] (n=400, 95% CI) | yes |"
    assert row in pairs
    assert "| B → A | 0.27 | 0.78 | B' | 0.35 [0.28, 0.43]" in pairs
    assert "](figures/match_correlations.png)" in pairs and "](figures/matched_densities.png)" in pairs


def test_uncalibrated_flag_and_failed_p4():
    md = rep.render_markdown(make_family_report(calibrated=False, p4_holds=False))
    verdict = _between(md, "## Verdict", "## Premises")
    assert "U_min = — · **UNCALIBRATED: no within-shape ceiling was measured**" in verdict
    assert "**on inadequate dictionaries: worst FVU 0.37, dead 25.0%**" in verdict
    assert "Universality: uncalibrated: 2 of 2" in verdict
    family = _between(md, "## Family", "## Neuron-counting conventions")
    assert "No shape has two seeds: no ceiling was measured." in family


def test_report_without_family_has_none_of_it(report):
    md = rep.render_markdown(report)
    assert "## Family" not in md and "U_min" not in md and "ceiling" not in md
    verdict = _between(md, "## Verdict", "## Premises")
    assert "](figures/match_correlations.png)" in verdict


def test_html_heatmap_in_the_verdict_box(family_report, arrays, family_figures):
    page = rep.render_html(family_report, arrays, family_figures)
    box = page[page.index('class="verdict"') : page.index("</section>")]
    assert 'id="fig-matched_fraction_matrix"' in box and "<img" in box
    assert "Figure 1. Matched fractions between every two models." in box
    assert "UNCALIBRATED" not in box and "calibrated against within-shape ceilings" in box
    family = _between(page, 'id="family"', 'id="neuron-counting-conventions"')
    assert 'id="fig-loss_vs_aspect"' in family
    assert page.count("<img") == len(family_figures) == len(rep.FIGURES) + 2
    for name in family_figures:
        assert page.count(f'id="fig-{name}"') == 1, name
    flagged = rep.render_html(make_family_report(calibrated=False), arrays, family_figures)
    assert "<strong>UNCALIBRATED: no within-shape ceiling was measured</strong>" in flagged


def test_family_figures_are_pngs(family_report, family_figures):
    names = [n for n, _, _ in report_figures.figure_specs(family_report)]
    family = ["matched_fraction_matrix", "loss_vs_aspect"]
    assert list(family_figures) == names == [n for n, _, _ in rep.FIGURES] + family
    for name in ("matched_fraction_matrix", "loss_vs_aspect"):
        assert family_figures[name][:8] == PNG_MAGIC and len(family_figures[name]) > 5_000, name


def test_heatmap_is_annotated_and_ordered_by_shape_then_seed(family_report):
    pytest.importorskip("matplotlib")
    fig = figures_family.fig_matched_fraction_matrix(family_report, {})
    (ax, _colorbar) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "A'", "B", "B'"]
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 16 and cells.count("—") == 4
    # Row A' (listed third in the report) is drawn second: its cells are A'→A, A'→A', A'→B, A'→B'.
    assert cells[4:8] == ["0.79", "—", "0.33", "0.30"]


def test_written_markdown_links_every_written_figure(tmp_path, monkeypatch, family_report, arrays, family_figures):
    monkeypatch.setattr(report_figures, "render_figures", lambda report, arrays: dict(family_figures))
    paths = rep.write_report(tmp_path, family_report, arrays)
    links = re.findall(r"\]\((figures/[^)]+\.png)\)", paths["markdown"].read_text())
    assert sorted(links) == sorted(f"figures/{n}.png" for n in family_figures)
    for link in links:
        assert (tmp_path / link).read_bytes() == family_figures[link[8:-4]]


def test_summary_names_universality(capsys):
    for calibrated, line in (
        (True, "universality: non_universal_features, U_min 0.350 [0.280, 0.430] (calibrated)"),
        (False, "universality: non_universal_features, U_min — (UNCALIBRATED: no within-shape ceiling was measured)"),
    ):
        print_summary(make_family_report(calibrated=calibrated), "out")
        assert capsys.readouterr().out.splitlines()[2] == line
