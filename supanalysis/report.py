"""Rendering of the test report: Markdown, figures, a self-contained HTML page, and the report folder.

The report dict and arrays follow ``docs/report-schema.md`` (schema ``supanalysis.test_report/1``).
This module only reads them: it never recomputes a statistic, so every number a reader sees is
the number in ``report.json``. Markdown and HTML share one intermediate form (sections made of
paragraphs, lists and tables) so the two can never disagree.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot): nothing
is registered globally, so there is no figure to leak and no interactive backend to trip over.
matplotlib is an optional dependency (``pip install supanalysis[report]``); without it the
HTML page says the figures are unavailable instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = "supanalysis.test_report/1"

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

COLORS = {"A": "#1f77b4", "B": "#d95f02"}
MARKERS = {"A": "o", "B": "^"}
MISSING = "—"

OUTCOME_WORDS = {
    "premises_not_met": "Premises not met: the test does not apply to this pair of models",
    "non_universal_features": "Non-universal features: the models do not share most of their features, "
    "which resolves the tension",
    "contradiction": "Contradiction: features are shared and keep their sparsity although the degrees of "
    "superposition differ, so superposition within a layer cannot be the whole story",
    "sparsity_follows_prediction": "Sparsity follows the prediction: shared features change density as the "
    "superposition bound predicts, so universality in the strong sense fails",
    "inconclusive": "Inconclusive",
}

# Colours of the verdict box (background, border): a contradiction should stand out.
OUTCOME_COLORS = {
    "premises_not_met": ("#f2f2f2", "#888888"),
    "non_universal_features": ("#e8f1fb", "#1f77b4"),
    "contradiction": ("#fdecea", "#c0392b"),
    "sparsity_follows_prediction": ("#fff4e0", "#d98c00"),
    "inconclusive": ("#f2f2f2", "#666666"),
}

DECISION_RULES = (
    "premises not met → the verdict says which premise fails and by how much;",
    "matched fraction < φ (or no better than its baseline) → non-universal features;",
    "CI of the median ln density ratio r contains 0 but not ln π → contradiction;",
    "CI contains ln π but not 0 → sparsity follows the prediction;",
    "otherwise (both, neither, no matched pairs, or π null for lack of pressure) → inconclusive.",
)

# Field orders of the schema's objects; fields the producer adds beyond these are shown after them.
MODEL_FIELDS = (
    "name",
    "source",
    "architecture",
    "n_layers",
    "d_model",
    "d_ff",
    "n_heads",
    "vocab_size",
    "non_embedding_params",
    "kaplan_params",
    "aspect_ratio",
    "eval_loss",
)
PER_MODEL_FIELDS = ("neurons_total", "features_total", "sigma_model", "sigma_mean_site")
SITE_SPARSITY_FIELDS = (
    "site",
    "layer",
    "depth",
    "m",
    "dictionary",
    "n_latents",
    "n_alive",
    "sigma",
    "median_density",
    "g_median",
    "C_star",
    "p_star",
    "pressure",
    "tokens",
    "mean_l0",
    "fvu",
)
SITE_GEOMETRY_FIELDS = ("site", "dims_sum", "d_star", "mean_max_abs_cos", "welch_bound", "total_sq_cos")
PAIR_MATCH_FIELDS = (
    "site_a",
    "site_b",
    "depth_a",
    "depth_b",
    "tokens",
    "mean_max_corr_a",
    "baseline_mean_max_corr_a",
    "mean_max_corr_b",
    "baseline_mean_max_corr_b",
    "matched_fraction_a",
    "baseline_fraction_a",
    "matched_fraction_b",
    "baseline_fraction_b",
)
PAIR_SPARSITY_FIELDS = (
    "site_a",
    "site_b",
    "n_matched",
    "median_log_ratio",
    "predicted_ratio",
    "log_predicted_ratio",
    "verdict",
)


# ============================================================================ small helpers
def sanitize(name: Any) -> str:
    """A site name as it appears in array keys: every character outside ``[A-Za-z0-9_.]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", str(name))


def pair_key(site_a: Any, site_b: Any) -> str:
    """The ``<pair>`` part of array keys: ``<site_a>__<site_b>``, both sanitised."""
    return f"{sanitize(site_a)}__{sanitize(site_b)}"


def _is_estimate(x: Any) -> bool:
    return isinstance(x, Mapping) and {"value", "lo", "hi"} <= set(x)


