"""The figures of a family report: the matched-fraction matrix the verdict rests on, and each
model's eval loss against its aspect ratio (premise P2 across the family)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .format import finite

FAMILY_FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "matched_fraction_matrix",
        "Matched fractions between every two models",
        "Cell (row, column): the fraction of the row model's alive features with a best match ρ* ≥ τ in the "
        "column model, mean over their depth-paired sites; the diagonal is empty. Models are ordered by shape, "
        "then seed; the black lines separate shapes. Blocks on the diagonal are the within-shape ceilings "
        "(two seeds of one shape), the blocks off it the cross-shape matches: universality within "
        "reproducibility means the off-diagonal blocks are as bright as the diagonal ones.",
    ),
    (
        "loss_vs_aspect",
        "Eval loss against aspect ratio",
        "Each model's eval cross-entropy (nats/token) with its bootstrap CI against its aspect ratio d/L (log "
        "x); one colour per shape, one marker per seed. The grey curve joins each shape's mean loss; the band "
        "is P2's tolerance around the first shape's mean. P2 (equal performance) holds when the curve stays "
        "inside the band.",
    ),
)


def _natural(s: Any) -> tuple:
    """A sort key that orders "2" before "10" (seeds are often numbers written as text)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s)))


def model_order(family: Mapping) -> list[int]:
    """Indices of the matrix labels ordered by shape (in order of first appearance), then seed."""
    labels = list((family.get("matched_fraction_matrix") or {}).get("labels") or [])
    info = {m.get("label"): m for m in family.get("models") or []}
    shapes: list[Any] = []
    for lab in labels:
        sh = (info.get(lab) or {}).get("shape", lab)
        if sh not in shapes:
            shapes.append(sh)

    def key(k: int) -> tuple:
        m = info.get(labels[k]) or {}
        return shapes.index(m.get("shape", labels[k])), _natural(m.get("seed", "")), k

    return sorted(range(len(labels)), key=key)


def _matrix(family: Mapping) -> tuple[list[str], list[Any], np.ndarray]:
    """(labels, shapes, values [n, n] with NaN for null) in :func:`model_order`."""
    mm = family.get("matched_fraction_matrix") or {}
    labels = list(mm.get("labels") or [])
    raw = mm.get("values") or []
    n = len(labels)
    values = np.full((n, n), np.nan)
    for r, row in enumerate(raw[:n]):
        for c, v in enumerate((row or [])[:n]):
            f = finite(v)
            values[r, c] = np.nan if f is None else f
    order = model_order(family)
    info = {m.get("label"): m for m in family.get("models") or []}
    shapes = [(info.get(labels[k]) or {}).get("shape", labels[k]) for k in order]
    return [str(labels[k]) for k in order], shapes, values[np.ix_(order, order)]


def fig_matched_fraction_matrix(report: Mapping, arrays: Mapping):
    from .figures import new_figure, no_data

    labels, shapes, values = _matrix(report.get("family") or {})
    n = len(labels)
    size = min(max(3.2, 0.9 * n + 2.0), 11.0)
    fig, (ax,) = new_figure(1, panel_w=size + 1.2, panel_h=size)
    ax.set_title("Matched fraction: row model's features matched in column model", fontsize=10)
    if n == 0:
        no_data(ax, "no data: the family has no matched-fraction matrix")
        return fig
    cmap = _cmap()
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.85, label="matched fraction (ρ* ≥ τ)")
    fontsize = 9 if n <= 8 else 7 if n <= 14 else 5
    for r in range(n):
        for c in range(n):
            v = values[r, c]
            text, color = ("—", "0.35") if not np.isfinite(v) else (f"{v:.2f}", "white" if v < 0.55 else "black")
            ax.text(c, r, text, ha="center", va="center", fontsize=fontsize, color=color)
    for k in range(1, n):
        if shapes[k] != shapes[k - 1]:
            ax.axhline(k - 0.5, color="black", linewidth=1.5)
            ax.axvline(k - 0.5, color="black", linewidth=1.5)
    ax.set_xticks(range(n), labels, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    ax.set_xlabel("matched into (column model)")
    ax.set_ylabel("features of (row model)")
    return fig


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#e6e6e6")  # grey: the empty diagonal


def _p2_tolerance(report: Mapping) -> float | None:
    for p in report.get("premises") or []:
        if str(p.get("name", "")).startswith("P2"):
            return finite((p.get("numbers") or {}).get("tolerance"))
    return None


def _loss_points(models: Sequence[Mapping]) -> list[tuple[Any, float, float, float, float]]:
    """(shape, d/L, loss, lower error, upper error) of each model with a finite loss and d/L > 0."""
    pts = []
    for m in models:
        x = finite(m.get("aspect_ratio"))
        e = m.get("eval_loss") or {}
        y = finite(e.get("value")) if isinstance(e, Mapping) else finite(e)
        if x is None or y is None or x <= 0:
            continue
        lo = finite(e.get("lo")) if isinstance(e, Mapping) else None
        hi = finite(e.get("hi")) if isinstance(e, Mapping) else None
        below = max(0.0, y - lo) if lo is not None else 0.0
        above = max(0.0, hi - y) if hi is not None else 0.0
        pts.append((m.get("shape"), x, y, below, above))
    return pts


def fig_loss_vs_aspect(report: Mapping, arrays: Mapping):
    from .figures import new_figure, no_data

    fig, (ax,) = new_figure(1, panel_w=7.0, panel_h=4.6)
    ax.set_title("Eval loss against aspect ratio d/L, one marker per model", fontsize=10)
    models = list((report.get("family") or {}).get("models") or [])
    pts = _loss_points(models)
    if not pts:
        no_data(ax, "no data: no model with an eval loss and an aspect ratio")
        return fig
    shapes = list(dict.fromkeys(p[0] for p in pts))
    markers = "os^DvP*X"
    means = []
    for k, sh in enumerate(shapes):
        mine = [p for p in pts if p[0] == sh]
        color = f"C{k % 10}"
        for s, (_, x, y, el, eh) in enumerate(mine):
            # Seeds of one shape share d/L: spread them a little so each CI stays visible.
            x = x * (1.0 + 0.025 * (s - (len(mine) - 1) / 2))
            ax.errorbar([x], [y], yerr=[[el], [eh]], fmt=markers[s % len(markers)], color=color, capsize=3,
                        markersize=6, label=str(sh) if s == 0 else None)  # fmt: skip
        means.append((float(np.mean([p[1] for p in mine])), float(np.mean([p[2] for p in mine]))))
    means.sort()
    ax.plot([m[0] for m in means], [m[1] for m in means], color="0.5", linewidth=1.2, zorder=0, label="mean per shape")
    tol = _p2_tolerance(report)
    first = float(np.mean([p[2] for p in pts if p[0] == shapes[0]]))
    if tol is not None and tol > 0:
        band = f"P2: ±{tol:.0%} of {shapes[0]}"
        ax.axhspan(first * (1 - tol), first * (1 + tol), color="0.85", zorder=-1, label=band)
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    xs = sorted({p[1] for p in pts})
    ax.set_xlim(xs[0] / 1.6, xs[-1] * 1.6)
    ax.set_xticks(xs, [f"{x:.3g}" for x in xs])  # each shape's d/L, not 2×10¹
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("aspect ratio d/L (log)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.legend(fontsize=8, loc="best")
    return fig


FAMILY_BUILDERS = {
    "matched_fraction_matrix": fig_matched_fraction_matrix,
    "loss_vs_aspect": fig_loss_vs_aspect,
}
