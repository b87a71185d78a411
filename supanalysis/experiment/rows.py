"""The report's schema: one typed dataclass per object of ``report.json``, in field order.

:func:`~supanalysis.experiment.analyse` builds these and turns them into JSON with
:meth:`Report.to_json`, so the JSON's keys and their order are the fields declared here.
Each class's docstring documents its fields, one ``name: meaning`` line each (see
:func:`field_docs`); ``docs/report-schema.md`` is generated from them
(:mod:`supanalysis.experiment.schema_doc`). The ``*_FIELDS`` tuples are the field names in
order, for the renderers.

Premises, verdicts and confidence-interval estimates are :mod:`supanalysis.science`'s own
dataclasses (:class:`~supanalysis.science.Premise`, :class:`~supanalysis.science.Verdict`,
:class:`~supanalysis.science.Estimate`), and the run's timings :mod:`.timing`'s
(:class:`~.timing.TimingsRow`, :class:`~.timing.StageRow`), documented the same way.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..science import Estimate, Premise, Verdict
from .timing import StageRow, TimingsRow

REPORT_SCHEMA = "supanalysis.test_report/1"


def sanitize(name: Any) -> str:
    """A site name as it appears in array keys: every character outside ``[A-Za-z0-9_.]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", str(name))


def pair_key(site_a: Any, site_b: Any) -> str:
    """The ``<pair>`` part of array keys: ``<site_a>__<site_b>``, both sanitised."""
    return f"{sanitize(site_a)}__{sanitize(site_b)}"


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or None when it is missing or not finite (the schema forbids NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None, tuples -> lists, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


@dataclass
class ModelRow:
    """`Model`: one model of the pair (`models.A`, `models.B`).

    name: label in the report
    source: the model folder, or "in-memory"
    architecture: architecture family
    n_layers: layers L
    d_model: residual width d
    d_ff: MLP hidden width
    n_heads: attention heads
    vocab_size: vocabulary size
    non_embedding_params: non-embedding parameters (exact)
    kaplan_params: 12·L·d²
    aspect_ratio: d/L
    eval_loss: mean next-token cross-entropy, nats/token, over the eval tokens
    """

    name: str
    source: str
    architecture: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    vocab_size: int
    non_embedding_params: int
    kaplan_params: int
    aspect_ratio: float
    eval_loss: Estimate


@dataclass
class PerModelRow:
    """`PerModel`: both neuron conventions of one model (`per_model.A`, `per_model.B`).

    neurons_total: M = Σ_s m_s
    features_total: Σ_s n_s
    sigma_model: Σ_s n_s / M
    sigma_mean_site: mean over sites of n_s / m_s
    """

    neurons_total: int
    features_total: int
    sigma_model: float | None
    sigma_mean_site: float | None


@dataclass
class SiteRow:
    """`Site`: one site of one model (`sites.A[i]`, `sites.B[j]`).

    model: "A" or "B"
    site: site name
    layer: 0-based layer (-1 when the site has none)
    depth: (layer+1)/L
    m: neurons
    dictionary: which dictionary, in words
    n_latents: dictionary width
    n_alive: latents with density > density floor: the site's feature count n_s
    sigma: n_s / m
    median_density: median p over alive latents
    g_median: g(median p)
    C_star: σ / g(median p)
    p_star: g⁻¹(σ/C), null when σ/C < e
    pressure: σ/C ≥ e
    tokens: tokens in the statistics
    mean_l0: mean active latents per token
    dims_sum: Σ D_i of the decoder directions
    d_star: m / ‖W‖²_F
    mean_max_abs_cos: mean over latents of the largest |cos| to another decoder direction
    welch_bound: the Welch bound on that largest |cos|
    total_sq_cos: Σ of squared cosines between decoder directions
    fvu: dictionary reconstruction FVU on the statistics tokens, null for the neuron basis
    seed_ceiling: the dictionary-seed ceiling: fraction of the alive latents whose best match in a
        second SAE, trained with another seed on the same activations, has ρ* ≥ τ (on the match
        tokens), bootstrap CI over latents; null unless the SAE was trained here with
        `sae.seed_ceiling`
    seed_ceiling_mean_corr: mean best-match correlation of those latents in the second SAE,
        bootstrap CI; null when seed_ceiling is null
    capture_convention: the activations the dictionary was trained on, relative to the raw
        model (center, processing, description), null when it declares none
    """

    model: str
    site: str
    layer: int
    depth: float | None
    m: int
    dictionary: str
    n_latents: int
    n_alive: int
    sigma: float
    median_density: float | None
    g_median: float | None
    C_star: float | None
    p_star: float | None
    pressure: bool
    tokens: int
    mean_l0: float
    dims_sum: float | None
    d_star: float | None
    mean_max_abs_cos: float | None
    welch_bound: float
    total_sq_cos: float
    fvu: float | None
    seed_ceiling: Estimate | None = None
    seed_ceiling_mean_corr: Estimate | None = None
    capture_convention: dict | None = None


@dataclass
class UniversalityRow:
    """`Universality`: whether one depth pair's features are universal (`pairs[k].universality`).

    outcome: "universal_within_reproducibility" or "non_universal_features"
    calibrated: decided against within-shape ceilings (U) on both sides; false: the absolute
        rule (matched fraction of A < φ, or no better than its baseline)
    reason: why, in words
    U_a: relative universality of A's features in B (against A and another seed of A's shape), null without a ceiling
    U_b: relative universality of B's features in A (against B and another seed of B's shape), null without a ceiling
    """

    outcome: str
    calibrated: bool
    reason: str
    U_a: Estimate | None
    U_b: Estimate | None


@dataclass
class PairRow:
    """`Pair`: one site pair matched by relative depth (`pairs[k]`).

    site_a: site of A
    site_b: site of B
    depth_a: relative depth of site_a
    depth_b: relative depth of site_b
    tokens: tokens correlated
    match_mode: `dense`: the whole co-moment in one streaming pass; `tiled`: beyond
        `match_max_bytes`, row blocks recomputed over the kept match tokens' codes, same
        result to float rounding
    mean_max_corr_a: mean best-match correlation of A's alive latents
    mean_max_corr_b: mean best-match correlation of B's alive latents
    baseline_mean_max_corr_a: the same under the token-shuffled baseline, A side
    baseline_mean_max_corr_b: the same under the token-shuffled baseline, B side
    matched_fraction_a: fraction of A's alive latents with ρ* ≥ τ
    matched_fraction_b: fraction of B's alive latents with ρ* ≥ τ
    baseline_fraction_a: matched_fraction_a under the token-shuffled baseline
    baseline_fraction_b: matched_fraction_b under the token-shuffled baseline
    n_matched: matched pairs with positive density on both sides
    median_log_ratio: median r = ln(p_B(j)/p_A(i)) over matched pairs
    predicted_ratio: π, null without pressure
    log_predicted_ratio: ln π
    universality: the universality decision of this pair (docs/science.md, "Calibration")
    verdict: this pair's verdict
    """

    site_a: str
    site_b: str
    depth_a: float | None
    depth_b: float | None
    tokens: int
    match_mode: str
    mean_max_corr_a: float | None
    mean_max_corr_b: float | None
    baseline_mean_max_corr_a: float | None
    baseline_mean_max_corr_b: float | None
    matched_fraction_a: float
    matched_fraction_b: float
    baseline_fraction_a: float
    baseline_fraction_b: float
    n_matched: int
    median_log_ratio: Estimate
    predicted_ratio: float | None
    log_predicted_ratio: float | None
    universality: UniversalityRow
    verdict: Verdict


@dataclass
class AnyLayerRow:
    """`AnyLayer`: for one site of A, its best-matching site of B (`any_layer[k]`).

    site_a: site of A
    best_site_b: the site of B with the highest mean best-match correlation
    mean_max_corr: per candidate site of B, the mean best-match correlation of A's alive latents
    matched_fraction: fraction of A's alive latents with ρ* ≥ τ at best_site_b
    """

    site_a: str
    best_site_b: str
    mean_max_corr: dict[str, float | None]
    matched_fraction: float


@dataclass
class FamilyModelRow:
    """`FamilyModel`: one model of the family (`family.models[k]`, config order).

    label: A, A', B, B', ...: a letter per shape, a prime per further seed
    name: the model's name
    shape: its shape label
    seed: its seed label
    n_layers: layers L
    d_model: residual width d
    non_embedding_params: non-embedding parameters (exact)
    aspect_ratio: d/L
    eval_loss: mean next-token cross-entropy, nats/token, over the eval tokens
    """

    label: str
    name: str
    shape: str
    seed: str
    n_layers: int
    d_model: int
    non_embedding_params: int
    aspect_ratio: float
    eval_loss: Estimate


@dataclass
class MatrixRow:
    """`Matrix`: matched fractions between every two models (`family.matched_fraction_matrix`).

    labels: the models' labels, rows and columns in this order
    values: values[r][c]: fraction of row model's alive latents with ρ* ≥ τ in the column
        model, mean over their depth-paired site pairs; the diagonal is null
    """

    labels: list[str]
    values: list[list[float | None]]


@dataclass
class CeilingRow:
    """`Ceiling`: two seeds of one shape at one depth-paired site pair (`family.ceilings[k]`).

    shape: the shape
    model_x: label of the model whose latents are matched
    model_y: label of the seed they are matched into
    site_x: site of model_x
    site_y: site of model_y
    matched_fraction: fraction of model_x's alive latents with ρ* ≥ τ in model_y, bootstrap CI over latents
    mean_best_match: mean best-match correlation of those latents, bootstrap CI
    """

    shape: str
    model_x: str
    model_y: str
    site_x: str
    site_y: str
    matched_fraction: Estimate
    mean_best_match: Estimate


@dataclass
class RelativeRow:
    """`Relative`: relative universality of one model's latents in another shape (`family.relative_universality[k]`).

    model: label of the model whose latents are matched
    into: label of the model of another shape they are matched into
    ceiling_model: label of the seed of model's shape that gives the ceiling
    site: site of model
    site_into: the depth-paired site of into (names the row)
    U: cross_fraction / ceiling_fraction, paired bootstrap CI over model's alive latents (null without a ceiling match)
    cross_fraction: fraction of model's alive latents with ρ* ≥ τ in into, best over sites_into_matched
    ceiling_fraction: the same in ceiling_model, best over sites_ceiling
    sites_into_matched: the sites of into matched over: its grid sites (older reports: absent, site_into alone)
    sites_ceiling: the sites of ceiling_model matched over, at the same depths (older reports: absent)
    """

    model: str
    into: str
    ceiling_model: str
    site: str
    site_into: str
    U: Estimate
    cross_fraction: float
    ceiling_fraction: float
    sites_into_matched: list[str] = field(default_factory=list)
    sites_ceiling: list[str] = field(default_factory=list)


@dataclass
class PooledRow:
    """`Pooled`: one shape's relative universality into another over the whole family (`family.pooled_universality[k]`).

    shape: the shape whose latents are matched
    into_shape: the other shape
    models: labels of the models of shape whose latents are pooled (each has a ceiling seed)
    into_models: labels of the models of into_shape they are matched into
    sites: "<model> <site>" of every pooled site
    U: cross_fraction / ceiling_fraction, paired bootstrap CI over the pooled alive latents (null: no ceiling match)
    cross_fraction: mean over the pooled latents of the fraction of into_models each is matched in (ρ* ≥ τ, best
        over the grid sites)
    ceiling_fraction: fraction of the pooled latents matched in their own model's ceiling seed
    """

    shape: str
    into_shape: str
    models: list[str]
    into_models: list[str]
    sites: list[str]
    U: Estimate
    cross_fraction: float
    ceiling_fraction: float


@dataclass
class FamilyRow:
    """`Family`: every model of the run, matched on the same tokens (`family`).

    models: the models in config order
    matched_fraction_matrix: matched fractions between every two models
    ceilings: within-shape ceilings: for each two seeds of one shape, per depth-paired site pair
    relative_universality: per model, model of another shape and depth-paired site pair, U against the ceiling
    pooled_universality: per shape and other shape, U over every seed and compared site (the verdict's U)
    """

    models: list[FamilyModelRow]
    matched_fraction_matrix: MatrixRow
    ceilings: list[CeilingRow]
    relative_universality: list[RelativeRow]
    pooled_universality: list[PooledRow] = field(default_factory=list)


@dataclass
class LibraryRow:
    """`Library`: what produced the report (`library`).

    supanalysis: library version
    torch: torch version
    python: Python version
    device: device the measurements ran on
    backend: op backend requested
    """

    supanalysis: str
    torch: str
    python: str
    device: str
    backend: str


@dataclass
class Report:
    """`Report`: the top level of `report.json`.

    schema: "supanalysis.test_report/1"
    created: ISO-8601 UTC time
    library: what produced the report
    config: the TestConfig that produced the run (see supanalysis/config.py); `thresholds`
        and `C` are the ones of this analysis
    verdict: the overall verdict (first screen of the report)
    premises: P1 equal parameters, P2 equal performance, P3 different neuron counts (of the first pair),
        P4 adequate dictionaries (of every model)
    models: the two models, under "A" and "B"
    per_model: per-model totals, under "A" and "B"
    sites: the sites of each model, under "A" and "B"
    pairs: site pairs matched by relative depth (layer+1)/L
    any_layer: for each site of A, its best-matching site of B (empty without any-layer matching)
    family: every model of the run (the primary pair A, B and further seeds), with the ceilings and U;
        null for measurements made without it
    notes: conventions and caveats, in words
    timings: wall seconds, tokens and peak memory per stage of the run; null when the report was
        analysed from measurements alone (analyse) or before reports carried timings
    """

    schema: str
    created: str
    library: LibraryRow
    config: dict
    verdict: Verdict
    premises: list[Premise]
    models: dict[str, ModelRow]
    per_model: dict[str, PerModelRow]
    sites: dict[str, list[SiteRow]]
    pairs: list[PairRow]
    any_layer: list[AnyLayerRow]
    family: FamilyRow | None
    notes: list[str]
    timings: TimingsRow | None = None

    def to_json(self) -> dict:
        """The JSON object (plain dicts and lists, no NaN)."""
        return json_safe(asdict(self))


def field_docs(cls: type) -> tuple[str, dict[str, str]]:
    """A schema class's title (its docstring's first line) and each field's documentation.

    Field lines are ``name: meaning`` after the first blank line; a more indented line
    continues the one above.
    """
    title, _, body = inspect.cleandoc(cls.__doc__ or "").partition("\n\n")
    docs: dict[str, str] = {}
    last = None
    for line in body.splitlines():
        m = re.match(r"^(\w+): (.+)$", line)
        if m:
            last = m.group(1)
            docs[last] = m.group(2).strip()
        elif line.startswith(" ") and last is not None:
            docs[last] += " " + line.strip()
    return title.strip(), docs


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass's field names, in order (the JSON keys of its object)."""
    return tuple(f.name for f in fields(cls))


REPORT_FIELDS = field_names(Report)
LIBRARY_FIELDS = field_names(LibraryRow)
MODEL_FIELDS = field_names(ModelRow)
PER_MODEL_FIELDS = field_names(PerModelRow)
SITE_FIELDS = field_names(SiteRow)
PAIR_FIELDS = field_names(PairRow)
ANY_LAYER_FIELDS = field_names(AnyLayerRow)
UNIVERSALITY_FIELDS = field_names(UniversalityRow)
FAMILY_FIELDS = field_names(FamilyRow)
FAMILY_MODEL_FIELDS = field_names(FamilyModelRow)
CEILING_FIELDS = field_names(CeilingRow)
RELATIVE_FIELDS = field_names(RelativeRow)
TIMINGS_FIELDS = field_names(TimingsRow)
STAGE_FIELDS = field_names(StageRow)
PREMISE_FIELDS = field_names(Premise)
VERDICT_FIELDS = field_names(Verdict)
ESTIMATE_FIELDS = field_names(Estimate)

#: every object of the schema, in the order docs/report-schema.md describes them
SCHEMA_OBJECTS: tuple[type, ...] = (
    Report, LibraryRow, ModelRow, PerModelRow, SiteRow, PairRow, UniversalityRow, AnyLayerRow, FamilyRow,
    FamilyModelRow, MatrixRow, CeilingRow, RelativeRow, PooledRow, TimingsRow, StageRow, Premise, Verdict, Estimate,
)  # fmt: skip
