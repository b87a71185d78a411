"""The family's analysis: matched fractions between every two models, the within-shape
ceilings, relative universality U, and the universality decision of each primary depth pair
(docs/science.md, "Calibration").

Every number is over one model's *alive* latents (density above the floor), the features of
the report; a dead latent has no best match and is left out (NaN) of every bootstrap.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .. import calibration as K
from .. import science as S
from ..config import TestConfig, Thresholds
from .measurements import FamilyMeasurement, Measurements, ModelMeasurement
from .rows import CeilingRow, FamilyModelRow, FamilyRow, MatrixRow, RelativeRow, UniversalityRow

UKey = tuple[int, int, int, int]  # (model x, model y, x's site, y's site): x's latents matched into y


@dataclass
class FamilyAnalysis:
    """The family's rows, and each U by (x, y, site of x, site of y) for the pair verdicts."""

    row: FamilyRow
    U: dict[UKey, S.Estimate]


class BestMatches:
    """Best-match correlations of one model's alive latents in another, by site pair (cached)."""

    def __init__(self, fm: FamilyMeasurement, th: Thresholds) -> None:
        self.fm, self.th = fm, th
        self._bm: dict[int, object] = {}

    def _best_match(self, matcher):
        key = id(matcher)
        if key not in self._bm:
            self._bm[key] = matcher.best_match()
        return self._bm[key]

    def site_pairs(self, x: int, y: int) -> list[tuple[int, int]]:
        """Depth-paired sites (x's, y's) of models x and y."""
        pairs = self.fm.cross.get((min(x, y), max(x, y)), {})
        return sorted(pairs) if x < y else sorted((j, i) for i, j in pairs)

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


def relative_rows(bms: BestMatches, cfg: TestConfig) -> tuple[list[RelativeRow], dict[UKey, S.Estimate]]:
    """U for every model x with a ceiling partner z, into every model y of another shape, per
    depth-paired site pair (i of x, j of y); the ceiling is x's site i matched into z's paired site."""
    fm, rows, found = bms.fm, [], {}
    for x in range(len(fm.models)):
        z = ceiling_partner(fm, x)
        if z is None:
            continue
        into_z = dict(bms.site_pairs(x, z))
        for y in (y for y in range(len(fm.models)) if fm.shapes[y] != fm.shapes[x]):
            for i, j in bms.site_pairs(x, y):
                if i not in into_z:
                    continue
                cross, ceiling = bms.best(x, y, i, j), bms.best(x, z, i, into_z[i])
                u = K.relative_universality(cross, ceiling, bms.th.tau, n_boot=cfg.bootstrap, seed=cfg.seed)
                found[(x, y, i, j)] = u
                rows.append(RelativeRow(
                    fm.labels[x], fm.labels[y], fm.labels[z], fm.models[x].sites[i].site, fm.models[y].sites[j].site,
                    u, bms.fraction(cross), bms.fraction(ceiling),
                ))  # fmt: skip
    return rows, found


def analyse_family(meas: Measurements, th: Thresholds) -> FamilyAnalysis | None:
    """The family's rows and Us (None for measurements made without a family)."""
    fm = meas.family
    if fm is None:
        return None
    bms = BestMatches(fm, th)
    rel, found = relative_rows(bms, meas.config)
    row = FamilyRow(model_rows(fm, meas.config), matrix(bms), ceilings(bms, meas.config), rel)
    return FamilyAnalysis(row, found)


def pair_universality(
    fam: FamilyAnalysis | None,
    primary: tuple[int, int],
    ij: tuple[int, int],
    fractions: tuple[float, float],
    baselines: tuple[float, float],
    phi: float,
) -> UniversalityRow:
    """The decision for the primary pair's depth pair ``ij``: calibrated when A's and B's
    latents both have a U (a ceiling on each side), else the absolute rule on A's side."""
    (ia, ib), (i, j) = primary, ij
    u_a = fam.U.get((ia, ib, i, j)) if fam else None
    u_b = fam.U.get((ib, ia, j, i)) if fam else None
    usable = all(u is not None and math.isfinite(u.hi) for u in (u_a, u_b))
    if usable:
        d = K.decide_universality({"a": fractions[0], "b": fractions[1]},
                                  {"a": baselines[0], "b": baselines[1]}, {"a": u_a, "b": u_b}, phi=phi)  # fmt: skip
    else:  # the absolute rule on A's latents, exactly as without a family
        d = K.decide_universality({"a": fractions[0]}, {"a": baselines[0]}, {"a": None}, phi=phi)
    return UniversalityRow(d.outcome, d.calibrated, d.reason, u_a, u_b)


def overall_universality(rows: list[UniversalityRow]) -> dict:
    """Majority over the primary pair's depth pairs (a tie: non-universal), and the smallest U."""
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
