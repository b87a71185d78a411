"""The report's figures, and the figure helpers other writers reuse (a grid of panels, PNG bytes).

Drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot): nothing is registered
globally, so there is no figure to leak and no interactive backend to trip over. matplotlib is an
optional dependency (``pip install supanalysis[report]``); without it :func:`render_figures`
raises ImportError and the HTML page says the figures are unavailable.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .access import capacity_constant, config_value, site_by_name, sites_of
from .format import finite, fmt
from .schema import pair_key, sanitize

#: the convention for plotting densities on a log scale: dead latents land at -10
DENSITY_EPS = 1e-10

#: D_i values a toy model of superposition sticks to (Elhage et al.): 1, 3/4, 2/3, 1/2, 2/5, 3/8
DIM_REFERENCES: tuple[tuple[float, str], ...] = (
    (1.0, "1"),
    (3 / 4, "3/4"),
    (2 / 3, "2/3"),
    (1 / 2, "1/2"),
    (2 / 5, "2/5"),
    (3 / 8, "3/8"),
)

#: pixels per inch of every figure
DPI = 100

COLORS = {"A": "#1f77b4", "B": "#d95f02"}
MARKERS = {"A": "o", "B": "^"}


FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "density_histograms",
        "Firing densities",
        "Histogram of log10(density + 1e-10) of every latent, per site; each paired site overlays A (blue) and "
        "B (orange), as the fraction of that site's latents. Dead latents pile up at −10. Dashed lines: median "
        "density of the alive latents; grey dotted line: the density floor. A model's unpaired sites share one "
        "panel, a row per site coloured by the same fraction (log scale; white tick: the median). If the models "
        "shared features that keep their sparsity, the A and B histograms of a pair would coincide.",
    ),
    (
        "sigma_vs_capacity",
        "Degree of superposition against the capacity bound",
        "One point per site at (median density of its alive latents, σ = n/m), A as blue circles and B as orange "
        "triangles, log–log. Black curve: the compressed-sensing capacity C·g(p), g(p) = −1/(p ln p), on the "
        "sparse branch p < 1/e (dotted: dense branch, unused). Points above the curve exceed the bound for this "
        "C; small crosses mark p* = g⁻¹(σ/C), where a site's σ would saturate it. Below the dashed line σ = C·e "
        "there is no superposition pressure.",
    ),
    (
        "matched_densities",
        "Densities of matched features",
        "Each matched feature pair (i in A, j in B) as p_A(i) against p_B(j), log–log. Dashed black: identity "
        "(features keep their sparsity). Red: the predicted p_B = π·p_A, drawn when π is defined. Green "
        "dotted: the observed median ratio exp(median r). Points hugging the identity while the red line lies "
        "elsewhere is the contradiction pattern.",
    ),
    (
        "match_correlations",
        "Best-match correlations against the baseline",
        "Per site pair, the best-match correlation ρ* of each alive latent with the other model (filled), and "
        "the same under the token-shuffled baseline (grey outline); left: A's latents matched in B, right: B's "
        "in A. The vertical line is τ: the matched fraction is the mass of the filled histogram right of it. "
        "Universality means the filled histogram sits well right of the baseline.",
    ),
    (
        "decoder_dims",
        "Dimensionality of decoder directions",
        "Histogram of D_i = ‖W_i‖⁴ / Σ_j (W_i·W_j)² over every latent of each site's dictionary: one row "
        "per site, the colour of a bin its latent count (log scale; blank: none). "
        "Reference lines at 1, 3/4, 2/3, 1/2, 2/5 and 3/8, where features of toy models of superposition "
        "cluster; D_i = 1 is a feature with a dimension to itself, 0 a zero or unused direction.",
    ),
)


def require_matplotlib():
    """matplotlib's ``Figure`` and Agg canvas classes; ImportError saying how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("figures need matplotlib: pip install 'supanalysis[report]'") from exc
    return Figure, FigureCanvasAgg


def _array(arrays: Mapping | None, key: str) -> np.ndarray | None:
    """A 1-D float64 numpy copy of ``arrays[key]`` (tensor or array), or None when absent."""
    if not arrays or key not in arrays or arrays[key] is None:
        return None
    v = arrays[key]
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).numpy()
    return np.asarray(v, dtype=np.float64).ravel()


def finite_values(x: np.ndarray | None) -> np.ndarray:
    """The finite entries of ``x`` [n] (empty for None)."""
    return np.empty(0) if x is None else x[np.isfinite(x)]


