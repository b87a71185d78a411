"""The report as sections of paragraphs, lists and tables: the one intermediate form that the
Markdown and HTML renderers share, so the two can never disagree.

Only reads the report dict (``docs/report-schema.md``); every number shown is the one in ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .access import config_value, ordered_fields, sites_of
from .blocks import Figure, Section, Table
from .format import MISSING, as_estimate, finite, flatten, fmt
from .schema import (
    MODEL_FIELDS,
    PAIR_MATCH_FIELDS,
    PAIR_SPARSITY_FIELDS,
    PER_MODEL_FIELDS,
    SITE_GEOMETRY_FIELDS,
    SITE_SPARSITY_FIELDS,
)
from .sections_family import (
    DECISION_HEADERS,
    decision_columns,
    family_section,
    has_universality,
    universality_blocks,
    universality_table,
    verdict_figure,
)

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


DECISION_RULES = (
    "premises not met → the verdict says which premise fails and by how much;",
    "matched fraction < φ (or no better than its baseline) → non-universal features;",
    "CI of the median ln density ratio r contains 0 but not ln π → contradiction;",
    "CI contains ln π but not 0 → sparsity follows the prediction;",
    "otherwise (both, neither, no matched pairs, or π null for lack of pressure) → inconclusive.",
)
#: the universality rule of a report with ceilings (docs/science.md, "Calibration")
CALIBRATED_RULE = (
    "upper CI bound of U (cross-shape matched fraction / within-shape ceiling) below 1 → non-universal "
    "features; without a ceiling (uncalibrated): matched fraction < φ or no better than its baseline;"
)


def _verdict_blocks(report: Mapping) -> list[Any]:
    """The overall verdict: outcome in words, the reason, its numbers, and the per-pair decisions."""
    v = report.get("verdict") or {}
    outcome = str(v.get("outcome", "inconclusive"))
    blocks: list[Any] = [
        *universality_blocks(report),
        f"**{OUTCOME_WORDS.get(outcome, outcome)}** (`{outcome}`)",
        f"Reason: {v.get('reason') or MISSING}",
        verdict_figure(report),
    ]
    nums = flatten(v.get("numbers") or {})
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
    rules = list(DECISION_RULES)
    if has_universality(pairs):
        rules[1] = CALIBRATED_RULE
    blocks.append(rules)
    return blocks


def _decision_table(report: Mapping, pairs: Sequence[Mapping]) -> Table:
    """One row per pair with exactly the numbers the decision rules compare, and the comparisons."""
    phi_default = config_value(report, "phi")
    calibrated = has_universality(pairs)
    rows = []
    for p in pairs:
        pv = p.get("verdict") or {}
        n = pv.get("numbers") or {}
        mf = n.get("matched_fraction", p.get("matched_fraction_a"))
        bf = n.get("baseline_fraction", p.get("baseline_fraction_a"))
        phi = n.get("phi", phi_default)
        r = as_estimate(n.get("median_log_ratio", p.get("median_log_ratio")))
        lpi = n.get("log_predicted_ratio", p.get("log_predicted_ratio"))
        lo, hi = finite(r.get("lo")), finite(r.get("hi"))
        lpi_f = finite(lpi)
        zero_in = None if lo is None or hi is None else lo <= 0.0 <= hi
        pi_in = None if lo is None or hi is None or lpi_f is None else lo <= lpi_f <= hi
        ceiling = decision_columns(report, p) if calibrated else []
        rows.append(
            [
                f"{p.get('site_a')} ↔ {p.get('site_b')}",
                fmt(mf),
                *ceiling,
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
        *(DECISION_HEADERS if calibrated else []),
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
            "; ".join(f"{k} = {fmt(v)}" for k, v in flatten(p.get("numbers") or {})) or MISSING,
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
    for f in ordered_fields([a, b], known):
        row = [f, fmt(a.get(f)), fmt(b.get(f))]
        if ratio:
            va, vb = finite(a.get(f)), finite(b.get(f))
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


#: the dictionary-seed ceiling's columns, shown (after fvu) only when some site measured it
SEED_CEILING_FIELDS = ("seed_ceiling", "seed_ceiling_mean_corr")
SEED_CEILING_NOTE = (
    "seed_ceiling is the dictionary-seed ceiling: the fraction of the alive latents whose best match in a second "
    "SAE, trained with another seed on the same activations, reaches τ (seed_ceiling_mean_corr: their mean best "
    "match), on the match tokens; it is how reproducible the dictionary itself is, beside its FVU, dead fraction "
    "(1 − n_alive/n_latents) and L0, and is not used in U."
)


def _has_seed_ceiling(report: Mapping) -> bool:
    sites = [*sites_of(report, "A"), *sites_of(report, "B")]
    return any(s.get(f) is not None for s in sites for f in SEED_CEILING_FIELDS)


def _site_section(report: Mapping) -> Section:
    blocks: list[Any] = [
        "n_alive is the feature count n_s (latents with density above the floor), sigma = n_s/m, "
        "C_star = σ / g(median p), p_star = g⁻¹(σ/C) (— when σ/C < e: no superposition pressure). "
        "Geometry is of the dictionary's decoder directions: dims_sum = Σ D_i, d_star = m/‖W‖²_F."
    ]
    seed_ceiling = _has_seed_ceiling(report)
    if seed_ceiling:
        blocks.append(SEED_CEILING_NOTE)
    # Known fields are always shown, so the ceiling's join them only when measured (else excluded).
    known, hidden = (*SITE_SPARSITY_FIELDS, *SEED_CEILING_FIELDS), []
    if not seed_ceiling:
        known, hidden = SITE_SPARSITY_FIELDS, list(SEED_CEILING_FIELDS)
    for model in ("A", "B"):
        sites = sites_of(report, model)
        name = ((report.get("models") or {}).get(model) or {}).get("name")
        blocks.append(("h3", f"Model {model}" + (f" ({name})" if name else "")))
        if not sites:
            blocks.append("No sites.")
            continue
        sparsity = ordered_fields(sites, known, exclude=[*SITE_GEOMETRY_FIELDS[1:], "model", *hidden])
        blocks.append(Table(sparsity, [[fmt(s.get(f)) for f in sparsity] for s in sites]))
        geometry = list(SITE_GEOMETRY_FIELDS)
        blocks.append(Table(geometry, [[fmt(s.get(f)) for f in geometry] for s in sites]))
    blocks += [("h3", "Figures of the sites")]
    blocks += [Figure(n) for n in ("density_histograms", "sigma_vs_capacity", "decoder_dims")]
    return Section("Sites", blocks)


def _pairs_section(report: Mapping) -> Section:
    pairs = report.get("pairs") or []
    # The match correlations explain the verdict of a report without a family: they sit there then.
    corr = [Figure("match_correlations")] if report.get("family") else []
    if not pairs:
        return Section("Site pairs", ["No site pairs were analysed.", *corr, Figure("matched_densities")])
    match = list(PAIR_MATCH_FIELDS)
    sparsity = ordered_fields(pairs, PAIR_SPARSITY_FIELDS, exclude=PAIR_MATCH_FIELDS)
    blocks: list[Any] = [
        "Sites paired by relative depth ℓ/L. Best-match correlations and matched fractions (ρ* ≥ τ, τ = "
        f"{fmt(config_value(report, 'tau'))}) among alive features, each against the token-shuffled baseline.",
        Table(match, [[fmt(p.get(f)) for f in match] for p in pairs]),
        *corr,
        *universality_table(report, pairs),
        "Sparsity of matched features: r = ln(p_B(j)/p_A(i)) over matched pairs, against the predicted "
        "ratio π = p*_B/p*_A (— when a site has no superposition pressure).",
        Table(sparsity, [[fmt(p.get(f)) for f in sparsity] for p in pairs]),
        Figure("matched_densities"),
        ("h3", "Verdict of each pair"),
    ]
    items = []
    for p in pairs:
        pv = p.get("verdict") or {}
        nums = "; ".join(f"{k} = {fmt(v)}" for k, v in flatten(pv.get("numbers") or {}))
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
        items = sorted(mmc.items(), key=lambda kv: -(finite(kv[1]) if finite(kv[1]) is not None else -math.inf))
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
        *_timing_blocks(report),
    ]
    cfg = flatten(report.get("config") or {})
    if cfg:
        blocks.append(("h3", "Configuration"))
        blocks.append(Table(["setting", "value"], [[k, fmt(v)] for k, v in cfg]))
    return Section("Run", blocks)


TIMING_HEADERS = ["stage", "seconds", "calls", "tokens", "tokens/s", "peak RSS (MiB)", "peak CUDA (MiB)"]


def _mib(x: Any) -> str:
    v = finite(x)
    return MISSING if v is None else f"{v / 2**20:,.1f}"


def _fixed(x: Any, decimals: int) -> str:
    """Seconds and rates as fixed-point numbers, so a column reads at a glance."""
    v = finite(x)
    return MISSING if v is None else f"{v:,.{decimals}f}"


def _timing_blocks(report: Mapping) -> list[Any]:
    """Where the wall time went: one row per stage (a part of a stage, e.g. statistics.forward,
    after its stage), then the totals."""
    t = report.get("timings")
    if not isinstance(t, Mapping):
        return [("h3", "Timings"), "No timings recorded (a report analysed from measurements alone, or older)."]
    rows = [
        [
            str(st.get("stage", MISSING)),
            _fixed(st.get("seconds"), 3),
            fmt(st.get("calls")),
            fmt(st.get("tokens")),
            _fixed(st.get("tokens_per_second"), 0),
            _mib(st.get("peak_rss_bytes")),
            _mib(st.get("peak_cuda_bytes")),
        ]
        for st in t.get("stages") or []
    ]
    names = {str(st.get("stage")) for st in t.get("stages") or []}
    world = t.get("world_size")
    totals = (
        f"{_fixed(t.get('seconds'), 3)} s in all"
        + (f" on {fmt(world)} processes (these are rank 0's)" if isinstance(world, int) and world > 1 else "")
        + f", {fmt(t.get('torch_threads'))} torch CPU threads, peak RSS {_mib(t.get('peak_rss_bytes'))} MiB"
        + (f", peak CUDA {_mib(t.get('peak_cuda_bytes'))} MiB." if t.get("peak_cuda_bytes") is not None else ".")
    )
    note = (
        "Wall time per stage on this machine (not deterministic; synchronised on CUDA); a stage's parts "
        "(statistics.*) are inside it, and peak memory is the process's peak when the stage last ended."
    )
    if "report" not in names:
        note += " Writing this report is timed as it is written: its time is in report.json only."
    return [("h3", "Timings"), note, Table(TIMING_HEADERS, rows), totals]


def build_sections(report: Mapping) -> list[Section]:
    """The report as sections, verdict first; shared by the Markdown and HTML renderers."""
    family = family_section(report)
    return [
        Section("Verdict", _verdict_blocks(report)),
        _premise_section(report),
        _models_section(report),
        *([family] if family else []),
        _per_model_section(report),
        _site_section(report),
        _pairs_section(report),
        _any_layer_section(report),
        _notes_section(report),
        _provenance_section(report),
    ]