def _finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 4) -> str:
    """Format one value for a table: nulls and NaN as "—", ints with separators, floats to ``digits``.

    Very large or small floats use scientific notation so densities stay readable.
    """
    if x is None:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        v = float(x)
        if not math.isfinite(v):
            return MISSING
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e9 or a < 1e-3:
            return f"{v:.{digits - 1}e}"
        if a >= 10**digits or v.is_integer():  # counts stored as floats: no spurious exponent
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if _is_estimate(x):
        return fmt_estimate(x, digits)
    if isinstance(x, Mapping):
        if "outcome" in x:  # a verdict: its outcome is what fits in a cell
            return str(x["outcome"])
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in x.items()) or MISSING
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x) or MISSING
    return str(x)


def fmt_estimate(e: Mapping, digits: int = 4) -> str:
    """``value [lo, hi] (n=…, 95% CI)``; a null value gives "—"."""
    if _finite(e.get("value")) is None:
        return MISSING
    s = f"{fmt(e['value'], digits)} [{fmt(e.get('lo'), digits)}, {fmt(e.get('hi'), digits)}]"
    extra = []
    if e.get("n") is not None:
        extra.append(f"n={fmt(e['n'])}")
    level = _finite(e.get("level"))
    if level is not None:
        extra.append(f"{level:.0%} CI")
    return s + (f" ({', '.join(extra)})" if extra else "")


def _as_estimate(x: Any) -> dict:
    """An Estimate dict from an Estimate, a bare number (no CI) or None ({})."""
    if _is_estimate(x):
        return dict(x)
    return {} if _finite(x) is None else {"value": x, "lo": None, "hi": None}


def _flatten(numbers: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, value) rows; estimates stay whole so they print as one CI."""
    if not isinstance(numbers, Mapping) or _is_estimate(numbers):
        return [(prefix or "value", numbers)]
    rows: list[tuple[str, Any]] = []
    for k, v in numbers.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and not _is_estimate(v) and v:
            rows.extend(_flatten(v, key))
        else:
            rows.append((key, v))
    return rows


def _config_value(report: Mapping, name: str, default: Any = None) -> Any:
    """A threshold from the config: top level first, then the nested ``thresholds`` table."""
    cfg = report.get("config") or {}
    if not isinstance(cfg, Mapping):
        return default
    if cfg.get(name) is not None:
        return cfg[name]
    th = cfg.get("thresholds")
    if isinstance(th, Mapping) and th.get(name) is not None:
        return th[name]
    return default


def _capacity_constant(report: Mapping) -> float:
    c = _finite(_config_value(report, "C", 1.0))
    return c if c is not None and c > 0 else 1.0


def _ordered_fields(objs: Iterable[Mapping], known: Sequence[str], exclude: Iterable[str] = ()) -> list[str]:
    """The known fields in schema order, then any others the objects carry (so nothing is hidden)."""
    seen = list(known)
    skip = set(exclude) | set(known)
    for o in objs:
        for k in o:
            if k not in skip and k not in seen:
                seen.append(k)
    return seen


def _sites(report: Mapping, model: str) -> list[Mapping]:
    return list((report.get("sites") or {}).get(model) or [])


def _site_by_name(report: Mapping, model: str, name: Any) -> Mapping:
    for s in _sites(report, model):
        if s.get("site") == name:
            return s
    return {}


# ============================================================================ document model
@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One section of the report: a title and blocks (str paragraph, list of str bullets, Table, or
    a ("h3", text) sub-heading)."""

    title: str
    blocks: list[Any]


def _verdict_blocks(report: Mapping) -> list[Any]:
    """The overall verdict: outcome in words, the reason, its numbers, and the per-pair decisions."""
    v = report.get("verdict") or {}
    outcome = str(v.get("outcome", "inconclusive"))
    blocks: list[Any] = [
        f"**{OUTCOME_WORDS.get(outcome, outcome)}** (`{outcome}`)",
        f"Reason: {v.get('reason') or MISSING}",
    ]
    nums = _flatten(v.get("numbers") or {})
    if nums:
        blocks.append(Table(["number", "value"], [[k, fmt(x)] for k, x in nums]))
    # A failed premise decides every pair, so say which one and by how much right here.
    failed = [p for p in report.get("premises") or [] if p.get("holds") is False]
    if failed:
        blocks.append("Premises that do not hold:")
        blocks.append([f"{p.get('name', MISSING)}: {p.get('detail') or MISSING}" for p in failed])
    pairs = report.get("pairs") or []
    if pairs:
        blocks.append(("h3", "How each site pair was decided"))
        blocks.append(_decision_table(report, pairs))
    blocks.append("Decision rules (SCIENCE.md), applied in this order to each site pair:")
    blocks.append(list(DECISION_RULES))
    return blocks


