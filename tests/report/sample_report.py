"""A synthetic report that follows docs/report-schema.md field by field, and arrays for every key."""

from __future__ import annotations

import math

import torch

from supanalysis import report as rep
from supanalysis import science

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = (
    "## Verdict",
    "## Premises",
    "## Models",
    "## Neuron-counting conventions",
    "## Sites",
    "## Site pairs",
    "## Any-layer matches",
    "## Notes",
)
# A site name with characters HTML must escape and array keys must sanitise.
ODD_SITE = "mlp<hidden>.1"


def estimate(value, lo, hi, n):
    return {"value": value, "lo": lo, "hi": hi, "n": n, "level": 0.95}


def _site(model, name, layer, n_layers, m, n_alive, median_p, pressure=True):
    sigma = n_alive / m
    g_med = -1.0 / (median_p * math.log(median_p))
    return {
        "model": model,
        "site": name,
        "layer": layer,
        "depth": (layer + 1) / n_layers,
        "m": m,
        "dictionary": "TopK SAE (k=16, 8x)",
        "n_latents": 8 * m,
        "n_alive": n_alive,
        "sigma": sigma,
        "median_density": median_p,
        "g_median": g_med,
        "C_star": sigma / g_med,
        "p_star": science.g_inv(sigma) if pressure else None,  # C = 1
        "pressure": pressure,
        "tokens": 100_000,
        "mean_l0": 16.0,
        "dims_sum": 0.9 * m,
        "d_star": 0.8,
        "mean_max_abs_cos": 0.31,
        "welch_bound": 0.05,
        "total_sq_cos": 1234.5,
        "fvu": 0.12,
    }


def _verdict(outcome, mf, bf, r, pi):
    return {
        "outcome": outcome,
        "reason": f"synthetic reason for {outcome}",
        "numbers": {
            "matched_fraction": mf,
            "baseline_fraction": bf,
            "phi": 0.5,
            "median_log_ratio": r,
            "predicted_ratio": pi,
            "log_predicted_ratio": math.log(pi) if pi else None,
        },
    }


def _pair(site_a, site_b, depth_a, depth_b, pi, outcome):
    r = estimate(0.02, -0.1, 0.15, 40)
    return {
        "site_a": site_a,
        "site_b": site_b,
        "depth_a": depth_a,
        "depth_b": depth_b,
        "tokens": 50_000,
        "mean_max_corr_a": 0.71,
        "mean_max_corr_b": 0.64,
        "baseline_mean_max_corr_a": 0.08,
        "baseline_mean_max_corr_b": 0.07,
        "matched_fraction_a": 0.62,
        "matched_fraction_b": 0.55,
        "baseline_fraction_a": 0.01,
        "baseline_fraction_b": 0.0,
        "n_matched": 40,
        "median_log_ratio": r,
        "predicted_ratio": pi,
        "log_predicted_ratio": math.log(pi) if pi else None,
        "verdict": _verdict(outcome, 0.62, 0.01, r, pi),
    }


def _premises() -> list[dict]:
    """P1-P3, all holding, with the numbers each is decided on."""
    return [
        {
            "name": "P1 equal parameters",
            "holds": True,
            "detail": "relative difference 1.2% ≤ 5%",
            "numbers": {"N_a": 98304, "N_b": 99500, "relative_difference": 0.012, "tolerance": 0.05},
        },
        {
            "name": "P2 equal performance",
            "holds": True,
            "detail": "within ±3%",
            "numbers": {"relative_difference": estimate(0.01, -0.005, 0.02, 20000), "tolerance": 0.03},
        },
        {
            "name": "P3 different neuron counts",
            "holds": True,
            "detail": "64 vs 48; 128 vs 192",
            "numbers": {"m_a": 64, "m_b": 48, "M_a": 128, "M_b": 192},
        },
    ]


