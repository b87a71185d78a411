"""The quantities and decision rules of the superposition-versus-universality test.

Pure functions on numbers and tensors (no models): the compressed-sensing capacity
g(p) = −1/(p ln p) and its inverse on the sparse branch, the predicted density ratio π,
the bound's tightness C*, Kaplan's parameter count, bootstrap confidence intervals, the
three premises and the verdict. SCIENCE.md (shared with the project) is the specification.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

E = math.e
INV_E = 1.0 / math.e


# ----------------------------------------------------------------------------- capacity
def g(p: float) -> float:
    """Compressed-sensing capacity per neuron, g(p) = −1/(p ln p), for p in (0, 1).

    Minimum e at p = 1/e; decreasing and invertible on the sparse branch p < 1/e.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"g(p) needs 0 < p < 1, got {p}")
    return -1.0 / (p * math.log(p))


def g_inv(y: float) -> float | None:
    """The p < 1/e with g(p) = y, or None when y < e (no superposition pressure).

    Solved by bisection on log p (g is monotone there), to relative precision ~1e-15.
    """
    if not math.isfinite(y) or y < E:
        return None
    if y == E:
        return INV_E
    lo, hi = -745.0, -1.0  # log p; g(e^-1) = e, g(p) -> inf as p -> 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        p = math.exp(mid)
        if -1.0 / (p * mid) > y:  # g too large: p too small
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return math.exp(0.5 * (lo + hi))


def predicted_density(sigma: float, C: float) -> float | None:
    """p* = g⁻¹(σ / C): the density at which σ features per neuron saturate the bound."""
    if C <= 0:
        raise ValueError(f"the constant C must be positive, got {C}")
    return g_inv(sigma / C)


def predicted_ratio(sigma_a: float, sigma_b: float, C: float) -> float | None:
    """π = p*_B / p*_A, or None when either site has σ/C < e (no pressure to invert)."""
    pa, pb = predicted_density(sigma_a, C), predicted_density(sigma_b, C)
    if pa is None or pb is None:
        return None
    return pb / pa


def bound_tightness(sigma: float, median_p: float) -> float | None:
    """C* = σ / g(median p): the constant that would make the bound exact at this site."""
    if not 0.0 < median_p < 1.0:
        return None
    return sigma / g(median_p)


def kaplan_params(n_layers: int, d_model: int) -> int:
    """Kaplan et al.'s non-embedding parameter estimate N ≈ 12·L·d² (d_attn = d, d_ff = 4d)."""
    return 12 * n_layers * d_model * d_model


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Estimate:
    """`Estimate`: a point estimate with its bootstrap percentile confidence interval.

    value: the estimate
    lo: CI lower end
    hi: CI upper end
    n: sample size
    level: CI level
    """

    value: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}] (n={self.n}, {int(self.level * 100)}% CI)"


