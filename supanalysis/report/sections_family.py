"""The sections of a family report: the calibrated universality verdict, the family of models, the
within-shape ceilings and relative universality U beside every cross-shape matched fraction.

Every block here reads keys that reports made without a family lack; each function returns
nothing for such a report, so it renders exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .blocks import Figure, Section, Table
from .format import MISSING, finite, fmt, fmt_estimate, is_estimate

UNIVERSALITY_WORDS = {
    "universal_within_reproducibility": "Universal within reproducibility: the models of different shapes share "
    "their features as well as two seeds of one shape do",
    "non_universal_features": "Non-universal features: the models of different shapes match less than two seeds "
    "of one shape do",
}

UNCALIBRATED_FLAG = "UNCALIBRATED: no within-shape ceiling was measured"


def ci(e: Any) -> str:
    """An estimate as ``value [lo, hi]`` (no n, no level: short enough for a verdict line or a cell)."""
    if not is_estimate(e) or finite(e.get("value")) is None:
        return MISSING
    return f"{fmt(e['value'])} [{fmt(e.get('lo'))}, {fmt(e.get('hi'))}]"


def p4_premise(report: Mapping) -> Mapping | None:
    return next((p for p in report.get("premises") or [] if str(p.get("name", "")).startswith("P4")), None)


def p4_state(report: Mapping) -> str | None:
    """P4 in one line: "on inadequate dictionaries: worst FVU x, dead y" when it fails; None without P4."""
    p4 = p4_premise(report)
    if p4 is None:
        return None
    n = p4.get("numbers") or {}
    dead = finite(n.get("worst_dead"))
    worst = f"worst FVU {fmt(n.get('worst_fvu'))}, dead {MISSING if dead is None else f'{dead:.1%}'}"
    if p4.get("holds") is False:
        return f"**on inadequate dictionaries: {worst}** (P4 fails: {p4.get('detail') or MISSING})"
    return f"P4 adequate dictionaries holds: {worst}"


def universality_blocks(report: Mapping) -> list[Any]:
    """The verdict box's lead: the universality outcome, U_min with its CI, the calibration flag and
    P4's state; [] for a report without a universality verdict."""
    v = report.get("verdict") or {}
    uni = v.get("universality")
    if not isinstance(uni, Mapping):
        return []
    outcome = str(uni.get("outcome", MISSING))
    calibrated = uni.get("calibrated", v.get("calibrated"))
    flag = "calibrated against within-shape ceilings" if calibrated else f"**{UNCALIBRATED_FLAG}**"
    blocks: list[Any] = [
        f"**{UNIVERSALITY_WORDS.get(outcome, outcome)}** (`{outcome}`)",
        f"U_min = {ci(uni.get('U_min'))} · {flag}",
        f"Universality: {uni.get('reason') or MISSING}",
    ]
    state = p4_state(report)
    if state:
        blocks.append(state)
    return blocks


def verdict_figure(report: Mapping) -> Figure:
    """The figure the verdict rests on: the family's matched-fraction matrix, else the match correlations."""
    return Figure("matched_fraction_matrix" if report.get("family") else "match_correlations")


def _relative(report: Mapping, model: str, into: str, site: Any, site_into: Any) -> Mapping:
    for r in (report.get("family") or {}).get("relative_universality") or []:
        if (r.get("model"), r.get("into"), r.get("site"), r.get("site_into")) == (model, into, site, site_into):
            return r
    return {}


def pair_sides(report: Mapping, pair: Mapping) -> list[tuple[str, Mapping, Any]]:
    """A pair's two sides as (side, relative-universality row or {}, U estimate or None)."""
    uni = pair.get("universality") or {}
    a, b = pair.get("site_a"), pair.get("site_b")
    return [
        ("A", _relative(report, "A", "B", a, b), uni.get("U_a")),
        ("B", _relative(report, "B", "A", b, a), uni.get("U_b")),
    ]


def has_universality(pairs: Sequence[Mapping]) -> bool:
    return any(isinstance(p.get("universality"), Mapping) for p in pairs)


def decision_columns(report: Mapping, pair: Mapping) -> list[str]:
    """The ceiling beside the cross-shape matched fraction of one pair, for the decision table."""
    uni = pair.get("universality") or {}
    cells = []
    for _, rel, u in pair_sides(report, pair):
        cells += [fmt(rel.get("ceiling_fraction")), ci(u)]
    return cells + [fmt(uni.get("calibrated")), str(uni.get("outcome", MISSING))]


DECISION_HEADERS = ["ceiling fraction A", "U_A [CI]", "ceiling fraction B", "U_B [CI]", "calibrated", "universality"]


