"""The family's analysis: matched fractions between every two models, the within-shape
ceilings, relative universality U, and the universality decision of each primary depth pair
(docs/science.md, "Calibration").

Every number is over one model's *alive* latents (density above the floor), the features of
the report; a dead latent has no best match and is left out (NaN) of every bootstrap.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from .. import calibration as K
from .. import science as S
from ..config import TestConfig, Thresholds
from .measurements import FamilyMeasurement, Measurements, ModelMeasurement
from .plan import model_grid_sites, pair_by_depth
from .rows import CeilingRow, FamilyModelRow, FamilyRow, MatrixRow, PooledRow, RelativeRow, UniversalityRow

UKey = tuple[int, int, int, int]  # (model x, model y, x's site, y's site): x's latents matched into y


@dataclass
class FamilyAnalysis:
    """The family's rows, each U by (x, y, site of x, site of y) for the pair verdicts, and
    each shape's pooled U by (shape, other shape) for the overall verdict."""

    row: FamilyRow
    U: dict[UKey, S.Estimate]
    pooled: dict[tuple[str, str], PooledRow] = field(default_factory=dict)
    shapes: list[str] = field(default_factory=list)  # per model of the family


class BestMatches:
    """Best-match correlations of one model's alive latents in another, by site pair (cached)."""

    def __init__(self, fm: FamilyMeasurement, th: Thresholds) -> None:
        self.fm, self.th = fm, th
        self._bm: dict[int, object] = {}
        self.grid = model_grid_sites(fm.models)

    def _best_match(self, matcher):
        key = id(matcher)
        if key not in self._bm:
            self._bm[key] = matcher.best_match()
        return self._bm[key]

    def measured(self, x: int, y: int, i: int, j: int) -> bool:
        """Whether x's site i was correlated with y's site j."""
        pairs = self.fm.cross.get((min(x, y), max(x, y)), {})
        return ((i, j) if x < y else (j, i)) in pairs

    def site_pairs(self, x: int, y: int) -> list[tuple[int, int]]:
        """Depth-paired sites (x's, y's) of models x and y that were measured."""
        mx, my = self.fm.models[x], self.fm.models[y]
        depth = pair_by_depth([s.layer for s in mx.sites], mx.shape.n_layers,
                              [s.layer for s in my.sites], my.shape.n_layers)  # fmt: skip
        return [(i, j) for i, j in depth if self.measured(x, y, i, j)]

    def candidates(self, x: int, y: int, i: int, paired: int) -> list[int]:
        """The sites of y that x's site i is matched into: y's grid sites, where all of them
        were measured against i (else only ``paired``, its depth partner: measurements made
        without the grid)."""
        grid = self.grid[y]
        return list(grid) if all(self.measured(x, y, i, j) for j in grid) else [paired]

    def best_over(self, x: int, y: int, i: int, sites: list[int]) -> torch.Tensor:
        """Each alive latent of x's site i: its best correlation over y's ``sites`` (NaN when dead)."""
        return functools.reduce(torch.fmax, [self.best(x, y, i, j) for j in sites])

    def best(self, x: int, y: int, i: int, j: int) -> torch.Tensor:
        """(n_latents of x's site i,) float64: each latent's best correlation in y's site j, NaN when dead."""
        if x < y:
            bm = self._best_match(self.fm.cross[(x, y)][(i, j)])
            corr = bm.max_corr_a
        else:
            bm = self._best_match(self.fm.cross[(y, x)][(j, i)])
            corr = bm.max_corr_b
        alive = self.fm.models[x].sites[i].stats.density.cpu() > self.th.density_floor
        return torch.where(alive, corr.cpu().double(), math.nan)

    def fraction(self, best: torch.Tensor) -> float:
        """Fraction of the alive latents matched at τ (0 with none alive), as the pair rows count it."""
        alive = best.isfinite()
        return float((best[alive] >= self.th.tau).double().mean()) if bool(alive.any()) else 0.0