def _decision_table(report: Mapping, pairs: Sequence[Mapping]) -> Table:
    """One row per pair with exactly the numbers the decision rules compare, and the comparisons."""
    phi_default = _config_value(report, "phi")
    rows = []
    for p in pairs:
        pv = p.get("verdict") or {}
        n = pv.get("numbers") or {}
        mf = n.get("matched_fraction", p.get("matched_fraction_a"))
        bf = n.get("baseline_fraction", p.get("baseline_fraction_a"))
        phi = n.get("phi", phi_default)
        r = _as_estimate(n.get("median_log_ratio", p.get("median_log_ratio")))
        lpi = n.get("log_predicted_ratio", p.get("log_predicted_ratio"))
        lo, hi = _finite(r.get("lo")), _finite(r.get("hi"))
        lpi_f = _finite(lpi)
        zero_in = None if lo is None or hi is None else lo <= 0.0 <= hi
        pi_in = None if lo is None or hi is None or lpi_f is None else lo <= lpi_f <= hi
        rows.append(
            [
                f"{p.get('site_a')} ↔ {p.get('site_b')}",
                fmt(mf),
                fmt(bf),
                fmt(phi),
                fmt(r) if r else MISSING,
                fmt(lpi),
                fmt(zero_in),
                fmt(pi_in),
                str(pv.get("outcome", MISSING)),
            ]
        )
    headers = [
        "pair",
        "matched fraction",
        "baseline fraction",
        "φ",
        "median r = ln(p_B/p_A) [CI]",
        "ln π",
        "0 in CI",
        "ln π in CI",
        "outcome",
    ]
    return Table(headers, rows)


def _premise_section(report: Mapping) -> Section:
    prem = report.get("premises") or []
    rows = [
        [
            str(p.get("name", MISSING)),
            fmt(p.get("holds")),
            str(p.get("detail") or MISSING),
            "; ".join(f"{k} = {fmt(v)}" for k, v in _flatten(p.get("numbers") or {})) or MISSING,
        ]
        for p in prem
    ]
    blocks: list[Any] = [Table(["premise", "holds", "detail", "numbers"], rows)] if rows else ["No premises reported."]
    return Section("Premises", blocks)


def _ab_table(objs: Mapping, known: Sequence[str], ratio: bool = False) -> Table:
    """A field × {A, B} table; with ``ratio`` a B/A column for numeric fields."""
    a, b = objs.get("A") or {}, objs.get("B") or {}
    headers = ["field", "A", "B"] + (["B/A"] if ratio else [])
    rows = []
    for f in _ordered_fields([a, b], known):
        row = [f, fmt(a.get(f)), fmt(b.get(f))]
        if ratio:
            va, vb = _finite(a.get(f)), _finite(b.get(f))
            row.append(fmt(vb / va) if va and vb is not None else MISSING)
        rows.append(row)
    return Table(headers, rows)


def _models_section(report: Mapping) -> Section:
    models = report.get("models") or {}
    blocks: list[Any] = [
        "Non-embedding parameters are exact (all parameters except token/position embeddings and unembedding); "
        "kaplan_params is 12·L·d²; eval_loss is the cross-entropy in nats/token with its bootstrap CI.",
        _ab_table(models, MODEL_FIELDS, ratio=True),
    ]
    return Section("Models", blocks)


def _per_model_section(report: Mapping) -> Section:
    blocks: list[Any] = [
        "Two neuron-counting conventions: per site (m_s, in the site tables below) and per model "
        "(M = Σ_s m_s). The direction of the comparison can flip between them.",
        _ab_table(report.get("per_model") or {}, PER_MODEL_FIELDS, ratio=True),
    ]
    return Section("Neuron-counting conventions", blocks)


def _site_section(report: Mapping) -> Section:
    blocks: list[Any] = [
        "n_alive is the feature count n_s (latents with density above the floor), sigma = n_s/m, "
        "C_star = σ / g(median p), p_star = g⁻¹(σ/C) (— when σ/C < e: no superposition pressure). "
        "Geometry is of the dictionary's decoder directions: dims_sum = Σ D_i, d_star = m/‖W‖²_F."
    ]
    for model in ("A", "B"):
        sites = _sites(report, model)
        name = ((report.get("models") or {}).get(model) or {}).get("name")
        blocks.append(("h3", f"Model {model}" + (f" ({name})" if name else "")))
        if not sites:
            blocks.append("No sites.")
            continue
        sparsity = _ordered_fields(sites, SITE_SPARSITY_FIELDS, exclude=[*SITE_GEOMETRY_FIELDS[1:], "model"])
        blocks.append(Table(sparsity, [[fmt(s.get(f)) for f in sparsity] for s in sites]))
        geometry = list(SITE_GEOMETRY_FIELDS)
        blocks.append(Table(geometry, [[fmt(s.get(f)) for f in geometry] for s in sites]))
    return Section("Sites", blocks)