def universality_table(report: Mapping, pairs: Sequence[Mapping]) -> list[Any]:
    """One row per pair and side: cross matched fraction, ceiling fraction, U with CI, calibrated."""
    if not has_universality(pairs):
        return []
    rows = []
    for p in pairs:
        uni = p.get("universality") or {}
        for side, rel, u in pair_sides(report, p):
            cross = rel.get("cross_fraction", p.get(f"matched_fraction_{side.lower()}"))
            rows.append(
                [
                    f"{p.get('site_a')} ↔ {p.get('site_b')}",
                    f"{side} → {'B' if side == 'A' else 'A'}",
                    fmt(cross),
                    fmt(rel.get("ceiling_fraction")),
                    str(rel.get("ceiling_model", MISSING)),
                    fmt_estimate(u) if is_estimate(u) else MISSING,
                    fmt(uni.get("calibrated")),
                    str(uni.get("outcome", MISSING)),
                ]
            )
    headers = ["pair", "side", "cross matched fraction", "ceiling fraction", "ceiling seed", "U [CI]"]
    return [
        ("h3", "Universality against the within-shape ceiling"),
        "U = cross-shape matched fraction / matched fraction between two seeds of one shape, each latent's "
        "best match taken over the same depths in both (the family's depth grid; docs/science.md, Calibration). "
        "With a family, the decision rests on each shape's U pooled over its seeds and compared sites (below); "
        "non-universal when a pooled U's CI lies below 1. Uncalibrated pairs (no ceiling) are decided by the "
        "absolute rule on the matched fraction.",
        Table(headers + ["calibrated", "universality"], rows),
    ]


FAMILY_MODEL_HEADERS = ["label", "name", "shape", "seed", "L", "d", "N", "d/L", "eval loss [CI]"]


def _models_table(models: Sequence[Mapping]) -> Table:
    keys = ("label", "name", "shape", "seed", "n_layers", "d_model", "non_embedding_params", "aspect_ratio")
    rows = [[fmt(m.get(k)) for k in keys] + [fmt(m.get("eval_loss"))] for m in models]
    return Table(FAMILY_MODEL_HEADERS, rows)


def _sigma_table(report: Mapping) -> list[Any]:
    """σ of every site of every model the report has sites for, one row per site."""
    sites = report.get("sites") or {}
    keys = ("site", "depth", "m", "n_alive", "sigma")
    rows = [[str(model)] + [fmt(s.get(k)) for k in keys] for model, ss in sites.items() for s in ss or []]
    if not rows:
        return []
    return [
        ("h3", "Degree of superposition per model and site"),
        Table(["model", "site", "depth", "m", "n_alive", "σ = n/m"], rows),
    ]


def _ceilings_table(ceilings: Sequence[Mapping]) -> list[Any]:
    if not ceilings:
        return [("h3", "Within-shape ceilings"), "No shape has two seeds: no ceiling was measured."]
    keys = ("shape", "model_x", "model_y", "site_x", "site_y")
    stats = ("matched_fraction", "mean_best_match")
    rows = [[fmt(c.get(k)) for k in (*keys, *stats)] for c in ceilings]
    return [
        ("h3", "Within-shape ceilings"),
        "Two seeds of one shape matched at each depth-paired site: the reproducibility every cross-shape "
        "number is judged against (bootstrap CI over features).",
        Table([*keys, "matched fraction [CI]", "mean best match [CI]"], rows),
    ]


def _sites(names: Any) -> str:
    listed = isinstance(names, Sequence) and not isinstance(names, str) and len(names) > 0
    return ", ".join(map(str, names)) if listed else MISSING


def _relative_table(relative: Sequence[Mapping]) -> list[Any]:
    if not relative:
        return []
    keys = ("model", "into", "ceiling_model", "site", "site_into")
    rows = [
        [fmt(r.get(k)) for k in keys]
        + [_sites(r.get("sites_into_matched")), _sites(r.get("sites_ceiling"))]
        + [fmt(r.get("cross_fraction")), fmt(r.get("ceiling_fraction")), fmt(r.get("U"))]
        for r in relative
    ]
    headers = [*keys, "matched over (into)", "matched over (ceiling)", "cross_fraction", "ceiling_fraction", "U [CI]"]
    return [("h3", "Relative universality U, every model into every other shape"), Table(headers, rows)]


def _pooled_table(pooled: Sequence[Mapping]) -> list[Any]:
    if not pooled:
        return []
    rows = [[fmt(r.get("shape")), fmt(r.get("into_shape")), _sites(r.get("models")), _sites(r.get("into_models")),
             _sites(r.get("sites")), fmt(r.get("cross_fraction")), fmt(r.get("ceiling_fraction")), ci(r.get("U"))]
            for r in pooled]  # fmt: skip
    headers = [
        "shape",
        "into",
        "models",
        "matched into",
        "sites pooled",
        "cross_fraction",
        "ceiling_fraction",
        "U [CI]",
    ]
    return [("h3", "Relative universality pooled over the family (the verdict's U)"), Table(headers, rows)]


def family_section(report: Mapping) -> Section | None:
    """Every model of the run, their losses against aspect ratio, σ per site, the ceilings and U;
    None for a report without a family."""
    fam = report.get("family")
    if not isinstance(fam, Mapping):
        return None
    models = list(fam.get("models") or [])
    blocks: list[Any] = [
        "Every model of the run, measured on the same tokens. Labels: a letter per shape, a prime per further "
        "seed. N: exact non-embedding parameters; eval loss in nats/token with its bootstrap CI.",
        _models_table(models) if models else "No models.",
        Figure("loss_vs_aspect"),
        *_sigma_table(report),
        *_ceilings_table(fam.get("ceilings") or []),
        *_relative_table(fam.get("relative_universality") or []),
        *_pooled_table(fam.get("pooled_universality") or []),
    ]
    return Section("Family", blocks)
