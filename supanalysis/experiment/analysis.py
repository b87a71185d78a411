"""From measurements to the report, under the thresholds of the day (no model is run).

    Measurements -> Model / PerModel / Site rows per model (+ density and dims arrays)
                 -> premises P1, P2 (models) and P3 (per pair)
                 -> Pair rows with their verdicts (+ correlation and matched-density arrays)
                 -> AnyLayer rows -> overall verdict -> Report (rows.py) -> JSON

SCIENCE.md is the specification of every number.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from dataclasses import asdict, replace

import numpy as np
import torch

from .. import calibration as K
from .. import science as S
from ..accumulators import BestMatch
from ..accumulators.tiled import TiledBestMatch
from ..config import TestConfig, Thresholds
from .family import (
    FamilyAnalysis,
    PooledDecision,
    analyse_family,
    overall_universality,
    pair_universality,
    pooled_universality,
)
from .measurements import Measurements, ModelMeasurement, PairMeasurement, SiteMeasurement
from .rows import (
    REPORT_SCHEMA,
    AnyLayerRow,
    LibraryRow,
    ModelRow,
    PairRow,
    PerModelRow,
    Report,
    SiteRow,
    finite_or_none,
    pair_key,
    sanitize,
)

Arrays = dict[str, torch.Tensor]


def analyse(meas: Measurements, thresholds: Thresholds | None = None) -> tuple[dict, Arrays]:
    """The report (a dict following docs/report-schema.md) and its arrays, from measurements."""
    report, arrays = build_report(meas, thresholds)
    return report.to_json(), arrays


def build_report(meas: Measurements, thresholds: Thresholds | None = None) -> tuple[Report, Arrays]:
    """The report's typed rows and its arrays (see the module docstring for the flow)."""
    cfg = meas.config
    th = thresholds or cfg.thresholds
    arrays: Arrays = {}
    models, sites, per_model = {}, {}, {}
    for label, mm in (("A", meas.a), ("B", meas.b)):
        models[label] = model_row(mm, cfg)
        sites[label] = [site_row(label, s, mm.shape.n_layers, th, arrays, cfg) for s in mm.sites]
        per_model[label] = per_model_row(sites[label])
    premises = model_premises(meas, th)
    fam = analyse_family(meas, th)
    pooled = pooled_universality(fam, meas.family.primary, th.u_margin) if meas.family is not None else None
    p4 = dictionaries_premise(meas, sites, th)
    pairs, verdicts = [], []
    first_pair_premises = None
    for p in meas.pairs:
        pair_premises = [*premises, site_premise(meas, p, per_model)]
        first_pair_premises = first_pair_premises or pair_premises  # the premise table shows the first pair's P3
        row = pair_row(meas, p, sites["A"][p.i], sites["B"][p.j], pair_premises, th, arrays, fam, pooled)
        row.verdict = S.labelled(row.verdict, row.universality.calibrated, p4)
        pairs.append(row)
        verdicts.append(row.verdict)
    any_layer = any_layer_rows(meas, th) if cfg.any_layer and meas.cross else []
    universality = overall_universality([r.universality for r in pairs], pooled)
    verdict = S.labelled(S.overall_verdict(verdicts), universality["calibrated"], p4)
    verdict = replace(verdict, universality=universality)
    report = Report(
        schema=REPORT_SCHEMA,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        library=library_row(meas),
        config=config_json(cfg, th),
        verdict=verdict,
        premises=[*(first_pair_premises or premises), p4],  # no pairs: still the model-level premises
        models=models,
        per_model=per_model,
        sites=sites,
        pairs=pairs,
        any_layer=any_layer,
        family=fam.row if fam is not None else None,
        notes=notes(cfg, th),
    )
    return report, arrays


# ----------------------------------------------------------------------------- per model and site
def model_row(mm: ModelMeasurement, cfg: TestConfig) -> ModelRow:
    sh = mm.shape
    return ModelRow(
        name=mm.name,
        source=mm.source,
        architecture=sh.architecture,
        n_layers=sh.n_layers,
        d_model=sh.d_model,
        d_ff=sh.d_ff,
        n_heads=sh.n_heads,
        vocab_size=sh.vocab_size,
        non_embedding_params=sh.non_embedding_params,
        kaplan_params=sh.kaplan_params,
        aspect_ratio=sh.aspect_ratio,
        eval_loss=S.bootstrap(mm.losses, "mean", n_boot=cfg.bootstrap, seed=cfg.seed),
    )