def make_report() -> dict:
    """A schema-complete report: A has 2 sites (one with an odd name), B has 4; 2 pairs; 1 any-layer entry."""
    sites_a = [
        _site("A", "resid_post.0", 0, 2, 64, 400, 3e-3),
        _site("A", ODD_SITE, 1, 2, 64, 380, 5e-3),
    ]
    sites_b = [
        _site("B", f"resid_post.{i}", i, 4, 48, (60, 310, 330, 350)[i], (0.2, 4e-3, 2e-3, 1e-3)[i], pressure=i != 0)
        for i in range(4)
    ]
    return {
        "schema": rep.SCHEMA,
        "created": "2026-11-25T01:00:00Z",
        "library": {
            "supanalysis": "0.1.0",
            "torch": torch.__version__,
            "python": "3.11",
            "device": "cpu",
            "backend": "reference",
        },
        "config": {"seed": 0, "thresholds": {"tau": 0.5, "phi": 0.5, "density_floor": 1e-5, "C": 1.0}},
        "verdict": {
            "outcome": "contradiction",
            "reason": "all 2 site pairs agree: contradiction",
            "numbers": {"tally": {"contradiction": 2}},
        },
        "premises": _premises(),
        "models": {
            m: {
                "name": f"tiny-{m}",
                "source": "in-memory",
                "architecture": "TinyTransformer",
                "n_layers": L,
                "d_model": d,
                "d_ff": 4 * d,
                "n_heads": 4,
                "vocab_size": 512,
                "non_embedding_params": 12 * L * d * d + 17,
                "kaplan_params": 12 * L * d * d,
                "aspect_ratio": d / L,
                "eval_loss": estimate(3.21 + 0.01 * L, 3.19, 3.25, 20000),
            }
            for m, L, d in (("A", 2, 64), ("B", 4, 48))
        },
        "per_model": {
            "A": {"neurons_total": 128, "features_total": 780, "sigma_model": 780 / 128, "sigma_mean_site": 6.09},
            "B": {"neurons_total": 192, "features_total": 1260, "sigma_model": 1260 / 192, "sigma_mean_site": 6.56},
        },
        "sites": {"A": sites_a, "B": sites_b},
        "pairs": [
            _pair("resid_post.0", "resid_post.1", 0.5, 0.5, 1.7, "contradiction"),
            _pair(ODD_SITE, "resid_post.3", 1.0, 1.0, 1.4, "contradiction"),
        ],
        "any_layer": [
            {
                "site_a": "resid_post.0",
                "best_site_b": "resid_post.1",
                "mean_max_corr": {f"resid_post.{i}": 0.4 + 0.1 * (i == 1) for i in range(4)},
                "matched_fraction": 0.62,
            }
        ],
        "notes": ["densities use a floor of 1e-5", "baseline: B's tokens shuffled"],
    }