#: The fixed frame of a multi-panel figure's cells, in inches: room for the y tick labels and
#: label on the left, a little air on the right, the x tick labels and label below.
CELL_LEFT, CELL_RIGHT, CELL_BOTTOM = 0.8, 0.2, 0.55
#: Inches above each axes per line of its title (9 pt text and its pad), and for a suptitle.
TITLE_LINE, SUPTITLE = 0.22, 0.45


def new_figure(
    n_panels: int,
    ncols: int = 3,
    panel_w: float = 4.6,
    panel_h: float = 3.4,
    *,
    suptitle: str | None = None,
    title_lines: float = 1.0,
):
    """A figure on an Agg canvas with ``n_panels`` axes in a grid of ``ncols`` columns, each cell
    ``panel_w`` x ``panel_h`` inches; returns (figure, [n_panels] axes).

    One panel is laid out by matplotlib's constrained layout. Several panels sit in a fixed grid
    instead (:data:`CELL_LEFT` ... around each axes, ``title_lines`` lines of title above it):
    constrained layout measures every tick label of every axes, which cost most of a report's
    drawing time at 20 panels, and a grid of panels of the same kind needs the same frame.
    """
    Figure, FigureCanvasAgg = require_matplotlib()
    n = max(1, n_panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    top_room = SUPTITLE if suptitle else 0.0
    if n == 1:
        fig = Figure(figsize=(panel_w, panel_h + top_room), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(1, 1)
    else:
        head = TITLE_LINE * title_lines
        W, H = panel_w * ncols, panel_h * nrows + top_room
        axes_w, axes_h = panel_w - CELL_LEFT - CELL_RIGHT, panel_h - head - CELL_BOTTOM
        if axes_w <= 0 or axes_h <= 0:
            raise ValueError(f"a {panel_w} x {panel_h} in cell leaves no room for its axes")
        fig = Figure(figsize=(W, H))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(
            nrows, ncols, left=CELL_LEFT / W, right=1 - CELL_RIGHT / W, bottom=CELL_BOTTOM / H,
            top=1 - (top_room + head) / H,
            wspace=(CELL_LEFT + CELL_RIGHT) / axes_w, hspace=(head + CELL_BOTTOM) / axes_h,
        )  # fmt: skip
    if suptitle:
        fig.suptitle(suptitle, y=1 - 0.12 / fig.get_figheight(), va="top")
    # Only the cells in use get axes: an empty cell keeps its place without costing a layout.
    return fig, [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n)]


def png(fig: Any) -> bytes:
    """``fig`` as PNG bytes at :data:`DPI`, drawn once, in a 256-colour palette.

    ``savefig`` would draw a constrained-layout figure twice (once to lay it out, once to
    render); the canvas draws it once, laying it out on the way, and its pixels are encoded.
    A plot holds a few colours and their anti-aliased blends: an adaptive palette keeps them
    and encodes in about half the time of full RGBA, at a third of the size (the HTML inlines it).
    """
    from PIL import Image

    fig.set_dpi(DPI)
    fig.canvas.draw()
    rgb = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    buf = io.BytesIO()
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(buf, format="png", dpi=(DPI, DPI))
    return buf.getvalue()


def histogram(
    ax: Any,
    x: np.ndarray,
    bins: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    fill: bool = False,
    color: Any = None,
    **style: Any,
) -> Any:
    """A histogram of ``x`` [n] over the edges ``bins`` [k+1] drawn as one step patch.

    The counts are numpy's, as in ``ax.hist``, but one patch replaces ``ax.hist``'s bar per bin
    (k rectangles to lay out and draw). Filled: a solid area without an outline; else: the outline.
    """
    counts, edges = np.histogram(x, bins=bins, weights=weights)
    if fill:
        return ax.stairs(counts, edges, fill=True, facecolor=color, edgecolor="none", linewidth=0, **style)
    return ax.stairs(counts, edges, color=color, **style)


def no_data(ax: Any, message: str = "no data") -> None:
    """Say ``message`` in the middle of an empty panel."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def short(name: Any, width: int = 28) -> str:
    """``name`` cut to its last ``width`` characters (a site's distinguishing end), marked with "…"."""
    s = str(name)
    return s if len(s) <= width else "…" + s[-(width - 1) :]


def _density_panels(report: Mapping) -> tuple[list[tuple[str, list[tuple[str, Any]]]], dict[str, list]]:
    """(one panel per pair, A and B overlaid; each model's unpaired sites, which share a panel)."""
    panels = []
    paired: dict[str, set] = {"A": set(), "B": set()}
    for p in report.get("pairs") or []:
        a, b = p.get("site_a"), p.get("site_b")
        paired["A"].add(a)
        paired["B"].add(b)
        panels.append((f"A {short(a, 20)} ↔ B {short(b, 20)}", [("A", a), ("B", b)]))
    unpaired = {m: [s.get("site") for s in sites_of(report, m) if s.get("site") not in paired[m]] for m in ("A", "B")}
    return panels, {m: sites for m, sites in unpaired.items() if sites}


def _log_densities(arrays: Mapping, model: str, site: Any) -> np.ndarray:
    d = finite_values(_array(arrays, f"density/{model}/{sanitize(site)}"))
    return np.log10(np.clip(d, 0.0, None) + DENSITY_EPS)


def _density_bins(data: list[np.ndarray]) -> np.ndarray:
    lo, hi = min(x.min() for x in data), max(x.max() for x in data)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, 41)


def _density_overlay(ax: Any, report: Mapping, arrays: Mapping, series: list[tuple[str, Any]], floor) -> None:
    """A pair's panel: each side's histogram as the fraction of its latents, with its median."""
    data = [(m, s, x) for m, s in series if (x := _log_densities(arrays, m, s)).size]
    if not data:
        no_data(ax, "no data: density arrays missing")
        return
    bins = _density_bins([x for *_, x in data])
    for model, site, x in data:
        histogram(ax, x, bins, weights=np.full(x.size, 1.0 / x.size), linewidth=1.6, color=COLORS[model],
                  label=f"{model} (n={x.size:,})")  # fmt: skip
        med = finite(site_by_name(report, model, site).get("median_density"))
        if med is not None and med > 0:
            ax.axvline(math.log10(med + DENSITY_EPS), color=COLORS[model], linestyle="--", linewidth=1)
    if floor is not None and floor > 0:
        ax.axvline(math.log10(floor + DENSITY_EPS), color="0.5", linestyle=":", linewidth=1, label="density floor")
    ax.set_ylabel("fraction of latents")
    ax.legend(fontsize=7, loc="upper left")


def _histogram_rows(ax: Any, samples: list[np.ndarray], bins: np.ndarray, *, fraction: bool) -> Any | None:
    """One image row per sample, row r being ``np.histogram(samples[r], bins)`` (as a fraction
    of the sample when ``fraction``), on a log colour scale with empty bins left blank: many
    histograms as one image instead of one panel each. None when every sample is empty."""
    from matplotlib.colors import LogNorm

    rows = np.full((len(samples), bins.size - 1), np.nan)
    for r, x in enumerate(samples):
        if x.size:
            c = np.histogram(x, bins)[0].astype(float)
            rows[r] = np.where(c > 0, c / x.size if fraction else c, np.nan)
    if not np.isfinite(rows).any():
        return None
    return ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis", norm=LogNorm(),
                     extent=(bins[0], bins[-1], len(samples) - 0.5, -0.5))  # fmt: skip