def _pairs_section(report: Mapping) -> Section:
    pairs = report.get("pairs") or []
    if not pairs:
        return Section("Site pairs", ["No site pairs were analysed."])
    match = list(PAIR_MATCH_FIELDS)
    sparsity = _ordered_fields(pairs, PAIR_SPARSITY_FIELDS, exclude=PAIR_MATCH_FIELDS)
    blocks: list[Any] = [
        "Sites paired by relative depth ℓ/L. Best-match correlations and matched fractions (ρ* ≥ τ, τ = "
        f"{fmt(_config_value(report, 'tau'))}) among alive features, each against the token-shuffled baseline.",
        Table(match, [[fmt(p.get(f)) for f in match] for p in pairs]),
        "Sparsity of matched features: r = ln(p_B(j)/p_A(i)) over matched pairs, against the predicted "
        "ratio π = p*_B/p*_A (— when a site has no superposition pressure).",
        Table(sparsity, [[fmt(p.get(f)) for f in sparsity] for p in pairs]),
        ("h3", "Verdict of each pair"),
    ]
    items = []
    for p in pairs:
        pv = p.get("verdict") or {}
        nums = "; ".join(f"{k} = {fmt(v)}" for k, v in _flatten(pv.get("numbers") or {}))
        items.append(
            f"{p.get('site_a')} ↔ {p.get('site_b')}: `{pv.get('outcome', MISSING)}`: {pv.get('reason') or MISSING}"
            + (f" (numbers: {nums})" if nums else "")
        )
    blocks.append(items)
    return Section("Site pairs", blocks)


def _any_layer_section(report: Mapping) -> Section:
    entries = report.get("any_layer") or []
    if not entries:
        return Section("Any-layer matches", ["No any-layer matching in this run."])
    rows = []
    for e in entries:
        mmc = e.get("mean_max_corr") or {}
        # Best candidates first, so the cross-layer structure reads left to right.
        items = sorted(mmc.items(), key=lambda kv: -(_finite(kv[1]) if _finite(kv[1]) is not None else -math.inf))
        rows.append(
            [
                str(e.get("site_a", MISSING)),
                str(e.get("best_site_b", MISSING)),
                fmt(e.get("matched_fraction")),
                ", ".join(f"{k}: {fmt(v, 3)}" for k, v in items) or MISSING,
            ]
        )
    blocks: list[Any] = [
        "For each site of A, the site of B whose features match its alive features best (any depth): a best "
        "match away from the depth-paired site points to cross-layer representation.",
        Table(["site_a", "best_site_b", "matched_fraction", "mean_max_corr per site of B (best first)"], rows),
    ]
    return Section("Any-layer matches", blocks)


def _notes_section(report: Mapping) -> Section:
    notes = [str(n) for n in report.get("notes") or []]
    return Section("Notes", [notes] if notes else ["No notes."])


def _provenance_section(report: Mapping) -> Section:
    lib = report.get("library") or {}
    blocks: list[Any] = [
        f"Schema `{report.get('schema', MISSING)}`, created {report.get('created', MISSING)}.",
        Table(["component", "value"], [[str(k), fmt(v)] for k, v in lib.items()]) if lib else "No library info.",
    ]
    cfg = _flatten(report.get("config") or {})
    if cfg:
        blocks.append(("h3", "Configuration"))
        blocks.append(Table(["setting", "value"], [[k, fmt(v)] for k, v in cfg]))
    return Section("Run", blocks)


def build_sections(report: Mapping) -> list[Section]:
    """The report as sections, verdict first; shared by the Markdown and HTML renderers."""
    return [
        Section("Verdict", _verdict_blocks(report)),
        _premise_section(report),
        _models_section(report),
        _per_model_section(report),
        _site_section(report),
        _pairs_section(report),
        _any_layer_section(report),
        _notes_section(report),
        _provenance_section(report),
    ]


# ============================================================================ Markdown
def _md_text(s: str) -> str:
    # Angle brackets (e.g. in a site name) would be read as HTML tags by Markdown renderers.
    return s.replace("<", "\\<").replace(">", "\\>")


def _md_cell(s: str) -> str:
    # A pipe or newline inside a cell would break the table.
    return _md_text(s).replace("|", "\\|").replace("\n", " ")


def _md_block(block: Any) -> str:
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |"]
        lines.append("|" + "---|" * len(block.headers))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, tuple) and block[0] == "h3":
        return f"### {block[1]}"
    if isinstance(block, list):
        return "\n".join(f"- {_md_text(item)}" for item in block)
    return _md_text(str(block))


def render_markdown(report: Mapping) -> str:
    """The report as Markdown: verdict first, then premises, models, conventions, sites, pairs,
    any-layer matches, notes and the run's provenance."""
    out = ["# Superposition versus universality: test report", ""]
    for sec in build_sections(report):
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            out += [_md_block(block), ""]
    return "\n".join(out)


