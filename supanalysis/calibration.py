"""Universality judged against reproducibility (docs/science.md, "Calibration").

An absolute threshold on the matched fraction is not a test: two seeds of one architecture,
or two dictionaries trained on the same activations, already match well below one half at
small scale. So each cross-shape matched fraction is divided by its *ceiling*, the matched
fraction of a control measured on the same tokens with the same settings:

- within-shape ceiling: model X's features matched into another seed X' of the same shape;
- dictionary ceiling: a site's dictionary matched into one trained with another seed on the
  same activations.

U = cross / ceiling, with a bootstrap CI. Both fractions are over the features of one
dictionary (model X's features, matched into the other shape and into X'), so by default the
bootstrap resamples those features jointly (paired); fractions over different feature sets
are resampled independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .science import Estimate, Premise, bootstrap

UNIVERSAL = "universal_within_reproducibility"
NON_UNIVERSAL = "non_universal_features"

#: resampled (draw, feature) entries held at once; bounds the bootstrap's memory
_CHUNK_ENTRIES = 2_000_000


def _finite(best: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(best, dtype=torch.float64).flatten().cpu()
    return v[torch.isfinite(v)]


def matched_fraction(best: torch.Tensor, tau: float, *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Fraction of features whose best-match correlation is >= tau, with a bootstrap CI.

    best: (n_features,) best-match correlation per feature; NaN (a constant or dead feature,
    with no defined correlation) is left out.
    """
    v = _finite(best)
    return bootstrap((v >= tau).to(torch.float64), "mean", n_boot=n_boot, seed=seed)