def _density_rows(ax: Any, report: Mapping, arrays: Mapping, model: str, sites: list, floor) -> None:
    """A model's unpaired sites in one panel: one row per site, each bin coloured by the fraction
    of that site's latents in it (blank: none), a white tick at the site's median density."""
    data = [_log_densities(arrays, model, s) for s in sites]
    if not any(x.size for x in data):
        no_data(ax, "no data: density arrays missing")
        return
    _histogram_rows(ax, data, _density_bins([x for x in data if x.size]), fraction=True)
    meds = [(math.log10(m + DENSITY_EPS), r) for r, s in enumerate(sites)
            if (m := finite(site_by_name(report, model, s).get("median_density"))) is not None and m > 0]  # fmt: skip
    if meds:
        ax.plot(*zip(*meds), linestyle="none", marker="|", markersize=7, color="white")
    if floor is not None and floor > 0:
        ax.axvline(math.log10(floor + DENSITY_EPS), color="0.5", linestyle=":", linewidth=1)
    step = max(1, math.ceil(len(sites) / 12))  # at most 12 labels: the rows stay legible
    ax.set_yticks(range(0, len(sites), step), [short(s, 14) for s in sites[::step]], fontsize=6)
    ax.set_ylim(len(sites) - 0.5, -0.5)