# ============================================================================ figures
FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "density_histograms",
        "Firing densities",
        "Histogram of log10(density + 1e-10) of every latent, per site; each paired site overlays A (blue) and "
        "B (orange), as the fraction of that site's latents. Dead latents pile up at −10. Dashed lines: median "
        "density of the alive latents; grey dotted line: the density floor. If the models shared features that "
        "keep their sparsity, the A and B histograms of a pair would coincide.",
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
        "Histogram of D_i = ‖W_i‖⁴ / Σ_j (W_i·W_j)² over every latent of each site's dictionary (log counts). "
        "Reference lines at 1, 3/4, 2/3, 1/2, 2/5 and 3/8, where features of toy models of superposition "
        "cluster; D_i = 1 is a feature with a dimension to itself, 0 a zero or unused direction.",
    ),
)


def _require_matplotlib():
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


def _finite_values(x: np.ndarray | None) -> np.ndarray:
    return np.empty(0) if x is None else x[np.isfinite(x)]


def _new_figure(n_panels: int, ncols: int = 3, panel_w: float = 4.6, panel_h: float = 3.4):
    """A constrained-layout figure with ``n_panels`` axes in a grid (unused cells hidden)."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    n = max(1, n_panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    fig.clear()  # release the artists now rather than at garbage collection
    return buf.getvalue()


def _no_data(ax, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _short(name: Any, width: int = 28) -> str:
    s = str(name)
    return s if len(s) <= width else "…" + s[-(width - 1) :]


def _density_panels(report: Mapping) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Panels of the density figure: one per pair (A and B overlaid), then each unpaired site alone."""
    panels = []
    paired: dict[str, set] = {"A": set(), "B": set()}
    for p in report.get("pairs") or []:
        a, b = p.get("site_a"), p.get("site_b")
        paired["A"].add(a)
        paired["B"].add(b)
        panels.append((f"A {_short(a, 20)} ↔ B {_short(b, 20)}", [("A", a), ("B", b)]))
    for model in ("A", "B"):
        for s in _sites(report, model):
            if s.get("site") not in paired[model]:
                panels.append((f"{model}: {_short(s.get('site'))} (unpaired)", [(model, s.get("site"))]))
    return panels


def _fig_density_histograms(report: Mapping, arrays: Mapping):
    panels = _density_panels(report)
    fig, axes = _new_figure(len(panels))
    fig.suptitle("Firing density of each latent, A vs B per site pair")
    if not panels:
        _no_data(axes[0], "no data: the report has no sites")
        return fig
    floor = _finite(_config_value(report, "density_floor"))
    for ax, (title, series) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        data = []
        for model, site in series:
            d = _finite_values(_array(arrays, f"density/{model}/{sanitize(site)}"))
            if d.size:
                data.append((model, site, np.log10(np.clip(d, 0.0, None) + DENSITY_EPS)))
        if not data:
            _no_data(ax, "no data: density arrays missing")
            continue
        lo = min(x.min() for *_, x in data)
        hi = max(x.max() for *_, x in data)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        for model, site, x in data:
            ax.hist(
                x,
                bins=bins,
                weights=np.full(x.size, 1.0 / x.size),
                histtype="step",
                linewidth=1.6,
                color=COLORS[model],
                label=f"{model} (n={x.size:,})",
            )
            med = _finite(_site_by_name(report, model, site).get("median_density"))
            if med is not None and med > 0:
                ax.axvline(math.log10(med + DENSITY_EPS), color=COLORS[model], linestyle="--", linewidth=1)
        if floor is not None and floor > 0:
            ax.axvline(math.log10(floor + DENSITY_EPS), color="0.5", linestyle=":", linewidth=1, label="density floor")
        ax.set_xlabel("log10(density + 1e-10)")
        ax.set_ylabel("fraction of latents")
        ax.legend(fontsize=7, loc="upper left")
    return fig


def _capacity(p: np.ndarray) -> np.ndarray:
    return -1.0 / (p * np.log(p))