def make_arrays(report: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Arrays for every key of the schema: densities over ~6 decades (some dead), D_i in [0, 1], correlations."""
    g = torch.Generator().manual_seed(seed)
    arrays = {}
    for model in ("A", "B"):
        for s in report["sites"][model]:
            n, key = s["n_latents"], rep.sanitize(s["site"])
            dens = 10 ** (-6 * torch.rand(n, generator=g, dtype=torch.float64))
            dens[: n // 10] = 0.0  # dead latents
            arrays[f"density/{model}/{key}"] = dens
            arrays[f"dims/{model}/{key}"] = torch.rand(n, generator=g, dtype=torch.float64) ** 0.5
    for p in report["pairs"]:
        key = rep.pair_key(p["site_a"], p["site_b"])
        na = next(s["n_latents"] for s in report["sites"]["A"] if s["site"] == p["site_a"])
        nb = next(s["n_latents"] for s in report["sites"]["B"] if s["site"] == p["site_b"])
        for side, n in (("a", na), ("b", nb)):
            arrays[f"max_corr/{key}/{side}"] = torch.rand(n, generator=g, dtype=torch.float64) ** 0.5
            arrays[f"baseline_corr/{key}/{side}"] = 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
        pa = 10 ** (-1 - 3 * torch.rand(40, generator=g, dtype=torch.float64))
        arrays[f"matched/{key}/p_a"] = pa
        arrays[f"matched/{key}/p_b"] = pa * torch.exp(0.3 * torch.randn(40, generator=g, dtype=torch.float64))
    return arrays


FAMILY_SECTIONS = ("## Verdict", "## Premises", "## Models", "## Family", "## Sites", "## Site pairs")
# Shapes of the family: A and A' share one, B and B' the other; listed out of shape order on purpose.
FAMILY_MODELS = (
    ("A", "L2d64", "0", 2, 64),
    ("B", "L4d48", "0", 4, 48),
    ("A'", "L2d64", "1", 2, 64),
    ("B'", "L4d48", "1", 4, 48),
)


def _p4(holds: bool) -> dict:
    return {
        "name": "P4 adequate dictionaries",
        "holds": holds,
        "detail": "4 of 6 dictionaries within FVU ≤ 0.1, dead ≤ 10%" if holds else "outside: A resid_post.0",
        "numbers": {"max_fvu": 0.1, "max_dead": 0.1, "worst_fvu": 0.37 if not holds else 0.08, "worst_dead": 0.25},
    }


def _relative(model, into, ceiling, site, site_into, u, cross, ceiling_fraction):
    return {
        "model": model,
        "into": into,
        "ceiling_model": ceiling,
        "site": site,
        "site_into": site_into,
        "U": u,
        "cross_fraction": cross,
        "ceiling_fraction": ceiling_fraction,
    }


def make_family_report(calibrated: bool = True, p4_holds: bool = True) -> dict:
    """:func:`make_report` with a family of two shapes × two seeds, U on both sides of each pair,
    the calibrated (or uncalibrated) universality verdict and P4."""
    rep_ = make_report()
    models = [
        {"label": lab, "name": f"tiny-{lab}", "shape": sh, "seed": seed, "n_layers": L, "d_model": d,
         "non_embedding_params": 12 * L * d * d + 17, "aspect_ratio": d / L,
         "eval_loss": estimate(3.2 + 0.01 * L + 0.002 * int(seed), 3.18, 3.26, 20000)}
        for lab, sh, seed, L, d in FAMILY_MODELS
    ]  # fmt: skip
    # values[r][c]: row r's features matched in column c; same shape (A,A' / B,B') ≈ 0.8, across ≈ 0.3
    values = [[None, 0.31, 0.81, 0.29], [0.27, None, 0.26, 0.78], [0.79, 0.33, None, 0.30], [0.28, 0.77, 0.25, None]]
    ceilings = [
        {"shape": sh, "model_x": x, "model_y": y, "site_x": s, "site_y": s,
         "matched_fraction": estimate(0.8, 0.75, 0.85, 400), "mean_best_match": estimate(0.7, 0.68, 0.72, 400)}
        for sh, x, y, s in (("L2d64", "A", "A'", "resid_post.0"), ("L4d48", "B", "B'", "resid_post.1"))
    ]  # fmt: skip
    u_a, u_b = estimate(0.3875, 0.31, 0.46, 400), estimate(0.35, 0.28, 0.43, 330)
    relative = []
    for p in rep_["pairs"]:
        relative.append(_relative("A", "B", "A'", p["site_a"], p["site_b"], u_a, 0.31, 0.8))
        relative.append(_relative("B", "A", "B'", p["site_b"], p["site_a"], u_b, 0.27, 0.78))
        p["universality"] = {
            "outcome": "non_universal_features",
            "calibrated": calibrated,
            "reason": ("" if calibrated else "uncalibrated: ") + "U below 1 on both sides",
            "U_a": u_a if calibrated else None,
            "U_b": u_b if calibrated else None,
        }
    rep_["family"] = {
        "models": models,
        "matched_fraction_matrix": {"labels": [m[0] for m in FAMILY_MODELS], "values": values},
        "ceilings": ceilings if calibrated else [],
        "relative_universality": relative if calibrated else [],
    }
    reason = "2 of 2 depth pairs non-universal; smallest U = 0.350 [0.280, 0.430]"
    rep_["verdict"] = {
        "outcome": "non_universal_features",
        "reason": reason if calibrated else "uncalibrated: " + reason,
        "numbers": {"tally": {"non_universal_features": 2}},
        "calibrated": calibrated,
        "universality": {
            "outcome": "non_universal_features",
            "calibrated": calibrated,
            "U_min": u_b if calibrated else None,
            "reason": reason if calibrated else "uncalibrated: " + reason,
        },
    }
    rep_["premises"].append(_p4(p4_holds))
    return rep_
