"""``supanalysis toy``: every op family on toy models of superposition (Elhage et al. 2022).

The models train here in seconds and the right answers are known: at low feature density
five features share two dimensions as a regular pentagon (every D_i = 2/5), at density 1
the model keeps two orthogonal features (D = 1). Nothing is downloaded; every number in
the report is computed in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm.auto import tqdm

from .accumulators import ActivationStats, CoActivation, CrossCorrelation
from .ops.interference import interference
from .toy import ToyConfig, forward, sample_features, train_toy_models

DENSITIES = (1.0, 0.3, 0.1, 0.05)


def _geometry(models, i: int) -> dict:
    r = interference(models.directions(i), topk=2)
    return {
        "density": models.config.densities[i],
        "loss": float(models.loss[i]),
        "norms": [round(float(v), 4) for v in r.norms],
        "dims": [round(float(v), 4) for v in r.dims],
        "sum_dims": r.sum_dims,
        "d_star": r.d_star,
        "max_abs_cos": [round(float(v), 4) for v in r.max_abs_cos],
        "represented_features": int((r.norms > 0.5).sum()),
    }


def run_toy_tour(out_dir: str, quick: bool = False, seed: int = 0) -> dict:
    """Train, measure, write ``report.json`` and ``report.md`` to ``out_dir``; return the report."""
    t0 = time.time()
    steps = 300 if quick else 2000
    tokens = 20_000 if quick else 200_000
    runs = []
    for s in tqdm(range(2), desc="training toy models", unit="seed"):
        cfg = ToyConfig(n_features=5, n_hidden=2, densities=DENSITIES, steps=steps, seed=seed + s)
        runs.append(train_toy_models(cfg))
    geometry = [[_geometry(m, i) for i in range(len(DENSITIES))] for m in runs]

    # Universality between the two seeds at the sparsest density: same tokens through both
    # models, stream their reconstructions through the accumulators.
    i = len(DENSITIES) - 1
    g = torch.Generator().manual_seed(seed + 100)
    dens = torch.tensor([DENSITIES[i]])
    stats = ActivationStats(5, threshold=0.0)
    coact = CoActivation(5, threshold=0.0)
    corr = CrossCorrelation(5, 5)
    batch = 4096
    for _ in tqdm(range(tokens // batch), desc="streaming activations", unit="batch"):
        x = sample_features(batch, dens, 5, g)  # [B, 1, n]
        ya = forward(runs[0].W[i : i + 1], runs[0].b[i : i + 1], x)[:, 0]
        yb = forward(runs[1].W[i : i + 1], runs[1].b[i : i + 1], x)[:, 0]
        stats.update(ya)
        coact.update(ya)
        corr.update(ya, yb)
    bm = corr.best_match()
    report = {
        "what": "ops tour on toy models of superposition (n=5 features, m=2 dims), two seeds",
        "quick": quick,
        "seed": seed,
        "steps": steps,
        "geometry": {f"seed{seed + k}": geo for k, geo in enumerate(geometry)},
        "universality_at_density": DENSITIES[i],
        "tokens": stats.n_tokens,
        "density_seed_a": [round(float(v), 5) for v in stats.density],
        "mean_l0_seed_a": stats.mean_l0,
        "coactivation_counts_seed_a": coact.counts().tolist(),
        "best_match_a_to_b": {"max_corr": [round(float(v), 4) for v in bm.max_corr_a], "match": bm.match_a.tolist()},
        "matched_fraction_tau_0.9": bm.matched_fraction_a(0.9),
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = [
        "# supanalysis toy: toy models of superposition",
        "",
        f"{r['what']}; {r['steps']} training steps; {r['tokens']} streamed tokens; {r['seconds']} s.",
        "",
        "## Geometry of the learned feature directions (interference)",
        "",
        "Expected (Elhage et al.): density 1 keeps 2 orthogonal features (D = 1, others 0);",
        "low density packs all 5 as a regular pentagon (every D_i = 2/5, Σ D_i = m = 2).",
        "",
        "| seed | density | loss | features kept | Σ D_i | D* | D_i |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, geo in r["geometry"].items():
        for g in geo:
            lines.append(
                f"| {seed} | {g['density']} | {g['loss']:.4f} | {g['represented_features']} | "
                f"{g['sum_dims']:.3f} | {g['d_star']:.3f} | {', '.join(f'{d:.2f}' for d in g['dims'])} |"
            )
    lines += [
        "",
        f"## Universality between the two seeds at density {r['universality_at_density']}",
        "",
        "Best-match correlation of each output feature of seed A with seed B: "
        f"{r['best_match_a_to_b']['max_corr']} (partners {r['best_match_a_to_b']['match']});",
        f"matched fraction at τ = 0.9: {r['matched_fraction_tau_0.9']:.2f}.",
        f"Firing densities of seed A's outputs: {r['density_seed_a']}; mean L0 {r['mean_l0_seed_a']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def _cmd_toy(args: argparse.Namespace) -> int:
    report = run_toy_tour(args.out, quick=args.quick, seed=args.seed)
    print()
    for seed, geo in report["geometry"].items():
        sparse = geo[-1]
        dims = sparse["dims"]
        print(
            f"{seed}: density {sparse['density']}: D_i = {dims} (pentagon: 0.4 each); Σ D_i = {sparse['sum_dims']:.3f}"
        )
    print(f"matched fraction (τ=0.9) between seeds: {report['matched_fraction_tau_0.9']:.2f}")
    print(f"report: {os.path.join(args.out, 'report.md')} and report.json ({report['seconds']} s)")
    return 0


def add_toy_parser(sub) -> None:
    p = sub.add_parser("toy", help="toy models of superposition: every op on known geometry (pentagon)")
    p.add_argument("--quick", action="store_true", help="fewer steps and tokens (CI smoke, < 2 minutes)")
    p.add_argument("--out", default="supanalysis-out/toy", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy)