def _fig_sigma_vs_capacity(report: Mapping, arrays: Mapping):
    C = _capacity_constant(report)
    fig, (ax,) = _new_figure(1, panel_w=7.5, panel_h=5.2)
    ax.set_title(f"Degree of superposition σ = n/m against capacity C·g(p), C = {C:g}", fontsize=10)
    points = {m: [] for m in ("A", "B")}
    skipped = 0
    for model in ("A", "B"):
        for s in _sites(report, model):
            p, sigma = _finite(s.get("median_density")), _finite(s.get("sigma"))
            if p is None or sigma is None or not 0 < p < 1 or sigma <= 0:
                skipped += 1
                continue
            points[model].append((p, sigma, s.get("site"), _finite(s.get("p_star"))))
    allp = [pt[0] for m in points for pt in points[m]]
    if not allp:
        _no_data(ax, "no data: no site with a median density in (0, 1) and σ > 0")
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
                    _short(name, 18),
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
    fig, axes = _new_figure(len(pairs), panel_w=4.4, panel_h=4.2)
    fig.suptitle("Densities of matched feature pairs, p_A(i) vs p_B(j)")
    if not pairs:
        _no_data(axes[0], "no data: no site pairs")
        return fig
    for ax, p in zip(axes, pairs):
        key = pair_key(p.get("site_a"), p.get("site_b"))
        ax.set_title(f"A {_short(p.get('site_a'), 18)} ↔ B {_short(p.get('site_b'), 18)}", fontsize=9)
        pa, pb = _array(arrays, f"matched/{key}/p_a"), _array(arrays, f"matched/{key}/p_b")
        if pa is None or pb is None or pa.size != pb.size:
            _no_data(ax, "no data: matched arrays missing" if pa is None or pb is None else "no data: length mismatch")
            continue
        ok = np.isfinite(pa) & np.isfinite(pb) & (pa > 0) & (pb > 0)
        pa, pb = pa[ok], pb[ok]
        if not pa.size:
            _no_data(ax, "no data: no matched pairs with positive densities")
            continue
        ax.scatter(pa, pb, s=8, alpha=0.5, color="#555555", edgecolors="none", label=f"matched pairs (n={pa.size:,})")
        lo = min(pa.min(), pb.min()) / 3
        hi = min(max(pa.max(), pb.max()) * 3, 1.0)
        line = np.array([lo, hi])
        ax.plot(line, line, color="black", linestyle="--", linewidth=1, label="identity p_B = p_A")
        pi = _finite(p.get("predicted_ratio"))
        if pi is not None and pi > 0:
            ax.plot(line, pi * line, color="#c0392b", linewidth=1.4, label=f"predicted p_B = π·p_A (π = {pi:.3g})")
        r = _finite((p.get("median_log_ratio") or {}).get("value"))
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
    floor = _finite(_config_value(report, "density_floor")) or 0.0
    return np.isfinite(d) & (d > floor)


def _corr_panel(ax, report: Mapping, arrays: Mapping, pair: Mapping, side: str) -> None:
    """One histogram of best-match correlations vs the baseline, for one side of one pair."""
    model = side.upper()
    site = pair.get(f"site_{side}")
    other = pair.get("site_b" if side == "a" else "site_a")
    key = pair_key(pair.get("site_a"), pair.get("site_b"))
    ax.set_title(f"{model} {_short(site, 18)} → {'B' if side == 'a' else 'A'} {_short(other, 18)}", fontsize=9)
    mc, bc = _array(arrays, f"max_corr/{key}/{side}"), _array(arrays, f"baseline_corr/{key}/{side}")
    alive = None if mc is None else _alive_mask(report, arrays, model, site, mc.size)
    series = []
    for x, label in ((mc, "best match ρ*"), (bc, "baseline (shuffled)")):
        if x is None:
            continue
        if alive is not None and x.size == alive.size:
            x = x[alive]
        x = _finite_values(x)
        if x.size:
            series.append((x, label))
    if not series:
        _no_data(ax, "no data: correlation arrays missing")
        return
    lo = min(0.0, min(x.min() for x, _ in series))
    bins = np.linspace(lo, 1.0, 41)
    for x, label in series:
        if label.startswith("best"):
            ax.hist(x, bins=bins, color=COLORS[model], alpha=0.55, label=f"{label} (n={x.size:,})")
        else:
            ax.hist(x, bins=bins, histtype="step", color="0.3", linewidth=1.4, label=f"{label} (n={x.size:,})")
    tau = _finite(_config_value(report, "tau"))
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", linewidth=1, label=f"τ = {tau:g}")
    ax.set_xlabel("correlation")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7, loc="best")  # the baseline sits left, the matches right: let matplotlib choose


def _fig_match_correlations(report: Mapping, arrays: Mapping):
    pairs = report.get("pairs") or []
    fig, axes = _new_figure(2 * len(pairs), ncols=2, panel_w=4.8, panel_h=3.2)
    fig.suptitle("Best-match correlation against the shuffled baseline (left: A side, right: B side)")
    if not pairs:
        _no_data(axes[0], "no data: no site pairs")
        return fig
    for i, p in enumerate(pairs):
        _corr_panel(axes[2 * i], report, arrays, p, "a")
        _corr_panel(axes[2 * i + 1], report, arrays, p, "b")
    return fig