def dictionaries_premise(meas: Measurements, sites: dict[str, list[SiteRow]], th: Thresholds) -> S.Premise:
    """P4 over every dictionary of every model (the family's, else A's and B's)."""
    rows = [(label, r) for label in ("A", "B") for r in sites[label]]
    fm = meas.family
    if fm is not None:
        primary = set(fm.primary)
        for k, mm in enumerate(fm.models):
            if k not in primary:
                rows += [
                    (fm.labels[k], site_row(fm.labels[k], s, mm.shape.n_layers, th, {}, meas.config)) for s in mm.sites
                ]
    quality = [
        K.DictionaryQuality(f"{label} {r.site}", None, 0.0)
        if r.dictionary.startswith("neuron basis")
        else K.DictionaryQuality(f"{label} {r.site}", r.fvu, 1.0 - r.n_alive / max(r.n_latents, 1))
        for label, r in rows
    ]
    return K.premise_adequate_dictionaries(quality, max_fvu=th.max_fvu, max_dead=th.max_dead)


def site_row(label: str, s: SiteMeasurement, n_layers: int, th: Thresholds, arrays: Arrays, cfg: TestConfig) -> SiteRow:
    """One site's sparsity, geometry and dictionary quality; adds its density and dims arrays."""
    dens = s.stats.density.cpu()
    alive = dens > th.density_floor
    seed_ceiling = seed_mean = None
    if s.seed_best is not None:
        seed_ceiling, seed_mean = K.dictionary_seed_ceiling(s.seed_best, alive, th.tau, n_boot=cfg.bootstrap,
                                                            seed=cfg.seed)  # fmt: skip
    n_alive = int(alive.sum())
    sigma = n_alive / s.m
    med = float(dens[alive].median()) if n_alive else math.nan
    total_var = float(s.x_stats.state_dict()["m2"].sum())
    arrays[f"density/{label}/{sanitize(s.site)}"] = dens.double()
    arrays[f"dims/{label}/{sanitize(s.site)}"] = s.dims.double()
    return SiteRow(
        model=label,
        site=s.site,
        layer=s.layer,
        depth=(s.layer + 1) / n_layers if s.layer >= 0 else None,
        m=s.m,
        dictionary=s.dictionary,
        n_latents=s.stats.n_features,
        n_alive=n_alive,
        sigma=sigma,
        median_density=finite_or_none(med),
        g_median=finite_or_none(S.g(med)) if 0 < med < 1 else None,
        C_star=finite_or_none(S.bound_tightness(sigma, med)) if n_alive else None,
        p_star=S.predicted_density(sigma, th.C),
        pressure=sigma / th.C >= math.e,
        tokens=s.stats.n_tokens,
        mean_l0=s.stats.mean_l0,
        dims_sum=finite_or_none(s.sum_dims),
        d_star=finite_or_none(s.d_star),
        mean_max_abs_cos=float(s.max_abs_cos.mean()) if s.max_abs_cos.numel() else None,
        welch_bound=s.welch_bound,
        total_sq_cos=s.total_sq_cos,
        fvu=(s.sse / total_var) if (s.sse and total_var > 0) else None,
        seed_ceiling=seed_ceiling,
        seed_ceiling_mean_corr=seed_mean,
        capture_convention=s.capture_convention,
    )


def per_model_row(rows: list[SiteRow]) -> PerModelRow:
    M = sum(r.m for r in rows)
    n = sum(r.n_alive for r in rows)
    return PerModelRow(
        neurons_total=M,
        features_total=n,
        sigma_model=n / M if M else None,
        sigma_mean_site=float(np.mean([r.sigma for r in rows])) if rows else None,
    )