def _fig_density_histograms(report: Mapping, arrays: Mapping):
    panels, unpaired = _density_panels(report)
    fig, axes = new_figure(len(panels) + len(unpaired), suptitle="Firing density of each latent, A vs B per site pair")
    if not panels and not unpaired:
        no_data(axes[0], "no data: the report has no sites")
        return fig
    floor = finite(config_value(report, "density_floor"))
    for ax, (title, series) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        _density_overlay(ax, report, arrays, series, floor)
        ax.set_xlabel("log10(density + 1e-10)")
    for ax, (model, sites) in zip(axes[len(panels) :], unpaired.items()):
        ax.set_title(f"{model}: {len(sites)} unpaired sites, one row each", fontsize=9)
        _density_rows(ax, report, arrays, model, sites, floor)
        ax.set_xlabel("log10(density + 1e-10)")
    return fig


def _capacity(p: np.ndarray) -> np.ndarray:
    return -1.0 / (p * np.log(p))


def _fig_sigma_vs_capacity(report: Mapping, arrays: Mapping):
    C = capacity_constant(report)
    fig, (ax,) = new_figure(1, panel_w=7.5, panel_h=5.2)
    ax.set_title(f"Degree of superposition σ = n/m against capacity C·g(p), C = {C:g}", fontsize=10)
    points = {m: [] for m in ("A", "B")}
    skipped = 0
    for model in ("A", "B"):
        for s in sites_of(report, model):
            p, sigma = finite(s.get("median_density")), finite(s.get("sigma"))
            if p is None or sigma is None or not 0 < p < 1 or sigma <= 0:
                skipped += 1
                continue
            points[model].append((p, sigma, s.get("site"), finite(s.get("p_star"))))
    allp = [pt[0] for m in points for pt in points[m]]
    if not allp:
        no_data(ax, "no data: no site with a median density in (0, 1) and σ > 0")
        return fig
    p_lo = min(min(allp) / 5, 1e-3)
    sparse = np.logspace(math.log10(p_lo), math.log10(1 / math.e), 400)
    dense = np.linspace(1 / math.e, 0.97, 100)
    ax.plot(sparse, C * _capacity(sparse), color="black", linewidth=1.5, label="C·g(p), sparse branch")
    ax.plot(dense, C * _capacity(dense), color="0.5", linestyle=":", linewidth=1.2, label="dense branch (unused)")
    ax.axhline(C * math.e, color="0.5", linestyle="--", linewidth=1, label="σ = C·e (no pressure below)")
    label_points = sum(len(v) for v in points.values()) <= 16  # names on every point only while legible
    for model, pts in points.items():
        if not pts:
            continue
        xs, ys = [pt[0] for pt in pts], [pt[1] for pt in pts]
        ax.scatter(xs, ys, color=COLORS[model], marker=MARKERS[model], s=45, zorder=3, label=f"{model} sites")
        for k, (p, sigma, name, p_star) in enumerate(pts):
            if p_star is not None and p_star > 0:
                ax.plot([p, p_star], [sigma, sigma], color=COLORS[model], linewidth=0.7, linestyle=":", zorder=2)
                ax.scatter([p_star], [sigma], color=COLORS[model], marker="x", s=25, zorder=3)
            if label_points:
                ax.annotate(
                    short(name, 18),
                    (p, sigma),
                    textcoords="offset points",
                    # A's names above, B's below, staggered: neighbouring sites often share a density.
                    xytext=(4, 4 + 8 * (k % 3)) if model == "A" else (4, -10 - 8 * (k % 3)),
                    fontsize=7,
                    color=COLORS[model],
                )
    ax.scatter([], [], color="0.3", marker="x", s=25, label="p* = g⁻¹(σ/C)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sig = [pt[1] for m in points for pt in points[m]]
    ax.set_ylim(min(min(sig), C * math.e) / 3, max(max(sig), C * math.e) * 10)
    ax.set_xlim(p_lo, 1.0)
    ax.set_xlabel("median firing density p of the alive latents (log)")
    ax.set_ylabel("σ = n_alive / m (log)")
    ax.legend(fontsize=8, loc="upper right")
    if skipped:
        note = f"{skipped} site(s) without a usable density or σ not shown"
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.4")
    return fig


def _fig_matched_densities(report: Mapping, arrays: Mapping):
    pairs = report.get("pairs") or []
    fig, axes = new_figure(
        len(pairs), panel_w=4.4, panel_h=4.2, suptitle="Densities of matched feature pairs, p_A(i) vs p_B(j)"
    )
    if not pairs:
        no_data(axes[0], "no data: no site pairs")
        return fig
    for ax, p in zip(axes, pairs):
        key = pair_key(p.get("site_a"), p.get("site_b"))
        ax.set_title(f"A {short(p.get('site_a'), 18)} ↔ B {short(p.get('site_b'), 18)}", fontsize=9)
        pa, pb = _array(arrays, f"matched/{key}/p_a"), _array(arrays, f"matched/{key}/p_b")
        if pa is None or pb is None or pa.size != pb.size:
            no_data(ax, "no data: matched arrays missing" if pa is None or pb is None else "no data: length mismatch")
            continue
        ok = np.isfinite(pa) & np.isfinite(pb) & (pa > 0) & (pb > 0)
        pa, pb = pa[ok], pb[ok]
        if not pa.size:
            no_data(ax, "no data: no matched pairs with positive densities")
            continue
        ax.scatter(pa, pb, s=8, alpha=0.5, color="#555555", edgecolors="none", label=f"matched pairs (n={pa.size:,})")
        lo = min(pa.min(), pb.min()) / 3
        hi = min(max(pa.max(), pb.max()) * 3, 1.0)
        line = np.array([lo, hi])
        ax.plot(line, line, color="black", linestyle="--", linewidth=1, label="identity p_B = p_A")
        pi = finite(p.get("predicted_ratio"))
        if pi is not None and pi > 0:
            ax.plot(line, pi * line, color="#c0392b", linewidth=1.4, label=f"predicted p_B = π·p_A (π = {pi:.3g})")
        r = finite((p.get("median_log_ratio") or {}).get("value"))
        if r is not None:
            label = f"observed median ratio e^r = {math.exp(r):.3g}"
            ax.plot(line, math.exp(r) * line, color="#1a9850", linestyle=":", linewidth=1.6, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("p_A(i): density in A")
        ax.set_ylabel("p_B(j): density in B")
        ax.legend(fontsize=7, loc="upper left")
    return fig


def _alive_mask(report: Mapping, arrays: Mapping, model: str, site: Any, n: int) -> np.ndarray | None:
    """Latents above the density floor (the schema's features), when the density array fits; else None."""
    d = _array(arrays, f"density/{model}/{sanitize(site)}")
    if d is None or d.size != n:
        return None
    floor = finite(config_value(report, "density_floor")) or 0.0
    return np.isfinite(d) & (d > floor)


def _corr_panel(ax, report: Mapping, arrays: Mapping, pair: Mapping, side: str) -> None:
    """One histogram of best-match correlations vs the baseline, for one side of one pair."""
    model = side.upper()
    site = pair.get(f"site_{side}")
    other = pair.get("site_b" if side == "a" else "site_a")
    key = pair_key(pair.get("site_a"), pair.get("site_b"))
    ax.set_title(f"{model} {short(site, 18)} → {'B' if side == 'a' else 'A'} {short(other, 18)}", fontsize=9)
    mc, bc = _array(arrays, f"max_corr/{key}/{side}"), _array(arrays, f"baseline_corr/{key}/{side}")
    alive = None if mc is None else _alive_mask(report, arrays, model, site, mc.size)
    series = []
    for x, label in ((mc, "best match ρ*"), (bc, "baseline (shuffled)")):
        if x is None:
            continue
        if alive is not None and x.size == alive.size:
            x = x[alive]
        x = finite_values(x)
        if x.size:
            series.append((x, label))
    if not series:
        no_data(ax, "no data: correlation arrays missing")
        return
    lo = min(0.0, min(x.min() for x, _ in series))
    bins = np.linspace(lo, 1.0, 41)
    for x, label in series:
        if label.startswith("best"):
            histogram(ax, x, bins, fill=True, color=COLORS[model], alpha=0.55, label=f"{label} (n={x.size:,})")
        else:
            histogram(ax, x, bins, color="0.3", linewidth=1.4, label=f"{label} (n={x.size:,})")
    tau = finite(config_value(report, "tau"))
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", linewidth=1, label=f"τ = {tau:g}")
    ax.set_xlabel("correlation")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7, loc="best")  # the baseline sits left, the matches right: let matplotlib choose


def _fig_match_correlations(report: Mapping, arrays: Mapping):
    pairs = report.get("pairs") or []
    fig, axes = new_figure(
        2 * len(pairs), ncols=2, panel_w=4.8, panel_h=3.2,
        suptitle="Best-match correlation against the shuffled baseline (left: A side, right: B side)",
    )  # fmt: skip
    if not pairs:
        no_data(axes[0], "no data: no site pairs")
        return fig
    for i, p in enumerate(pairs):
        _corr_panel(axes[2 * i], report, arrays, p, "a")
        _corr_panel(axes[2 * i + 1], report, arrays, p, "b")
    return fig


def _fig_decoder_dims(report: Mapping, arrays: Mapping):
    """One row per site (A's, then B's), one column per D_i bin, coloured by the bin's latent
    count (log scale): each row is that site's histogram, and 20 sites cost one image."""
    rows = [(m, s) for m in ("A", "B") for s in sites_of(report, m)]
    fig, (ax,) = new_figure(1, panel_w=9.0, panel_h=1.6 + 0.3 * max(1, len(rows)))
    ax.set_title("Dimensionality D_i of each decoder direction, per site", fontsize=10, pad=14)
    if not rows:
        no_data(ax, "no data: the report has no sites")
        return fig
    samples, labels = [], []
    for model, s in rows:
        name = s.get("site")
        dims = finite_values(_array(arrays, f"dims/{model}/{sanitize(name)}"))
        samples.append(np.clip(dims, 0.0, 1.05))
        summary = (f"n={dims.size:,}, ΣD={fmt(finite(s.get('dims_sum')), 3)}, m={fmt(s.get('m'))}" if dims.size
                   else "no data: dims array missing")  # fmt: skip
        labels.append(f"{model}: {short(name)}  ({summary})")
    im = _histogram_rows(ax, samples, np.linspace(0.0, 1.05, 43), fraction=False)
    if im is not None:
        fig.colorbar(im, ax=ax, label="latents in the bin (log)", pad=0.01)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    for tick, (model, _) in zip(ax.get_yticklabels(), rows):
        tick.set_color(COLORS[model])
    n_a = sum(m == "A" for m, _ in rows)
    if 0 < n_a < len(rows):
        ax.axhline(n_a - 0.5, color="white", linewidth=2)
    for v, label in DIM_REFERENCES:
        ax.axvline(v, color="0.6", linestyle=":", linewidth=0.9)  # seen on white and on the colours
        # 3/8 and 2/5 are close: push their labels apart.
        ha = {"3/8": "right", "2/5": "left"}.get(label, "center")
        ax.text(v, 1.0, label, transform=ax.get_xaxis_transform(), ha=ha, va="bottom", fontsize=7)
    ax.set_xlim(0.0, 1.05)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("D_i")
    return fig


_FIGURE_BUILDERS: dict[str, Callable[[Mapping, Mapping], Any]] = {
    "density_histograms": _fig_density_histograms,
    "sigma_vs_capacity": _fig_sigma_vs_capacity,
    "matched_densities": _fig_matched_densities,
    "match_correlations": _fig_match_correlations,
    "decoder_dims": _fig_decoder_dims,
}


def _error_figure(name: str, exc: Exception) -> bytes:
    fig, (ax,) = new_figure(1, panel_w=6, panel_h=2.5)
    no_data(ax, f"figure '{name}' could not be drawn:\n{type(exc).__name__}: {exc}")
    return png(fig)


def figure_specs(report: Mapping) -> tuple[tuple[str, str, str], ...]:
    """(name, heading, caption) of every figure of ``report``: :data:`FIGURES`, and the family's
    figures when it has a family."""
    from .figures_family import FAMILY_FIGURES

    return FIGURES + (FAMILY_FIGURES if report.get("family") else ())


def render_figures(report: Mapping, arrays: Mapping | None) -> dict[str, bytes]:
    """PNG bytes of each figure, keyed as in :func:`figure_specs` (in that order).

    Missing arrays or empty data give a panel saying "no data". A figure that fails anyway
    becomes a PNG with the error (and a warning), so one bad array never costs the whole report.
    """
    from .figures_family import FAMILY_BUILDERS

    builders = {**_FIGURE_BUILDERS, **FAMILY_BUILDERS}
    arrays = arrays or {}
    out = {}
    for name, _, _ in figure_specs(report):
        try:
            out[name] = png(builders[name](report, arrays))
        except ImportError:
            raise
        except Exception as exc:
            warnings.warn(f"report figure {name!r} failed: {exc!r}", RuntimeWarning, stacklevel=2)
            out[name] = _error_figure(name, exc)
    return out