def model_rows(fm: FamilyMeasurement, cfg: TestConfig) -> list[FamilyModelRow]:
    def row(k: int, mm: ModelMeasurement) -> FamilyModelRow:
        sh = mm.shape
        loss = S.bootstrap(mm.losses, "mean", n_boot=cfg.bootstrap, seed=cfg.seed)
        return FamilyModelRow(fm.labels[k], mm.name, fm.shapes[k], fm.seeds[k], sh.n_layers, sh.d_model,
                              sh.non_embedding_params, sh.aspect_ratio, loss)  # fmt: skip

    return [row(k, mm) for k, mm in enumerate(fm.models)]


def matrix(bms: BestMatches) -> MatrixRow:
    """values[r][c]: r's latents matched into c, mean over their depth-paired site pairs."""
    n = len(bms.fm.models)
    values: list[list[float | None]] = [[None] * n for _ in range(n)]
    for r in range(n):
        for c in range(n):
            pairs = bms.site_pairs(r, c) if r != c else []
            if pairs:
                values[r][c] = sum(bms.fraction(bms.best(r, c, i, j)) for i, j in pairs) / len(pairs)
    return MatrixRow(list(bms.fm.labels), values)


def ceilings(bms: BestMatches, cfg: TestConfig) -> list[CeilingRow]:
    """Each two seeds x < y of one shape: x's latents matched into y, per depth-paired site pair."""
    fm, out = bms.fm, []
    for (x, y), _ in sorted(fm.cross.items()):
        if fm.shapes[x] != fm.shapes[y]:
            continue
        for i, j in bms.site_pairs(x, y):
            best = bms.best(x, y, i, j)
            out.append(CeilingRow(
                fm.shapes[x], fm.labels[x], fm.labels[y], fm.models[x].sites[i].site, fm.models[y].sites[j].site,
                K.matched_fraction(best, bms.th.tau, n_boot=cfg.bootstrap, seed=cfg.seed),
                K.mean_best_match(best, n_boot=cfg.bootstrap, seed=cfg.seed),
            ))  # fmt: skip
    return out


def ceiling_partner(fm: FamilyMeasurement, x: int) -> int | None:
    """The first other model of x's shape (config order), or None."""
    return next((z for z in range(len(fm.models)) if z != x and fm.shapes[z] == fm.shapes[x]), None)


@dataclass
class SiteMatches:
    """One compared site i of a model x: its latents' best matches in the ceiling seed and in
    each model of another shape (each over the grid sites; NaN where a latent is dead)."""

    x: int
    site: str
    ceiling: torch.Tensor
    cross: dict[int, torch.Tensor] = field(default_factory=dict)  # y -> best matches in y


def relative_rows(
    bms: BestMatches, cfg: TestConfig
) -> tuple[list[RelativeRow], dict[UKey, S.Estimate], list[SiteMatches]]:
    """U for every model x with a ceiling partner z, into every model y of another shape, per
    depth-paired site pair (i of x, j of y). x's site i is matched into y's grid sites (cross)
    and into z's grid sites (ceiling): the same number of candidate sites at the same depths on
    both sides, with no assumption about which depth of y holds a feature of x's depth.
    Also returns every compared site's matches, for the pooled Us."""
    fm, rows, found, by_site = bms.fm, [], {}, {}
    for x in range(len(fm.models)):
        z = ceiling_partner(fm, x)
        if z is None:
            continue
        into_z = dict(bms.site_pairs(x, z))
        for y in (y for y in range(len(fm.models)) if fm.shapes[y] != fm.shapes[x]):
            for i, j in bms.site_pairs(x, y):
                if i not in into_z:
                    continue
                sites_y, sites_z = bms.candidates(x, y, i, j), bms.candidates(x, z, i, into_z[i])
                cross, ceiling = bms.best_over(x, y, i, sites_y), bms.best_over(x, z, i, sites_z)
                u = K.relative_universality(cross, ceiling, bms.th.tau, n_boot=cfg.bootstrap, seed=cfg.seed)
                found[(x, y, i, j)] = u
                names_y = [fm.models[y].sites[k].site for k in sites_y]
                names_z = [fm.models[z].sites[k].site for k in sites_z]
                rows.append(RelativeRow(
                    fm.labels[x], fm.labels[y], fm.labels[z], fm.models[x].sites[i].site, fm.models[y].sites[j].site,
                    u, bms.fraction(cross), bms.fraction(ceiling), names_y, names_z,
                ))  # fmt: skip
                site = by_site.setdefault((x, i), SiteMatches(x, fm.models[x].sites[i].site, ceiling))
                site.cross[y] = cross
    return rows, found, list(by_site.values())