# ----------------------------------------------------------------------------- premises
def model_premises(meas: Measurements, th: Thresholds) -> list[S.Premise]:
    """P1 and P2: properties of the two models."""
    cfg = meas.config
    la, lb = meas.a.losses, meas.b.losses
    n = min(la.numel(), lb.numel())
    rel = S.paired_relative_difference(la[:n], lb[:n], n_boot=cfg.bootstrap, seed=cfg.seed)
    return [
        S.premise_equal_params(
            meas.a.shape.non_embedding_params, meas.b.shape.non_embedding_params, th.params_tolerance
        ),
        S.premise_equal_performance(rel, th.loss_tolerance),
    ]


def site_premise(meas: Measurements, p: PairMeasurement, per_model: dict[str, PerModelRow]) -> S.Premise:
    """P3: the neurons of the pair's sites, and of the two models, differ."""
    m_a, m_b = meas.a.sites[p.i].m, meas.b.sites[p.j].m
    return S.premise_different_neurons(m_a, m_b, per_model["A"].neurons_total, per_model["B"].neurons_total)


# ----------------------------------------------------------------------------- pairs
def _fraction_at(mc: torch.Tensor, alive: torch.Tensor, tau: float) -> float:
    """Fraction of alive features whose best-match correlation reaches τ (0 with none alive)."""
    return float((mc.cpu()[alive] >= tau).double().mean()) if bool(alive.any()) else 0.0


def _mean_on(mc: torch.Tensor, alive: torch.Tensor) -> float | None:
    return float(mc.cpu()[alive].mean()) if bool(alive.any()) else None


def _matched(bm: BestMatch, pa: torch.Tensor, pb: torch.Tensor, alive_a: torch.Tensor, tau: float):
    """A's alive features matched at ρ* ≥ τ and their partners in B, both densities positive.

    -> (ii, jj): indices into A's and B's latents, (n_matched,) each."""
    match = bm.match_a.cpu()
    sel = alive_a & (bm.max_corr_a.cpu() >= tau) & (match >= 0)
    ii = sel.nonzero().flatten()
    jj = match[ii]
    ok = pb[jj] > 0
    return ii[ok], jj[ok]


def pair_row(
    meas: Measurements,
    p: PairMeasurement,
    ra: SiteRow,
    rb: SiteRow,
    premises: list[S.Premise],
    th: Thresholds,
    arrays: Arrays,
    fam: FamilyAnalysis | None = None,
    pooled: PooledDecision | None = None,
) -> PairRow:
    """One depth pair's matching, density ratio, universality and verdict; adds its arrays."""
    cfg = meas.config
    pa, pb = meas.a.sites[p.i].stats.density.cpu(), meas.b.sites[p.j].stats.density.cpu()
    alive_a, alive_b = pa > th.density_floor, pb > th.density_floor
    bm = p.corr.best_match()
    blm = p.baseline.best_match() if p.baseline is not None else None
    mf_a, mf_b = _fraction_at(bm.max_corr_a, alive_a, th.tau), _fraction_at(bm.max_corr_b, alive_b, th.tau)
    bf_a = _fraction_at(blm.max_corr_a, alive_a, th.tau) if blm else 0.0
    bf_b = _fraction_at(blm.max_corr_b, alive_b, th.tau) if blm else 0.0
    ii, jj = _matched(bm, pa, pb, alive_a, th.tau)
    lr = S.bootstrap(torch.log(pb[jj] / pa[ii]), "median", n_boot=cfg.bootstrap, seed=cfg.seed)
    pi = S.predicted_ratio(ra.sigma, rb.sigma, th.C)
    _pair_arrays(pair_key(ra.site, rb.site), bm, blm, pa[ii], pb[jj], arrays)
    primary = meas.family.primary if meas.family is not None else (0, 1)
    uni = pair_universality(fam, primary, (p.i, p.j), (mf_a, mf_b), (bf_a, bf_b), th.phi, pooled, th.u_margin)
    return PairRow(
        site_a=ra.site,
        site_b=rb.site,
        depth_a=ra.depth,
        depth_b=rb.depth,
        tokens=p.corr.n_tokens,
        match_mode=p.corr.mode if isinstance(p.corr, TiledBestMatch) else "dense",
        mean_max_corr_a=_mean_on(bm.max_corr_a, alive_a),
        mean_max_corr_b=_mean_on(bm.max_corr_b, alive_b),
        baseline_mean_max_corr_a=_mean_on(blm.max_corr_a, alive_a) if blm else None,
        baseline_mean_max_corr_b=_mean_on(blm.max_corr_b, alive_b) if blm else None,
        matched_fraction_a=mf_a,
        matched_fraction_b=mf_b,
        baseline_fraction_a=bf_a,
        baseline_fraction_b=bf_b,
        n_matched=int(ii.numel()),
        median_log_ratio=lr,
        predicted_ratio=pi,
        log_predicted_ratio=math.log(pi) if pi else None,
        universality=uni,
        verdict=S.site_verdict(premises, mf_a, bf_a, lr, pi, phi=th.phi, universality=uni),
    )


