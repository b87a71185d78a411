"""The report's figures: PNGs of every figure, also from missing, empty or null data."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
from sample_report import PNG_MAGIC, estimate

from supanalysis import report as rep
from supanalysis.report.figures import histogram

pytest.importorskip("matplotlib")


def _png_shape(png: bytes) -> tuple[int, ...]:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png").shape


def test_figures_are_pngs(figures):
    assert list(figures) == [name for name, _, _ in rep.FIGURES]
    for name, png in figures.items():
        assert png[:8] == PNG_MAGIC, name
        assert len(png) > 5_000, name
    h, w, _ = _png_shape(figures["sigma_vs_capacity"])
    assert 300 <= h <= 2000 and 400 <= w <= 2000


def test_null_predicted_ratio_missing_and_empty_arrays(report, arrays):
    """π null everywhere, an empty median-ratio estimate, half the arrays missing, the rest empty."""
    nulls = copy.deepcopy(report)
    for p in nulls["pairs"]:
        p.update(predicted_ratio=None, log_predicted_ratio=None, median_log_ratio=estimate(None, None, None, 0))
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


def test_each_figure_is_drawn_once(monkeypatch, report, arrays):
    """Drawing is the slow part: one draw per figure (savefig on a constrained layout draws twice)."""
    from matplotlib.figure import Figure

    drawn = []
    real_draw = Figure.draw

    def counting_draw(self, renderer):
        drawn.append(self)
        return real_draw(self, renderer)

    monkeypatch.setattr(Figure, "draw", counting_draw)
    rep.render_figures(report, arrays)
    assert len(drawn) == len(rep.FIGURES)


def test_histogram_is_one_patch_with_numpys_counts():
    x = np.random.default_rng(0).normal(size=500)
    bins = np.linspace(-3, 3, 41)
    fig, (ax,) = rep.new_figure(1)
    histogram(ax, x, bins, fill=True, color="C0")
    histogram(ax, x, bins, color="C1")
    assert len(ax.patches) == 2  # ax.hist would add one bar per bin for the filled one
    for patch in ax.patches:
        np.testing.assert_array_equal(patch.get_data().values, np.histogram(x, bins)[0])
    assert rep.png(fig)[:8] == PNG_MAGIC


def test_multi_panel_grids_keep_their_text_apart():
    """The fixed grid of many-panel figures leaves room for every label: no panel's title,
    tick labels or axis labels overlap another panel's or the suptitle, at one and two title
    lines, and every label lies inside the figure."""
    from matplotlib.transforms import Bbox

    for lines, kw in ((1.0, {}), (2.6, {"ncols": 4, "panel_w": 3.8, "panel_h": 3.2})):
        fig, axes = rep.new_figure(7, suptitle="A long suptitle over the panels of the grid", title_lines=lines, **kw)
        for ax in axes:
            ax.plot([1e-4, 1.0], [0.0, 0.12])
            ax.set_title("\n".join(["A resid_post.10 ↔ B resid_post.15"] * int(lines)), fontsize=9 if lines == 1 else 8)
            ax.set_xlabel("log10(density + 1e-10)")
            ax.set_ylabel("fraction of latents")
        fig.canvas.draw()
        fig_box = Bbox.from_bounds(0, 0, *fig.canvas.get_width_height())
        r = fig.canvas.get_renderer()
        per_axes = [ax.get_tightbbox(r) for ax in axes]  # title, labels and visible tick labels
        sup = fig._suptitle.get_window_extent(r)
        for i, a in enumerate(per_axes):
            assert fig_box.contains(a.x0 + 1, a.y0 + 1) and fig_box.contains(a.x1 - 1, a.y1 - 1), i
            assert not a.overlaps(sup), f"panel {i} reaches the suptitle ({lines} title lines)"
            for j in range(i + 1, len(per_axes)):
                assert not a.overlaps(per_axes[j]), f"panels {i} and {j} overlap ({lines} title lines)"
    with pytest.raises(ValueError, match="no room"):
        rep.new_figure(2, panel_w=0.9)


def test_decoder_dims_rows_are_each_sites_histogram(report, arrays):
    from supanalysis.report.access import sites_of
    from supanalysis.report.figures import _fig_decoder_dims
    from supanalysis.report.schema import sanitize

    fig = _fig_decoder_dims(report, arrays)
    (image,) = fig.axes[0].get_images()
    counts = np.ma.filled(image.get_array(), 0.0)
    rows = [(m, s["site"]) for m in ("A", "B") for s in sites_of(report, m)]
    assert counts.shape == (len(rows), 42)
    for r, (model, site) in enumerate(rows):
        dims = np.asarray(arrays[f"dims/{model}/{sanitize(site)}"], dtype=float)
        want = np.histogram(np.clip(dims[np.isfinite(dims)], 0.0, 1.05), np.linspace(0.0, 1.05, 43))[0]
        np.testing.assert_array_equal(np.nan_to_num(counts[r]), want, err_msg=f"{model} {site}")


def test_unpaired_sites_share_one_panel_of_histogram_rows(report, arrays):
    """B's sites without a partner: one row each, the fraction of the site's latents per bin."""
    from supanalysis.report.figures import DENSITY_EPS, _fig_density_histograms
    from supanalysis.report.schema import sanitize

    fig = _fig_density_histograms(report, arrays)
    paired = {p["site_b"] for p in report["pairs"]}
    unpaired = [s["site"] for s in report["sites"]["B"] if s["site"] not in paired]
    assert len(unpaired) >= 2 and len(fig.axes) == len(report["pairs"]) + 1
    (image,) = fig.axes[-1].get_images()
    got = np.nan_to_num(np.ma.filled(image.get_array(), np.nan))
    logs = []
    for site in unpaired:
        d = np.asarray(arrays[f"density/B/{sanitize(site)}"], dtype=float)
        logs.append(np.log10(np.clip(d[np.isfinite(d)], 0.0, None) + DENSITY_EPS))
    bins = np.linspace(min(x.min() for x in logs), max(x.max() for x in logs), 41)
    for r, x in enumerate(logs):
        np.testing.assert_allclose(got[r], np.histogram(x, bins)[0] / x.size, err_msg=unpaired[r])