def pooled_rows(
    bms: BestMatches, cfg: TestConfig, sites: list[SiteMatches]
) -> tuple[list[PooledRow], dict[tuple[str, str], PooledRow]]:
    """U of each shape into each other shape over the whole family: every latent of every seed
    of the shape at every compared site, its numerator the fraction of the other shape's
    models it is matched in, its denominator whether it is matched in its own ceiling seed;
    one paired bootstrap over those latents (the overall verdict's U)."""
    fm, th = bms.fm, bms.th
    rows, found = [], {}
    for shape in dict.fromkeys(fm.shapes[s.x] for s in sites):
        for into in dict.fromkeys(fm.shapes):
            mine = [s for s in sites if fm.shapes[s.x] == shape and any(fm.shapes[y] == into for y in s.cross)]
            if into == shape or not mine:
                continue
            nums, dens, ys = [], [], set()
            for s in mine:
                cross = torch.stack([c for y, c in s.cross.items() if fm.shapes[y] == into])
                alive = s.ceiling.isfinite()
                nums.append((cross[:, alive] >= th.tau).double().mean(0))
                dens.append((s.ceiling[alive] >= th.tau).double())
                ys |= {y for y in s.cross if fm.shapes[y] == into}
            num, den = torch.cat(nums), torch.cat(dens)
            u = K.ratio_of_means(num, den, n_boot=cfg.bootstrap, seed=cfg.seed)
            xs = sorted({s.x for s in mine})
            row = PooledRow(
                shape, into, [fm.labels[x] for x in xs], [fm.labels[y] for y in sorted(ys)],
                [f"{fm.labels[s.x]} {s.site}" for s in mine], u,
                float(num.mean()) if num.numel() else 0.0, float(den.mean()) if den.numel() else 0.0,
            )  # fmt: skip
            found[(shape, into)] = row
            rows.append(row)
    return rows, found


def analyse_family(meas: Measurements, th: Thresholds) -> FamilyAnalysis | None:
    """The family's rows and Us (None for measurements made without a family)."""
    fm = meas.family
    if fm is None:
        return None
    bms = BestMatches(fm, th)
    rel, found, sites = relative_rows(bms, meas.config)
    pool_rows, pool_found = pooled_rows(bms, meas.config, sites)
    row = FamilyRow(model_rows(fm, meas.config), matrix(bms), ceilings(bms, meas.config), rel, pool_rows)
    return FamilyAnalysis(row, found, pool_found, list(fm.shapes))