def _fig_decoder_dims(report: Mapping, arrays: Mapping):
    from matplotlib.ticker import NullFormatter

    panels = [(m, s) for m in ("A", "B") for s in _sites(report, m)]
    fig, axes = _new_figure(len(panels), ncols=4, panel_w=3.8, panel_h=3.0)
    fig.suptitle("Dimensionality D_i of each decoder direction, per site")
    if not panels:
        _no_data(axes[0], "no data: the report has no sites")
        return fig
    bins = np.linspace(0.0, 1.05, 43)
    for ax, (model, s) in zip(axes, panels):
        name = s.get("site")
        dims = _finite_values(_array(arrays, f"dims/{model}/{sanitize(name)}"))
        summary = f"n={dims.size:,}, ΣD={fmt(_finite(s.get('dims_sum')), 3)}, m={fmt(s.get('m'))}"
        # pad: room for the reference labels above the axes
        ax.set_title(f"{model}: {_short(name)}\n{summary}", fontsize=8, pad=12)
        if not dims.size:
            _no_data(ax, "no data: dims array missing")
            continue
        ax.hist(np.clip(dims, 0.0, 1.05), bins=bins, color=COLORS[model], alpha=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # labels on decades only, not "6×10¹"
        for v, label in DIM_REFERENCES:
            ax.axvline(v, color="0.35", linestyle=":", linewidth=0.9)
            # 3/8 and 2/5 are close: push their labels apart.
            ha = {"3/8": "right", "2/5": "left"}.get(label, "center")
            ax.text(v, 1.0, label, transform=ax.get_xaxis_transform(), ha=ha, va="bottom", fontsize=6)
        ax.set_xlim(0.0, 1.05)
        ax.set_xlabel("D_i")
        ax.set_ylabel("latents (log)")
    return fig


_FIGURE_BUILDERS: dict[str, Callable[[Mapping, Mapping], Any]] = {
    "density_histograms": _fig_density_histograms,
    "sigma_vs_capacity": _fig_sigma_vs_capacity,
    "matched_densities": _fig_matched_densities,
    "match_correlations": _fig_match_correlations,
    "decoder_dims": _fig_decoder_dims,
}


def _error_figure(name: str, exc: Exception) -> bytes:
    fig, (ax,) = _new_figure(1, panel_w=6, panel_h=2.5)
    _no_data(ax, f"figure '{name}' could not be drawn:\n{type(exc).__name__}: {exc}")
    return _png(fig)


def render_figures(report: Mapping, arrays: Mapping | None) -> dict[str, bytes]:
    """PNG bytes of each figure, keyed as in :data:`FIGURES` (in that order).

    Missing arrays or empty data give a panel saying "no data". A figure that fails anyway
    becomes a PNG with the error (and a warning), so one bad array never costs the whole report.
    """
    arrays = arrays or {}
    out = {}
    for name, _, _ in FIGURES:
        try:
            out[name] = _png(_FIGURE_BUILDERS[name](report, arrays))
        except ImportError:
            raise
        except Exception as exc:
            warnings.warn(f"report figure {name!r} failed: {exc!r}", RuntimeWarning, stacklevel=2)
            out[name] = _error_figure(name, exc)
    return out


# ============================================================================ HTML
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.verdict { border: 3px solid; border-radius: 8px; padding: 1rem 1.4rem; margin: 1rem 0 1.5rem; }
.verdict .outcome { font-size: 1.35rem; font-weight: 700; margin: 0 0 .5rem; }
.verdict code { font-size: .9rem; }
.tablewrap { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #444; max-width: 900px; }
nav a { margin-right: .8rem; font-size: .9rem; }
"""


def _html_inline(text: str) -> str:
    """Escape, then turn **bold** and `code` spans (the only Markdown the blocks use) into tags."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _html_block(block: Any) -> str:
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, tuple) and block[0] == "h3":
        return f"<h3>{html.escape(block[1])}</h3>"
    if isinstance(block, list):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in block) + "</ul>"
    return f"<p>{_html_inline(str(block))}</p>"