def _pair_arrays(
    key: str, bm: BestMatch, blm: BestMatch | None, p_a: torch.Tensor, p_b: torch.Tensor, arrays: Arrays
) -> None:
    arrays[f"max_corr/{key}/a"] = bm.max_corr_a.cpu().double()
    arrays[f"max_corr/{key}/b"] = bm.max_corr_b.cpu().double()
    if blm is not None:
        arrays[f"baseline_corr/{key}/a"] = blm.max_corr_a.cpu().double()
        arrays[f"baseline_corr/{key}/b"] = blm.max_corr_b.cpu().double()
    arrays[f"matched/{key}/p_a"] = p_a.double()
    arrays[f"matched/{key}/p_b"] = p_b.double()


def any_layer_rows(meas: Measurements, th: Thresholds) -> list[AnyLayerRow]:
    """For each site of A, the site of B its alive features match best on average."""
    out = []
    for i, s in enumerate(meas.a.sites):
        alive = s.stats.density.cpu() > th.density_floor
        scores, fracs = {}, {}
        for j, sb in enumerate(meas.b.sites):
            cc = meas.cross.get((i, j))
            if cc is None:
                continue
            mc = cc.best_match().max_corr_a.cpu()
            scores[sb.site] = _mean_on(mc, alive)
            fracs[sb.site] = _fraction_at(mc, alive, th.tau)
        if scores:
            best = max(scores, key=lambda k: -1.0 if scores[k] is None else scores[k])
            out.append(AnyLayerRow(s.site, best, scores, fracs[best]))
    return out


# ----------------------------------------------------------------------------- provenance and notes
def config_json(cfg: TestConfig, th: Thresholds) -> dict:
    """The run's config, with the thresholds of this analysis."""
    out = cfg.to_dict()
    out["thresholds"] = asdict(th)
    out["C"] = th.C
    return out


def library_row(meas: Measurements) -> LibraryRow:
    from .. import __version__

    return LibraryRow(
        supanalysis=__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        device=meas.device,
        backend=meas.backend or os.environ.get("SUPANALYSIS_BACKEND", "auto"),
    )


def notes(cfg: TestConfig, th: Thresholds) -> list[str]:
    return [
        "Features n_s are dictionary latents whose firing density exceeds the density floor "
        f"({th.density_floor:g}); a latent fires on a token when its code exceeds {cfg.activation_threshold:g}.",
        "σ = n_s / m_s per site; per model, σ = Σ_s n_s / Σ_s m_s (both neuron conventions are reported).",
        "Correlations are Pearson over the same tokens; the baseline correlates A with B's codes on "
        "randomly permuted tokens, so matches above it are more than chance.",
        "r = ln(p_B(j)/p_A(i)) over matched pairs (ρ* ≥ τ, both densities positive); its median has a "
        f"bootstrap CI ({cfg.bootstrap} resamples).",
        "π = g⁻¹(σ_B/C) / g⁻¹(σ_A/C) on the sparse branch of g(p) = −1/(p ln p); null where σ/C < e "
        "(no superposition pressure).",
        "Eval loss: mean next-token cross-entropy in nats over the eval tokens; P2 uses a paired bootstrap "
        "of the relative difference (B − A)/A.",
    ]