def pair_universality(
    fam: FamilyAnalysis | None,
    primary: tuple[int, int],
    ij: tuple[int, int],
    fractions: tuple[float, float],
    baselines: tuple[float, float],
    phi: float,
    pooled: PooledDecision | None = None,
    margin: float = 0.0,
) -> UniversalityRow:
    """The decision for the primary pair's depth pair ``ij``: the pooled one when there is one
    (universality is decided for the model pair as a whole; the row keeps its own U_a, U_b),
    else calibrated when A's and B's latents both have a U here, else the absolute rule on A's side."""
    (ia, ib), (i, j) = primary, ij
    u_a = fam.U.get((ia, ib, i, j)) if fam else None
    u_b = fam.U.get((ib, ia, j, i)) if fam else None
    usable = all(u is not None and math.isfinite(u.hi) for u in (u_a, u_b))
    if pooled is not None:
        d = pooled.decision
    elif usable:
        d = K.decide_universality({"a": fractions[0], "b": fractions[1]},
                                  {"a": baselines[0], "b": baselines[1]}, {"a": u_a, "b": u_b}, phi=phi,
                                  margin=margin)  # fmt: skip
    else:  # the absolute rule on A's latents, exactly as without a family
        d = K.decide_universality({"a": fractions[0]}, {"a": baselines[0]}, {"a": None}, phi=phi)
    return UniversalityRow(d.outcome, d.calibrated, d.reason, u_a, u_b)


@dataclass(frozen=True)
class PooledDecision:
    """The universality decision of the primary pair as a whole, and its smaller pooled U."""

    decision: K.UniversalityDecision
    U_min: S.Estimate


def pooled_universality(
    fam: FamilyAnalysis | None, primary: tuple[int, int], margin: float = 0.0
) -> PooledDecision | None:
    """The decision from the primary pair's shapes' pooled Us (A's shape into B's, B's into A's):
    non-universal iff either's CI lies below 1 − margin; None unless both exist with a finite
    CI (then each depth pair decides on its own, and the majority overall)."""
    if fam is None:
        return None
    sa, sb = (fam.shapes[k] for k in primary)
    rows = {"a": fam.pooled.get((sa, sb)), "b": fam.pooled.get((sb, sa))}
    if any(r is None or not math.isfinite(r.U.hi) for r in rows.values()):
        return None
    d = K.decide_universality({s: r.cross_fraction for s, r in rows.items()}, {},
                              {s: r.U for s, r in rows.items()}, margin=margin)  # fmt: skip
    who = {s: f"{', '.join(r.models)} into {', '.join(r.into_models)}" for s, r in rows.items()}
    reason = f"pooled over every seed and compared site (A: {who['a']}; B: {who['b']}): {d.reason}"
    u_min = min((r.U for r in rows.values()), key=lambda u: u.value)
    return PooledDecision(K.UniversalityDecision(d.outcome, d.calibrated, reason), u_min)


def overall_universality(rows: list[UniversalityRow], pooled: PooledDecision | None = None) -> dict:
    """The pooled decision when there is one (:func:`pooled_universality`); else the majority
    over the primary pair's depth pairs (a tie: non-universal), and the smallest U."""
    if pooled is not None:
        d = pooled.decision
        return {"outcome": d.outcome, "calibrated": d.calibrated, "U_min": asdict(pooled.U_min), "reason": d.reason}
    if not rows:
        return {"outcome": K.NON_UNIVERSAL, "calibrated": False, "U_min": None, "reason": "no site pairs"}
    tally = Counter(r.outcome for r in rows)
    outcome = K.UNIVERSAL if tally[K.UNIVERSAL] > tally[K.NON_UNIVERSAL] else K.NON_UNIVERSAL
    calibrated = all(r.calibrated for r in rows)
    us = [u for r in rows for u in (r.U_a, r.U_b) if u is not None and math.isfinite(u.value)]
    u_min = min(us, key=lambda u: u.value) if us else None
    reason = f"{tally[K.NON_UNIVERSAL]} of {len(rows)} depth pairs non-universal"
    if u_min is not None:
        reason += f"; smallest U = {u_min.value:.3f} [{u_min.lo:.3f}, {u_min.hi:.3f}]"
    if not calibrated:
        n_cal = sum(r.calibrated for r in rows)
        reason = f"{S.UNCALIBRATED}{reason}; {n_cal} of {len(rows)} judged against a within-shape ceiling"
    return {"outcome": outcome, "calibrated": calibrated, "U_min": asdict(u_min) if u_min else None, "reason": reason}