def bootstrap(
    values: torch.Tensor | Sequence[float],
    stat: Callable[[torch.Tensor], torch.Tensor] | str = "median",
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of ``stat`` over ``values`` (1-D), resampling in one batched draw.

    ``stat`` is "median", "mean" or a function mapping [B, n] -> [B]. Deterministic for a seed.
    With no values the estimate is NaN with an empty interval.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    fn = {"median": lambda t: t.median(dim=-1).values, "mean": lambda t: t.mean(dim=-1)}.get(stat, stat)  # type: ignore[arg-type]
    point = float(fn(v[None, :])[0])
    g_ = torch.Generator().manual_seed(seed)
    draws = []
    # Chunk the resamples so memory stays bounded for large n.
    chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = torch.randint(0, n, (b, n), generator=g_)
        draws.append(fn(v[idx]))
        done += b
    d = torch.cat(draws)
    a = (1.0 - level) / 2
    lo, hi = torch.quantile(d, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return Estimate(point, lo, hi, n, level)


def paired_relative_difference(
    loss_a: torch.Tensor, loss_b: torch.Tensor, *, n_boot: int = 2000, seed: int = 0
) -> Estimate:
    """(mean loss_B − mean loss_A) / mean loss_A over the same eval tokens, paired bootstrap."""
    a = torch.as_tensor(loss_a, dtype=torch.float64).flatten()
    b = torch.as_tensor(loss_b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"per-token losses must cover the same tokens, got {a.numel()} and {b.numel()}")
    pair = torch.stack([a, b], 1)
    n = pair.shape[0]
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    idx_all = torch.arange(n)

    def rel(idx: torch.Tensor) -> torch.Tensor:
        s = pair[idx]  # [B, n, 2]
        m = s.mean(dim=-2)
        return (m[..., 1] - m[..., 0]) / m[..., 0]

    point = float(rel(idx_all[None, :])[0])
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, min(n_boot, 2_000_000 // n))
    out, done = [], 0
    while done < n_boot:
        b_ = min(chunk, n_boot - done)
        out.append(rel(torch.randint(0, n, (b_, n), generator=gen)))
        done += b_
    d = torch.cat(out)
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Estimate(point, lo, hi, n)


# ----------------------------------------------------------------------------- premises
@dataclass(frozen=True)
class Premise:
    """`Premise`: one premise of the argument.

    name: which premise
    holds: whether it holds
    detail: why, in words
    numbers: the numbers that decided it
    """

    name: str
    holds: bool
    detail: str
    numbers: dict = field(default_factory=dict)


def premise_equal_params(n_a: int, n_b: int, tol: float = 0.05) -> Premise:
    """P1: |N_A − N_B| / max(N_A, N_B) ≤ tol."""
    rel = abs(n_a - n_b) / max(n_a, n_b, 1)
    ok = rel <= tol
    return Premise(
        "P1 equal parameters",
        ok,
        f"non-embedding parameters {n_a:,} vs {n_b:,}: relative difference {rel:.2%} {'≤' if ok else '>'} {tol:.0%}",
        {"N_a": n_a, "N_b": n_b, "relative_difference": rel, "tolerance": tol},
    )


def premise_equal_performance(diff: Estimate, tol: float = 0.03) -> Premise:
    """P2: the relative eval-loss difference's CI lies within ±tol."""
    ok = math.isfinite(diff.lo) and -tol <= diff.lo and diff.hi <= tol
    return Premise(
        "P2 equal performance",
        ok,
        f"relative eval cross-entropy difference (B−A)/A = {diff}; {'within' if ok else 'not within'} ±{tol:.0%}",
        {"relative_difference": asdict(diff), "tolerance": tol},
    )


def premise_different_neurons(m_a: int, m_b: int, M_a: int, M_b: int) -> Premise:
    """P3: the neuron counts differ, per site (m) and per model (M = Σ_s m_s)."""
    ok = m_a != m_b and M_a != M_b
    return Premise(
        "P3 different neuron counts",
        ok,
        f"per-site neurons {m_a} vs {m_b}; per-model neurons {M_a} vs {M_b}",
        {"m_a": m_a, "m_b": m_b, "M_a": M_a, "M_b": M_b},
    )


# ----------------------------------------------------------------------------- verdict
PREMISES_NOT_MET = "premises_not_met"
NON_UNIVERSAL = "non_universal_features"
CONTRADICTION = "contradiction"
SPARSITY_FOLLOWS = "sparsity_follows_prediction"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """`Verdict`: the outcome of one site pair, or overall.

    outcome: one of the verdict outcomes below
    reason: why, in words; starts with "uncalibrated: " when universality was judged by the absolute rule
    numbers: the numbers behind it
    calibrated: universality was judged against within-shape ceilings (every pair, for the overall verdict)
    universality: overall only: outcome (majority over the depth pairs), calibrated, U_min (the
        smallest U over pairs and sides, null without any) and reason; null for a pair's verdict
    """

    outcome: str
    reason: str
    numbers: dict = field(default_factory=dict)
    calibrated: bool = False
    universality: dict | None = None


UNCALIBRATED = "uncalibrated: "


def labelled(verdict: Verdict, calibrated: bool, dictionaries: Premise | None = None) -> Verdict:
    """The verdict marked with what it rests on: "uncalibrated: " first when universality was
    judged by the absolute rule, and the inadequate dictionaries when premise P4 fails (the
    verdict stands, so the universality numbers stay visible)."""
    reason = verdict.reason.removeprefix(UNCALIBRATED)
    numbers = dict(verdict.numbers)
    if dictionaries is not None and not dictionaries.holds:
        reason = f"resting on inadequate dictionaries ({dictionaries.name} fails: {dictionaries.detail}): {reason}"
        numbers["inadequate_dictionaries"] = True
    if not calibrated:
        reason = UNCALIBRATED + reason
    return replace(verdict, reason=reason, numbers=numbers, calibrated=calibrated)


def site_verdict(
    premises: Sequence[Premise],
    matched_fraction: float,
    baseline_fraction: float,
    log_ratio: Estimate,
    pi: float | None,
    *,
    phi: float = 0.5,
    universality=None,
) -> Verdict:
    """Apply SCIENCE.md's decision rules to one site pair.

    matched_fraction: fraction of features with best-match correlation ≥ τ;
    baseline_fraction: the same under the alignment-breaking baseline;
    log_ratio: median of r = ln(p_B(j)/p_A(i)) over matched pairs, with its CI;
    pi: predicted density ratio p*_B/p*_A (None when σ/C < e at a site);
    universality: the pair's :class:`~supanalysis.calibration.UniversalityDecision` (outcome,
    calibrated, reason), which then decides the universality step; None: the absolute φ rule.
    """
    nums = {
        "matched_fraction": matched_fraction,
        "baseline_fraction": baseline_fraction,
        "phi": phi,
        "median_log_ratio": asdict(log_ratio),
        "predicted_ratio": pi,
        "log_predicted_ratio": math.log(pi) if pi else None,
    }
    failed = [p for p in premises if not p.holds]
    if failed:
        return Verdict(PREMISES_NOT_MET, "; ".join(f"{p.name} fails: {p.detail}" for p in failed), nums)
    if universality is not None:
        nums["universality_calibrated"] = universality.calibrated
        if universality.outcome == NON_UNIVERSAL:
            return Verdict(NON_UNIVERSAL, f"{universality.reason}: the tension is resolved by non-universal features",
                           nums, universality.calibrated)  # fmt: skip
    elif matched_fraction < phi or matched_fraction <= baseline_fraction:
        why = (
            f"matched fraction {matched_fraction:.3f} < φ = {phi}"
            if matched_fraction < phi
            else f"matched fraction {matched_fraction:.3f} is no better than its baseline {baseline_fraction:.3f}"
        )
        return Verdict(NON_UNIVERSAL, f"{why}: the tension is resolved by non-universal features", nums)
    if log_ratio.n == 0 or not math.isfinite(log_ratio.lo):
        return Verdict(INCONCLUSIVE, "no matched pairs with positive density on both sides", nums)
    if pi is None:
        return Verdict(
            INCONCLUSIVE,
            "σ/C < e at a site: no superposition pressure, so the bound predicts no density change",
            nums,
        )
    lpi = math.log(pi)
    zero_in = log_ratio.contains(0.0)
    pi_in = log_ratio.contains(lpi)
    if zero_in and not pi_in:
        return Verdict(
            CONTRADICTION,
            f"matched features keep their sparsity (median ln ratio {log_ratio} contains 0) while the "
            f"predicted ln π = {lpi:.3f} lies outside it: features are shared but superposition degrees differ, "
            "so superposition within a layer cannot be the whole story",
            nums,
        )
    if pi_in and not zero_in:
        return Verdict(
            SPARSITY_FOLLOWS,
            f"matched features' ln density ratio {log_ratio} follows the predicted ln π = {lpi:.3f} and excludes 0: "
            "sparsity is model-dependent, universality in the strong sense fails",
            nums,
        )
    if zero_in and pi_in:
        return Verdict(
            INCONCLUSIVE, f"the CI {log_ratio} contains both 0 and ln π = {lpi:.3f}: too wide to decide", nums
        )
    return Verdict(
        INCONCLUSIVE,
        f"the CI {log_ratio} contains neither 0 nor ln π = {lpi:.3f}: densities change, but not as predicted",
        nums,
    )


def overall_verdict(site_verdicts: Sequence[Verdict]) -> Verdict:
    """Combine site-pair verdicts: unanimous outcomes carry over; otherwise report the tally."""
    if not site_verdicts:
        return Verdict(INCONCLUSIVE, "no site pairs were analysed")
    tally: dict[str, int] = {}
    for v in site_verdicts:
        tally[v.outcome] = tally.get(v.outcome, 0) + 1
    if len(tally) == 1:
        outcome = next(iter(tally))
        return Verdict(outcome, f"all {len(site_verdicts)} site pairs agree: {outcome}", {"tally": tally})
    top = max(tally.items(), key=lambda kv: kv[1])
    return Verdict(
        INCONCLUSIVE,
        f"site pairs disagree ({', '.join(f'{k}: {n}' for k, n in sorted(tally.items()))}); most common: {top[0]}",
        {"tally": tally},
    )
