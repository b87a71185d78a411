"""``supanalysis toy``: toy models of superposition (Elhage et al. 2022), reproduced with the library's ops.

Three published results are reproduced and checked, each with its expected and measured
numbers and a pass/fail (see docs/toy.md):

1. pentagon: n=5 features, m=2 dims, density 0.05 -> a regular pentagon (every D_i = 2/5,
   neighbouring angles 72°);
2. linear: without the ReLU, n=20, m=5, importance 0.7^i -> exactly the 5 most important
   features, at unit norm (the PCA solution);
3. sticky D*: n=200, m=20, uniform importance -> D* = m/‖W‖_F² is 1 at density 1 and
   sticks at 1/2 (antipodal pairs) as the density falls.

Then every op family runs on the pentagon models (interference, activation statistics,
co-activation, cross-seed correlation). Figures: D* against 1/p, the D_i scatter, the
pentagon in the plane, the linear model's norms. Nothing is downloaded; every number is
computed in the run. ``--planted`` adds the whole test on planted ground truth
(:mod:`supanalysis.planted`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .accumulators import ActivationStats, CoActivation, CrossCorrelation
from .durable import write_bytes, write_text
from .ops.interference import interference
from .report.figures import COLORS, DIM_REFERENCES, new_figure, png
from .report.markdown import md_table
from .toy import ToyConfig, ToyModels, adjacent_angles, forward, sample_features, train_toy_models

DENSITIES = (1.0, 0.3, 0.1, 0.05)  # the n=5, m=2 geometry sweep; 0.05 is the pentagon
PLATEAU = (2.5, 3.5)  # 1/p range where D* sits on the 1/2 plateau for n=200, m=20 (measured; docs/toy.md)
TOL_DIM, TOL_ANGLE, TOL_NORM, TOL_DSTAR = 0.02, 3.0, 0.05, 0.05


@dataclass(frozen=True)
class TourSize:
    """Training budgets of one flavour of the tour (--quick and the full run share every code path)."""

    pentagon_steps: int
    pentagon_seeds: int
    linear_steps: int
    sweep_inv_p: tuple[float, ...]  # the sparsity sweep, as 1/p
    sweep_steps: int
    sweep_batch: int
    sweep_lr: float
    sweep_seeds: int
    stream_tokens: int


FULL = TourSize(
    1500, 4, 1000, (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 7, 10, 15, 20, 30, 50, 100), 1500, 512, 1e-2, 2, 200_000
)
QUICK = TourSize(600, 4, 1000, (1, 1.5, 2, 2.5, 3, 3.5, 5, 10), 800, 256, 2e-2, 1, 20_000)


# ----------------------------------------------------------------------------- the reproductions
def pentagon_config(size: TourSize, seed: int) -> ToyConfig:
    return ToyConfig(5, 2, DENSITIES, steps=size.pentagon_steps, seeds=size.pentagon_seeds, seed=seed)


def linear_config(size: TourSize, seed: int) -> ToyConfig:
    # Dense inputs; a linear model's optimum does not depend on sparsity (it is PCA).
    return ToyConfig(20, 5, (1.0,), importance_decay=0.7, relu=False, steps=size.linear_steps, lr=3e-2, seed=seed)


def sweep_config(size: TourSize, seed: int) -> ToyConfig:
    return ToyConfig(
        200,
        20,
        tuple(1.0 / v for v in size.sweep_inv_p),
        steps=size.sweep_steps,
        batch=size.sweep_batch,
        lr=size.sweep_lr,
        seeds=size.sweep_seeds,
        seed=seed,
    )


def check_pentagon(models: ToyModels, i: int) -> dict:
    """Reproduction 1 on instance i: every D_i = 2/5 ± 0.02, neighbouring angles 72° ± 3°."""
    r = interference(models.directions(i))
    angles = adjacent_angles(models.directions(i))
    dim_err = float((r.dims - 0.4).abs().max())
    angle_err = float((angles - 72.0).abs().max())
    return {
        "density": models.densities[i],
        "dims": _r(r.dims),
        "angles_deg": _r(angles, 2),
        "norms": _r(r.norms),
        "max_dim_error": dim_err,
        "max_angle_error_deg": angle_err,
        "expected": "every D_i = 2/5 (±0.02), neighbouring angles 72° (±3°)",
        "pass": dim_err <= TOL_DIM and angle_err <= TOL_ANGLE,
    }


def check_linear(models: ToyModels, kept: int) -> dict:
    """Reproduction 2: the ``kept`` most important features at norm 1 ± 0.05, the others near 0."""
    norms = models.directions(0).norm(dim=1)
    top, rest = norms[:kept], norms[kept:]
    top_err = float((top - 1.0).abs().max())
    rest_max = float(rest.max()) if rest.numel() else 0.0
    return {
        "norms": _r(norms),
        "represented": [int(j) for j in (norms > 0.5).nonzero().flatten()],
        "max_top_norm_error": top_err,
        "max_other_norm": rest_max,
        "expected": f"features 0..{kept - 1} at norm 1 (±{TOL_NORM}), every other norm < {TOL_NORM}",
        "pass": top_err <= TOL_NORM and rest_max < TOL_NORM,
    }


def check_sticky(models: ToyModels) -> dict:
    """Reproduction 3: D* within 0.05 of 1 at density 1, and of 1/2 on the plateau (1/p in PLATEAU)."""
    inv = [1.0 / p for p in models.densities]
    d_star = [interference(models.directions(i)).d_star for i in range(len(inv))]
    dense = [d for v, d in zip(inv, d_star) if v == 1.0]
    plateau = [(v, d) for v, d in zip(inv, d_star) if PLATEAU[0] - 1e-9 <= v <= PLATEAU[1] + 1e-9]
    ok_dense = bool(dense) and all(abs(d - 1.0) <= TOL_DSTAR for d in dense)
    ok_plateau = bool(plateau) and all(abs(d - 0.5) <= TOL_DSTAR for _, d in plateau)
    return {
        "inv_p": inv,
        "d_star": [round(d, 4) for d in d_star],
        "d_star_at_density_1": dense[0] if dense else None,
        "plateau": [{"inv_p": v, "d_star": round(d, 4)} for v, d in plateau],
        "expected": f"D* = 1 (±{TOL_DSTAR}) at p = 1; D* = 1/2 (±{TOL_DSTAR}) for 1/p in [{PLATEAU[0]}, {PLATEAU[1]}]",
        "pass": ok_dense and ok_plateau,
    }


def _r(t: torch.Tensor, digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in t]


def _geometry(models: ToyModels, i: int) -> dict:
    r = interference(models.directions(i), topk=2)
    return {
        "density": models.densities[i],
        "loss": float(models.loss[i]),
        "norms": _r(r.norms),
        "dims": _r(r.dims),
        "sum_dims": r.sum_dims,
        "d_star": r.d_star,
        "max_abs_cos": _r(r.max_abs_cos),
        "represented_features": int((r.norms > 0.5).sum()),
    }


def _stream_ops(runs: list[ToyModels], tokens: int, seed: int, progress: bool) -> dict:
    """Universality between the two pentagon runs at the sparsest density: same inputs through
    both models, their reconstructions streamed through the accumulators."""
    i = len(DENSITIES) - 1
    g = torch.Generator().manual_seed(seed + 100)
    dens = torch.tensor([DENSITIES[i]])
    stats = ActivationStats(5, threshold=0.0)
    coact = CoActivation(5, threshold=0.0)
    corr = CrossCorrelation(5, 5)
    batch = 4096
    with torch.no_grad():
        for _ in tqdm(range(max(1, tokens // batch)), desc="streaming activations", unit="batch", disable=not progress):
            x = sample_features(batch, dens, 5, g)  # [B, 1, n]
            ya = forward(runs[0].W[i : i + 1], runs[0].b[i : i + 1], x)[:, 0]
            yb = forward(runs[1].W[i : i + 1], runs[1].b[i : i + 1], x)[:, 0]
            stats.update(ya)
            coact.update(ya)
            corr.update(ya, yb)
    bm = corr.best_match()
    return {
        "universality_at_density": DENSITIES[i],
        "tokens": stats.n_tokens,
        "density_seed_a": [round(float(v), 5) for v in stats.density],
        "mean_l0_seed_a": stats.mean_l0,
        "coactivation_counts_seed_a": coact.counts().tolist(),
        "best_match_a_to_b": {"max_corr": _r(bm.max_corr_a), "match": bm.match_a.tolist()},
        "matched_fraction_tau_0.9": bm.matched_fraction_a(0.9),
    }


def run_toy_tour(
    out_dir: str, quick: bool = False, seed: int = 0, progress: bool = True, planted: bool = False
) -> dict:
    """Train, measure, draw; write report.json, report.md and the figures to ``out_dir``; return the report."""
    t0 = time.time()
    size = QUICK if quick else FULL
    jobs = ["pentagon seed A", "pentagon seed B", "linear", "sparsity sweep"]
    bar = tqdm(jobs, desc="toy models", unit="run", disable=not progress)
    runs, timings = [], {}
    for s, name in zip((seed, seed + 1), jobs[:2]):
        bar.set_postfix_str(name)
        t = time.time()
        runs.append(train_toy_models(pentagon_config(size, s), progress=progress, desc=name))
        timings[name] = round(time.time() - t, 1)
        bar.update()
    bar.set_postfix_str("linear")
    t = time.time()
    linear = train_toy_models(linear_config(size, seed), progress=progress, desc="linear")
    timings["linear"] = round(time.time() - t, 1)
    bar.update()
    bar.set_postfix_str("sparsity sweep")
    t = time.time()
    sweep = train_toy_models(sweep_config(size, seed), progress=progress, desc="sparsity sweep (n=200, m=20)")
    timings["sparsity sweep"] = round(time.time() - t, 1)
    bar.update()
    bar.close()

    pent = len(DENSITIES) - 1
    sweep_rows = []
    for i in range(len(sweep.densities)):
        r = interference(sweep.directions(i))
        sweep_rows.append(
            {"inv_p": 1.0 / sweep.densities[i], "d_star": r.d_star, "dims": _r(r.dims), "norms": _r(r.norms)}
        )
    report = {
        "what": "toy models of superposition (Elhage et al. 2022), reproduced with supanalysis' ops",
        "quick": quick,
        "seed": seed,
        "steps": size.pentagon_steps,
        "reproductions": {
            "pentagon": check_pentagon(runs[0], pent) | {"other_seed": check_pentagon(runs[1], pent)["pass"]},
            "linear": check_linear(linear, 5),
            "sticky_d_star": check_sticky(sweep),
        },
        "geometry": {f"seed{seed + k}": [_geometry(m, i) for i in range(len(DENSITIES))] for k, m in enumerate(runs)},
        "sweep": {"n": 200, "m": 20, "seeds_per_point": size.sweep_seeds, "points": sweep_rows},
        **_stream_ops(runs, size.stream_tokens, seed, progress),
        "timings_s": timings,
    }
    report["figures"] = write_figures(out_dir, report, runs[0], linear)
    planted_md = None
    if planted:
        from .planted import planted_markdown, run_planted

        res = run_planted(os.path.join(out_dir, "planted"), quick=quick, seed=seed, progress=progress)
        report["planted"] = {"summary": res["summary"], "folder": "planted", "seconds": res["seconds"]}
        planted_md = planted_markdown(res, level=2)
    report["seconds"] = round(time.time() - t0, 1)
    write_text(os.path.join(out_dir, "report.md"), _markdown(report) + ("\n" + planted_md if planted_md else ""))
    write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2))  # last: the folder is complete
    return report


# ----------------------------------------------------------------------------- figures
def write_figures(out_dir: str, report: dict, pentagon: ToyModels, linear: ToyModels) -> dict[str, str]:
    """Draw the figures as PNGs into ``out_dir``; returns {name: file name}. Empty without matplotlib."""
    try:
        figs = {
            "d_star": _fig_d_star(report),
            "dims": _fig_dims(report),
            "pentagon": _fig_pentagon(pentagon),
            "linear": _fig_linear(report),
        }
    except ImportError:
        return {}
    for name, fig in figs.items():
        write_bytes(os.path.join(out_dir, f"{name}.png"), png(fig))
    return {name: f"{name}.png" for name in figs}


def _fig_d_star(report: dict):
    pts = report["sweep"]["points"]
    fig, (ax,) = new_figure(1, panel_w=6.4, panel_h=4.0)
    inv = [p["inv_p"] for p in pts]
    ax.axvspan(*PLATEAU, color="#fdd49e", alpha=0.4, label="1/2 plateau checked")
    for v, label in ((1.0, "1"), (0.5, "1/2")):
        ax.axhline(v, color="0.35", linestyle=":", linewidth=1)
        ax.text(inv[-1], v, f" {label}", va="bottom", ha="right", fontsize=8)
    ax.plot(inv, [p["d_star"] for p in pts], "o-", color=COLORS["A"], label="D* = m / ‖W‖²_F")
    ax.set_xscale("log")
    ax.set_xlabel("1 / feature density  (1/p)")
    ax.set_ylabel("dimensions per feature D*")
    ax.set_ylim(0, 1.1)
    sw = report["sweep"]
    ax.set_title(f"Sticky D*: n={sw['n']}, m={sw['m']}, uniform importance", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _fig_dims(report: dict):
    pts = report["sweep"]["points"]
    fig, (ax,) = new_figure(1, panel_w=6.4, panel_h=4.0)
    for v, label in DIM_REFERENCES:
        ax.axhline(v, color="0.35", linestyle=":", linewidth=0.9)
        ax.text(1.0, v, f"{label} ", va="center", ha="right", fontsize=7, transform=ax.get_yaxis_transform())
    for p in pts:
        dims = [d for d, n in zip(p["dims"], p["norms"]) if n > 0.1]  # unrepresented features have D ≈ 0
        ax.scatter([p["inv_p"]] * len(dims), dims, s=9, alpha=0.35, color=COLORS["B"], linewidths=0)
    ax.plot([p["inv_p"] for p in pts], [p["d_star"] for p in pts], "-", color=COLORS["A"], lw=1, label="D*")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("1 / feature density  (1/p)")
    ax.set_ylabel("feature dimensionality D_i")
    ax.set_title("D_i of every represented feature (‖W_i‖ > 0.1)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _fig_pentagon(models: ToyModels):
    n_inst = len(models.densities)
    fig, axes = new_figure(
        n_inst, ncols=n_inst, panel_w=3.2, panel_h=3.3,
        suptitle="n=5 features in m=2 dims: columns of W (pentagon at p = 0.05)",
    )  # fmt: skip
    for i, ax in enumerate(axes):
        W = models.directions(i)  # [n, 2]: column i of W is feature i's direction
        r = interference(W)
        lim = max(1.0, float(W.norm(dim=1).max())) * 1.15
        for j, (x, y) in enumerate(W.tolist()):
            ax.annotate("", xy=(x, y), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": f"C{j}", "lw": 1.8})
            ax.text(x * 1.08, y * 1.08, str(j), fontsize=8, ha="center", va="center", color=f"C{j}")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.6)
        ax.axvline(0, color="0.85", lw=0.6)
        ax.set_title(f"p = {models.densities[i]:g}: Σ D_i = {r.sum_dims:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _fig_linear(report: dict):
    lin = report["reproductions"]["linear"]
    fig, (ax,) = new_figure(1, panel_w=6.4, panel_h=3.2)
    norms = lin["norms"]
    ax.bar(range(len(norms)), norms, color=[COLORS["A"] if j < 5 else "#bbbbbb" for j in range(len(norms))])
    ax.axhline(1.0, color="0.35", linestyle=":", linewidth=1)
    ax.set_xlabel("feature i (importance 0.7^i)")
    ax.set_ylabel("‖W_i‖")
    ax.set_title("Linear model, n=20, m=5: exactly the 5 most important features", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- Markdown
def _ok(passed: bool) -> str:
    return "**pass**" if passed else "**FAIL**"


def _md_figure(r: dict, name: str, alt: str) -> list[str]:
    figs = r.get("figures", {})
    return [f"![{alt}]({figs[name]})", ""] if name in figs else []


def _md_reproductions(r: dict) -> list[str]:
    rep = r["reproductions"]
    p, lin, st = rep["pentagon"], rep["linear"], rep["sticky_d_star"]
    plateau = ", ".join(f"{q['d_star']:.3f} (1/p={q['inv_p']:g})" for q in st["plateau"])
    rows = [
        [
            "pentagon: n=5, m=2, p=0.05",
            p["expected"],
            f"D_i = {', '.join(f'{d:.3f}' for d in p['dims'])}; "
            f"angles {', '.join(f'{a:.1f}°' for a in p['angles_deg'])}",
            _ok(p["pass"]),
        ],
        [
            "linear: n=20, m=5, importance 0.7^i, no ReLU",
            lin["expected"],
            f"represented {lin['represented']}; max |‖W_i‖−1| over the top 5 = {lin['max_top_norm_error']:.3f}; "
            f"largest other norm {lin['max_other_norm']:.3f}",
            _ok(lin["pass"]),
        ],
        [
            "sticky D*: n=200, m=20, uniform importance",
            st["expected"],
            f"D*(p=1) = {st['d_star_at_density_1']:.3f}; plateau {plateau}",
            _ok(st["pass"]),
        ],
    ]
    headers = ["reproduction", "expected (Elhage et al.)", "measured", "result"]
    return ["## Reproductions", "", md_table(headers, rows), ""]


def _md_sweep(r: dict) -> list[str]:
    points = r["sweep"]["points"]
    return [
        "## D* against 1/p",
        "",
        "D* = m/‖W‖_F² is the mean number of hidden dimensions per learned feature. Dense features get one "
        "dimension each (D* = 1); as they get sparser, pairs of features share a dimension antipodally and D* "
        "*sticks* at 1/2 before falling further.",
        "",
        *_md_figure(r, "d_star", "D* against 1/p"),
        md_table(["1/p", *(f"{q['inv_p']:g}" for q in points)], [["D*", *(f"{q['d_star']:.3f}" for q in points)]]),
        "",
        "## D_i of each feature",
        "",
        "D_i = ‖W_i‖⁴ / Σ_j (W_i·W_j)²: the fraction of a dimension feature i gets. Features cluster at the "
        "dimensionalities of simple geometric configurations: 1 (own dimension), 3/4 (tetrahedron), "
        "2/3 (triangle), 1/2 (antipodal pair), 2/5 (pentagon), 3/8 (square antiprism).",
        "",
        *_md_figure(r, "dims", "D_i scatter against 1/p"),
    ]


def _md_pentagon(r: dict) -> list[str]:
    rows = [
        [
            seed,
            f"{g['density']}",
            f"{g['loss']:.4f}",
            f"{g['represented_features']}",
            f"{g['sum_dims']:.3f}",
            f"{g['d_star']:.3f}",
            ", ".join(f"{d:.2f}" for d in g["dims"]),
        ]
        for seed, geo in r["geometry"].items()
        for g in geo
    ]
    headers = ["seed", "density", "loss", "features kept", "Σ D_i", "D*", "D_i"]
    return [
        "## The pentagon",
        "",
        *_md_figure(r, "pentagon", "n=5 feature directions in the plane at four densities"),
        md_table(headers, rows),
        "",
    ]


def _md_universality(r: dict) -> list[str]:
    bm = r["best_match_a_to_b"]
    return [
        "## The linear model",
        "",
        *_md_figure(r, "linear", "norms of the linear model's features"),
        f"## Universality between the two seeds at density {r['universality_at_density']}",
        "",
        f"Best-match correlation of each output feature of seed A with seed B: {bm['max_corr']} "
        f"(partners {bm['match']});",
        f"matched fraction at τ = 0.9: {r['matched_fraction_tau_0.9']:.2f}.",
        f"Firing densities of seed A's outputs: {r['density_seed_a']}; mean L0 {r['mean_l0_seed_a']:.3f}.",
        "",
    ]


def _markdown(r: dict) -> str:
    """The tour's report.md: the three reproductions with pass/fail, then each figure with its numbers."""
    timings = ", ".join(f"{k} {v} s" for k, v in r["timings_s"].items())
    head = [
        "# supanalysis toy: toy models of superposition",
        "",
        f"{r['what']}. {'Quick run' if r['quick'] else 'Full run'}, seed {r['seed']}, {r['seconds']} s "
        f"(training: {timings}).",
        "",
    ]
    return "\n".join(head + _md_reproductions(r) + _md_sweep(r) + _md_pentagon(r) + _md_universality(r))