def mean_best_match(best: torch.Tensor, *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean best-match correlation over features (NaN left out), with a bootstrap CI."""
    return bootstrap(_finite(best), "mean", n_boot=n_boot, seed=seed)


def dictionary_seed_ceiling(
    best: torch.Tensor, alive: torch.Tensor, tau: float, *, n_boot: int = 2000, seed: int = 0
) -> tuple[Estimate, Estimate]:
    """The dictionary-seed ceiling of one site: (fraction of the alive latents whose best match in
    a second dictionary, trained with another seed on the same activations, is >= tau; their mean
    best match), each with a bootstrap CI over those latents.

    best: (n,) each latent's best-match correlation in the second dictionary; alive: (n,) bool.
    Reported beside the dictionary's quality; not a denominator of U (the within-shape ceiling,
    two model seeds each with its own dictionary, already holds the dictionary's variability).
    """
    b = torch.as_tensor(best, dtype=torch.float64).flatten().cpu()
    v = torch.where(torch.as_tensor(alive, dtype=torch.bool).flatten().cpu(), b, math.nan)
    return matched_fraction(v, tau, n_boot=n_boot, seed=seed), mean_best_match(v, n_boot=n_boot, seed=seed)


def _ratio_draws(num: torch.Tensor, den: torch.Tensor, paired: bool, n_boot: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n_num, n_den = num.numel(), den.numel()
    chunk = max(1, min(n_boot, _CHUNK_ENTRIES // max(n_num + n_den, 1)))
    out, done = [], 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        i_num = torch.randint(0, n_num, (b, n_num), generator=gen)
        i_den = i_num if paired else torch.randint(0, n_den, (b, n_den), generator=gen)
        f_den = den[i_den].mean(-1)
        # A resample in which nothing of the ceiling matched has no ratio: it counts as +inf,
        # so it widens the CI upwards rather than vanishing from it.
        out.append(torch.where(f_den > 0, num[i_num].mean(-1) / f_den.clamp_min(1e-300), math.inf))
        done += b
    return torch.cat(out)


def relative_universality(
    cross_best: torch.Tensor,
    ceiling_best: torch.Tensor,
    tau: float,
    *,
    paired: bool | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """U = (fraction of ``cross_best`` >= tau) / (fraction of ``ceiling_best`` >= tau), bootstrap CI.

    cross_best: (n,) best-match correlations of one dictionary's features in the other shape;
    ceiling_best: (n,) or (n',) the same features' (or a control's) best matches in the ceiling
    pairing. ``paired`` (default: when both have the same length and the same NaN pattern)
    resamples the features of both jointly. The estimate is NaN when the ceiling matches
    nothing; its ``n`` is the number of features behind the numerator.
    """
    c = torch.as_tensor(cross_best, dtype=torch.float64).flatten().cpu()
    k = torch.as_tensor(ceiling_best, dtype=torch.float64).flatten().cpu()
    if paired is None:
        paired = c.shape == k.shape and bool((c.isfinite() == k.isfinite()).all())
    if paired:
        if c.shape != k.shape:
            raise ValueError(f"paired bootstrap needs one value per feature in both, got {c.numel()} and {k.numel()}")
        keep = c.isfinite() & k.isfinite()
        c, k = c[keep], k[keep]
    else:
        c, k = _finite(c), _finite(k)
    num, den = (c >= tau).to(torch.float64), (k >= tau).to(torch.float64)
    return ratio_of_means(num, den, paired=paired, n_boot=n_boot, level=level, seed=seed)


def ratio_of_means(
    num: torch.Tensor,
    den: torch.Tensor,
    *,
    paired: bool = True,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """mean(num) / mean(den) with a bootstrap CI; the estimate is NaN when den has no positive entry.

    num, den: (n,) and (n,) (paired: entry k of both belongs to one feature, resampled
    jointly) or (n') (independent); finite values only. U is this ratio for num = a feature's
    matched indicator in the other shape (or its mean over several models of that shape) and
    den = its matched indicator in the ceiling; its ``n`` is the number of entries of num.
    """
    num = torch.as_tensor(num, dtype=torch.float64).flatten().cpu()
    den = torch.as_tensor(den, dtype=torch.float64).flatten().cpu()
    if paired and num.shape != den.shape:
        raise ValueError(f"paired bootstrap needs one value per feature in both, got {num.numel()} and {den.numel()}")
    if num.numel() == 0 or den.numel() == 0 or not bool((den > 0).any()):
        return Estimate(math.nan, math.nan, math.nan, int(num.numel()), level)
    point = float(num.mean() / den.mean())
    draws = _ratio_draws(num, den, paired, n_boot, seed)
    a = (1.0 - level) / 2
    lo, hi = torch.quantile(draws, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return Estimate(point, lo, hi, int(num.numel()), level)


@dataclass(frozen=True)
class UniversalityDecision:
    """Whether a site pair's features are universal, and whether that judgement is calibrated."""

    outcome: str  # UNIVERSAL or NON_UNIVERSAL
    calibrated: bool
    reason: str


def _u_text(side: str, u: Estimate) -> str:
    return f"U_{side} = {u.value:.3f} [{u.lo:.3f}, {u.hi:.3f}]"


def decide_universality(
    fractions: dict[str, float],
    baselines: dict[str, float],
    relative: dict[str, Estimate | None],
    *,
    phi: float = 0.5,
    margin: float = 0.0,
) -> UniversalityDecision:
    """The universality rule of docs/science.md for one site pair.

    fractions / baselines: per side ("a": A's features matched into B, "b": B's into A) the
    cross-shape matched fraction and its alignment-breaking baseline; relative: per side the
    relative universality U against that side's ceiling, or None where no control exists.
    Calibrated when every side has a finite U: then non-universal iff some side's U has its
    upper CI bound below 1 − margin (the smallest shortfall that counts). Otherwise the
    absolute rule (fraction < phi, or no better than the baseline) decides, and the decision
    says it is uncalibrated.
    """
    sides = sorted(fractions)
    usable = {s: u for s, u in relative.items() if u is not None and math.isfinite(u.hi)}
    if sides and all(s in usable for s in sides):
        below = [s for s in sides if usable[s].hi < 1.0 - margin]
        texts = "; ".join(_u_text(s.upper(), usable[s]) for s in sides)
        line = "the ceiling" if margin == 0 else f"{1.0 - margin:g} of the ceiling"
        if below:
            why = f"{texts}: the cross-shape match is below {line} beyond the CI"
            return UniversalityDecision(NON_UNIVERSAL, True, why)
        return UniversalityDecision(UNIVERSAL, True, f"{texts}: the CI reaches {line}")
    weak = [s for s in sides if fractions[s] < phi or fractions[s] <= baselines.get(s, -math.inf)]
    texts = ", ".join(f"matched fraction {s.upper()} {fractions[s]:.3f}" for s in sides)
    note = "uncalibrated: no within-shape or dictionary ceiling was measured, so the absolute rule decides: "
    if weak:
        return UniversalityDecision(NON_UNIVERSAL, False, f"{note}{texts}; below φ = {phi} or its baseline")
    return UniversalityDecision(UNIVERSAL, False, f"{note}{texts}; at least φ = {phi}")


@dataclass(frozen=True)
class DictionaryQuality:
    """Held-out reconstruction and liveness of one site's dictionary."""

    label: str  # "<model> <site>"
    fvu: float | None  # None for a neuron basis (exact, nothing to reconstruct)
    dead_fraction: float


def premise_adequate_dictionaries(
    dictionaries: Sequence[DictionaryQuality], *, max_fvu: float = 0.1, max_dead: float = 0.1
) -> Premise:
    """P4: every dictionary's held-out FVU <= max_fvu and dead fraction <= max_dead."""
    bad = []
    for d in dictionaries:
        fvu_bad = d.fvu is not None and not (d.fvu <= max_fvu)
        if fvu_bad or not (d.dead_fraction <= max_dead):
            fvu = "exact" if d.fvu is None else f"{d.fvu:.3f}"
            bad.append(f"{d.label} (FVU {fvu}, dead {d.dead_fraction:.1%})")
    worst_fvu = max((d.fvu for d in dictionaries if d.fvu is not None), default=None)
    worst_dead = max((d.dead_fraction for d in dictionaries), default=None)
    limits = f"FVU ≤ {max_fvu}, dead ≤ {max_dead:.0%}"
    detail = f"{len(dictionaries) - len(bad)} of {len(dictionaries)} dictionaries within {limits}"
    if bad:
        detail += "; outside: " + ", ".join(bad)
    numbers = {"max_fvu": max_fvu, "max_dead": max_dead, "worst_fvu": worst_fvu, "worst_dead": worst_dead}
    return Premise("P4 adequate dictionaries", not bad, detail, numbers)