def _html_verdict(section: Section, outcome: str) -> str:
    bg, border = OUTCOME_COLORS.get(outcome, OUTCOME_COLORS["inconclusive"])
    first, *rest = section.blocks
    inner = f'<p class="outcome">{_html_inline(first)}</p>' + "".join(_html_block(b) for b in rest)
    return (
        f'<section id="verdict" class="verdict" style="background:{bg};border-color:{border}">'
        f"<h2 style='margin-top:0;border:none'>Verdict</h2>{inner}</section>"
    )


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(report: Mapping, arrays: Mapping | None, figures: Mapping[str, bytes] | None = None) -> str:
    """A single self-contained HTML page: the verdict box first, then the Markdown's sections as HTML
    tables, then the figures (inline base64 PNGs) with captions on how to read them.

    ``figures`` may be passed when already rendered (as :func:`write_report` does) to draw them once.
    """
    sections = build_sections(report)
    outcome = str((report.get("verdict") or {}).get("outcome", "inconclusive"))
    title = "Superposition versus universality: test report"
    models = report.get("models") or {}
    names = " vs ".join(str((models.get(m) or {}).get("name", m)) for m in ("A", "B"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(names)} · {html.escape(str(report.get('created', '')))}</p>",
        _html_verdict(sections[0], outcome),
        "<nav>"
        + "".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections[1:])
        + '<a href="#figures">Figures</a></nav>',
    ]
    for sec in sections[1:]:
        parts.append(f'<section id="{_anchor(sec.title)}"><h2>{html.escape(sec.title)}</h2>')
        parts += [_html_block(b) for b in sec.blocks]
        parts.append("</section>")
    parts.append(_html_figures(report, arrays, figures))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_figures(report: Mapping, arrays: Mapping | None, figures: Mapping[str, bytes] | None) -> str:
    if figures is None:
        try:
            figures = render_figures(report, arrays)
        except ImportError as exc:
            return f'<section id="figures"><h2>Figures</h2><p>{html.escape(str(exc))}</p></section>'
    out = ['<section id="figures"><h2>Figures</h2>']
    for i, (name, heading, caption) in enumerate(FIGURES, 1):
        png = figures.get(name)
        if png is None:
            continue
        b64 = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure id="fig-{name}"><img alt="{html.escape(heading)}" src="data:image/png;base64,{b64}">'
            f"<figcaption><strong>Figure {i}. {html.escape(heading)}.</strong> {html.escape(caption)}"
            "</figcaption></figure>"
        )
    out.append("</section>")
    return "\n".join(out)


# ============================================================================ files
def to_jsonable(obj: Any) -> Any:
    """``obj`` with NaN/±inf as None (the schema forbids NaN) and numpy/torch/dataclass values as
    plain JSON types."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return to_jsonable(obj.tolist())
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)  # e.g. a torch.dtype in the config: its name is what a reader needs


def _storable(name: str, value: Any) -> torch.Tensor:
    """A contiguous CPU tensor in the schema's dtypes: float64 for reals, int64 for ints and bools."""
    # ascontiguousarray: torch cannot wrap numpy arrays with negative strides (e.g. x[::-1]).
    t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
    t = t.to("cpu")
    if t.is_complex():
        raise TypeError(f"array {name!r} is complex; the report stores real arrays only")
    t = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
    return t.contiguous()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same folder, then os.replace: a reader never sees half a file."""
    # Not mkstemp: its files are mode 0600, and a report should get the usual (umask) permissions.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # Create it ourselves to learn the umask's mode: safetensors writes its files 0600.
        with open(tmp, "xb"):
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    _atomic_write(path, write)


def write_report(folder: str | os.PathLike, report: Mapping, arrays: Mapping | None) -> dict[str, Path]:
    """Write report.json, arrays.safetensors, report.md and report.html into ``folder`` (created if
    needed), each atomically. Returns {"json", "arrays", "markdown", "html"} → path.

    The JSON is the report with NaN/inf turned into null; Markdown and HTML are rendered from that
    same cleaned dict, so all three agree.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(report)
    if clean.get("schema") is None:
        clean["schema"] = SCHEMA
    tensors = {str(k): _storable(str(k), v) for k, v in (arrays or {}).items() if v is not None}
    paths = {
        "json": folder / "report.json",
        "arrays": folder / "arrays.safetensors",
        "markdown": folder / "report.md",
        "html": folder / "report.html",
    }
    _write_text(paths["json"], json.dumps(clean, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    _atomic_write(paths["arrays"], lambda tmp: save_file(tensors, tmp, metadata={"schema": SCHEMA}))
    _write_text(paths["markdown"], render_markdown(clean))
    _write_text(paths["html"], render_html(clean, tensors))
    return paths


def load_report(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read report.json and arrays.safetensors back (safetensors only: no pickle is ever loaded).

    Raises ValueError when the JSON is not schema ``supanalysis.test_report/1`` and
    FileNotFoundError when a file is missing.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    jpath, apath = folder / "report.json", folder / "arrays.safetensors"
    for p in (jpath, apath):
        if not p.is_file():
            raise FileNotFoundError(f"not a supanalysis report folder: {p} is missing")
    try:
        with open(jpath, encoding="utf-8") as fh:
            report = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{jpath}: not valid UTF-8 JSON ({exc})") from exc
    schema = report.get("schema") if isinstance(report, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{jpath}: expected schema {SCHEMA!r}, found {schema!r}")
    try:
        arrays = load_file(str(apath))
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise ValueError(f"{apath}: not a readable safetensors file ({exc})") from exc
    return report, arrays
