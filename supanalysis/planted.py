"""The whole test on planted ground truth: does the pipeline recover what was put in?

Data: :mod:`supanalysis.planted_data` (sparse features with known firing probabilities
spanning decades, and the label of every position). Two TinyTransformers of equal
non-embedding parameters and aspect ratios 16x apart train on it; a TopK SAE is trained per
layer with the test's own :class:`~supanalysis.config.SAETraining` settings; then the full
:func:`~supanalysis.experiment.run_test` runs on the pair. Finally every planted feature is
looked up in every dictionary (the latent whose activation correlates best with the
feature's indicator, streamed through :class:`~supanalysis.accumulators.CrossCorrelation`
over the same statistics tokens the test used) and the test's numbers are held against the
truth:

- density: the test's measured density of that latent against the planted p_f;
- universality: every planted feature is shared by construction, so the test's matched
  fraction must stand well above its token-shuffled baseline, and the two models' latents
  of one planted feature should be matched to each other;
- density ratio: a planted feature has one density, so ln(p_B / p_A) of its latents is 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .accumulators import ActivationStats, CrossCorrelation
from .capture import ActivationSource
from .config import ModelSpec, SAETraining, TestConfig, Thresholds
from .data import TokenSequences
from .dictionary import load_dictionary, save_saelens
from .durable import write_text
from .experiment import TestReport, run_test
from .experiment.features import train_site_sae
from .experiment.plan import sequence_budget
from .models import TinyConfig, TinyTransformer
from .models.train import LMTrainConfig, train_language_model
from .planted_data import PlantedSpec, generate, indicators

#: relative density error below which the planted densities count as recovered
DENSITY_TARGET = 0.20
#: a dictionary *represents* a planted feature when some latent correlates this well with its
#: indicator. Stricter than the test's τ on purpose: a latent at ρ ≈ 0.5-0.8 is one that several
#: features share (merged), and its density is theirs together, not the feature's.
REPRESENTED_CORR = 0.9
#: matched fraction "well above" the shuffled baseline: by this much, and this many times over
MATCH_MARGIN, MATCH_RATIO = 0.25, 3.0


@dataclass(frozen=True)
class PlantedSize:
    """Sizes of one planted run (the full one and --quick share every code path)."""

    spec: PlantedSpec
    shape_a: tuple[int, int, int]  # (n_layers, d_model, n_heads)
    shape_b: tuple[int, int, int]
    lm_tokens: int  # training stream of the language models
    lm_steps: int
    sae: SAETraining
    eval_tokens: int
    stats_tokens: int
    match_tokens: int
    bootstrap: int
    sites_b: tuple[str, ...] | None = None  # None: every layer of B
    seq_len: int = 64


# Model A wide-shallow, B narrow-deep, 12·L·d² equal. Densities span 1.7 decades (quick) / 2 (full).
FULL = PlantedSize(
    PlantedSpec(n_features=16, p_min=5e-4, p_max=0.05, background=32), (2, 64, 4), (8, 32, 4),
    lm_tokens=2_000_000, lm_steps=1500, sae=SAETraining(expansion=4, k=4, tokens=400_000, batch_size=128, lr=1e-2),
    eval_tokens=20_000, stats_tokens=200_000, match_tokens=100_000, bootstrap=1000,
)  # fmt: skip
QUICK = PlantedSize(
    PlantedSpec(n_features=16, p_min=1e-3, p_max=0.05, background=32), (1, 32, 2), (4, 16, 2),
    lm_tokens=1_000_000, lm_steps=1000, sae=SAETraining(expansion=4, k=4, tokens=300_000, batch_size=128, lr=1e-2),
    eval_tokens=4_000, stats_tokens=60_000, match_tokens=30_000, bootstrap=200,
    sites_b=("resid_post.1", "resid_post.3"),
)  # fmt: skip


@dataclass
class PlantedRun:
    """What :func:`prepare_planted` built: the test config and the truth for its statistics slice."""

    config: TestConfig
    spec: PlantedSpec
    stats_labels: np.ndarray  # label per position of the statistics slice, in stream order
    stats_start: int  # first sequence of the statistics slice in the token file
    models: dict[str, TinyTransformer] = field(default_factory=dict)
    sae_summary: list[dict] = field(default_factory=list)
    lm_loss: dict[str, float] = field(default_factory=dict)


def prepare_planted(out: str, size: PlantedSize, seed: int = 0, progress: bool = True) -> PlantedRun:
    """Generate the data, train both models and their dictionaries, write ``config.json``."""
    spec, L = size.spec, size.seq_len
    # The test's token file is exactly eval | statistics (dictionaries are given, so the
    # test cuts no SAE-training slice); experiment.plan.plan_tokens's slicing is reproduced
    # here so the labels line up with the tokens the test measures.
    n_eval = sequence_budget(size.eval_tokens + size.eval_tokens // L, L)
    n_stats = sequence_budget(size.stats_tokens, L)
    test_len = (n_eval + n_stats) * L
    sae_len = size.sae.tokens + L
    tokens, labels = generate(spec, size.lm_tokens + sae_len + test_len, seed=seed)
    lm_tok = tokens[: size.lm_tokens]
    sae_tok = tokens[size.lm_tokens : size.lm_tokens + sae_len]
    test_tok, test_lab = tokens[-test_len:], labels[-test_len:]
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tokens_path = os.path.abspath(os.path.join(out, "data", "tokens.npy"))
    np.save(tokens_path, test_tok)
    np.save(os.path.join(out, "data", "labels.npy"), test_lab)

    run = PlantedRun(TestConfig(), spec, test_lab[n_eval * L :], n_eval)
    specs = []
    for label, (n_layers, d, heads) in (("A", size.shape_a), ("B", size.shape_b)):
        torch.manual_seed(seed + (0 if label == "A" else 1))
        model = TinyTransformer(
            TinyConfig(n_layers=n_layers, d_model=d, n_heads=heads, d_ff=4 * d, vocab_size=spec.vocab_size, n_ctx=L)
        )
        # A higher peak lr than the demo's: these models are tiny and the data simple.
        lm_cfg = LMTrainConfig(steps=size.lm_steps, batch_size=16, seq_len=L, lr=1e-2, warmup=20, seed=seed)
        losses = train_language_model(
            model, lm_tok, lm_cfg, progress=progress, desc=f"training model {label} (L={n_layers}, d={d})"
        )
        run.lm_loss[label] = float(np.mean(losses[-50:]))
        folder = os.path.join(out, "models", label)
        model.save(folder)
        run.models[label] = model
        sites = list(size.sites_b) if (label == "B" and size.sites_b) else [f"resid_post.{i}" for i in range(n_layers)]
        dict_dir = os.path.abspath(os.path.join(out, "saes", label))
        for site in sites:
            run.sae_summary.append(_train_dictionary(model, sae_tok, site, size, seed, dict_dir, label, progress))
        shape = "wide-shallow" if label == "A" else "narrow-deep"
        specs.append(
            ModelSpec(
                path=os.path.abspath(folder),
                name=f"{label}: {shape} (L={n_layers}, d={d})",
                sites=sites,
                dictionary=dict_dir,
            )
        )
    run.config = TestConfig(
        model_a=specs[0],
        model_b=specs[1],
        tokens=tokens_path,
        seq_len=L,
        batch_size=16,
        eval_tokens=size.eval_tokens,
        stats_tokens=size.stats_tokens,
        match_tokens=size.match_tokens,
        sae=size.sae,
        thresholds=Thresholds(),
        bootstrap=size.bootstrap,
        seed=seed,
        device="cpu",
    )
    write_text(os.path.join(out, "config.json"), json.dumps(run.config.to_dict(), indent=2))
    return run


def _train_dictionary(
    model: TinyTransformer,
    tokens: np.ndarray,
    site: str,
    size: PlantedSize,
    seed: int,
    folder: str,
    label: str,
    progress: bool,
) -> dict:
    """A TopK SAE on ``site`` exactly as the test trains one for dictionary="train" (SAETraining)."""
    seqs = TokenSequences(tokens, size.seq_len, 16)
    result = train_site_sae(model, seqs, site, model.config.d_model, size.sae, seed, progress=progress)
    save_saelens(result.dictionary, os.path.join(folder, site))
    return {
        "model": label,
        "site": site,
        "d_sae": result.dictionary.W_dec.shape[0],
        "fvu": result.fvu,
        "l0": result.l0,
        "dead_fraction": result.dead_fraction,
    }


# ----------------------------------------------------------------------------- the truth pass
@torch.no_grad()
def _best_latents(run: PlantedRun, label: str, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """For each planted feature: best latent, its correlation; plus the latents' densities here.

    Streams the same statistics tokens the test used (same slice, same order) through the
    model and the site's dictionary, correlating every latent with every planted indicator.
    """
    cfg = run.config
    spec = cfg.model_a if label == "A" else cfg.model_b
    model = run.models[label].eval()
    d = load_dictionary(os.path.join(spec.dictionary, site))
    tokens = np.load(cfg.tokens, mmap_mode="r")
    n_stats = sequence_budget(cfg.stats_tokens, cfg.seq_len)
    seqs = TokenSequences(tokens, cfg.seq_len, cfg.batch_size, start=run.stats_start, max_sequences=n_stats)
    F = run.spec.n_features
    cc = CrossCorrelation(d.W_dec.shape[0], F)
    stats = ActivationStats(d.W_dec.shape[0], cfg.activation_threshold)
    offset = 0
    for batch in ActivationSource(model, seqs, [site], max_tokens=cfg.stats_tokens, progress=False):
        x = batch[site].float()
        T = x.shape[0]
        codes = d.encode(x)
        ind = torch.from_numpy(indicators(run.stats_labels[offset : offset + T], F))
        cc.update(codes, ind)
        stats.update(codes)
        offset += T
    bm = cc.best_match()
    # best_match's "b" side is the indicators: for each planted feature, its best latent.
    return bm.match_b.cpu(), bm.max_corr_b.cpu(), stats.density.cpu(), offset


def _site_truth(run: PlantedRun, report: TestReport, label: str, site: str) -> tuple[dict, torch.Tensor]:
    """One site: the test's density of each planted feature's best latent against the truth.

    -> (the site's entry of planted.json, the best latent of each planted feature [F])"""
    spec, tau, p_true = run.spec, run.config.thresholds.tau, run.spec.densities
    latent, corr, dens_here, n = _best_latents(run, label, site)
    dens = report.arrays[f"density/{label}/{site}"].cpu()
    # Same tokens, same dictionary: the test's densities must equal this pass's.
    if not torch.allclose(dens.double(), dens_here.double(), atol=1e-9):
        raise RuntimeError(f"{label} {site}: the test measured other densities than the truth pass")
    labels = run.stats_labels[:n]
    realised = np.bincount(labels[labels >= 0], minlength=spec.n_features) / n
    measured = dens[latent].numpy()
    represented = corr.numpy() >= REPRESENTED_CORR
    at_tau = corr.numpy() >= tau
    rel = np.abs(measured / p_true - 1.0)
    rel_realised = np.abs(measured / np.maximum(realised, 1e-300) - 1.0)
    features = [
        {
            "feature": f,
            "p_planted": float(p_true[f]),
            "p_realised": float(realised[f]),
            "latent": int(latent[f]),
            "corr": round(float(corr[f]), 4),
            "represented": bool(represented[f]),
            "p_measured": float(measured[f]),
            "rel_error": float(rel[f]),
        }
        for f in range(spec.n_features)
    ]
    entry = {
        "model": label,
        "site": site,
        "tokens": n,
        "n_represented": int(represented.sum()),
        "median_rel_error": _median(rel[represented]),
        "median_rel_error_realised": _median(rel_realised[represented]),
        "n_at_tau": int(at_tau.sum()),
        "median_rel_error_at_tau": _median(rel[at_tau]),
        "features": features,
    }
    return entry, latent


def compare_with_truth(run: PlantedRun, report: TestReport) -> dict:
    """The test's numbers against the planted ones (see the module docstring)."""
    spec, tau = run.spec, run.config.thresholds.tau
    data = report.data
    sites = []
    best: dict[tuple[str, str], torch.Tensor] = {}
    for label in ("A", "B"):
        for row in data["sites"][label]:
            entry, best[(label, row["site"])] = _site_truth(run, report, label, row["site"])
            sites.append(entry)
    errors = np.array([f["rel_error"] for s in sites for f in s["features"] if f["represented"]])
    errors_tau = np.array([f["rel_error"] for s in sites for f in s["features"] if f["corr"] >= tau])
    pairs = [_pair_truth(p, best, report, tau, spec.n_features) for p in data["pairs"]]
    summary = {
        "density": {
            "target_median_rel_error": DENSITY_TARGET,
            "represented_corr": REPRESENTED_CORR,
            "represented": int(errors.size),
            "of": spec.n_features * len(sites),
            "median_rel_error": _median(errors),
            "quantiles_rel_error": _quantiles(errors),
            "pass": bool(errors.size) and _median(errors) < DENSITY_TARGET,
            # The same at the test's τ, where merged latents count too (reported, not targeted).
            "tau": tau,
            "at_tau": int(errors_tau.size),
            "median_rel_error_at_tau": _median(errors_tau),
            "quantiles_rel_error_at_tau": _quantiles(errors_tau),
        },
        "matching": {
            "pairs": pairs,
            "pass": bool(pairs) and all(p["well_above_baseline"] for p in pairs),
        },
    }
    return {"sites": sites, "summary": summary}


def _pair_truth(pair: dict, best: dict, report: TestReport, tau: float, F: int) -> dict:
    """One depth pair: matched fraction vs baseline, and what the test did with planted features."""
    sa, sb = pair["site_a"], pair["site_b"]
    la, lb = best[("A", sa)], best[("B", sb)]
    key = f"{sa}__{sb}"
    corr_a = report.arrays[f"max_corr/{key}/a"]
    meas = report.measurements
    i = next(k for k, s in enumerate(meas.a.sites) if s.site == sa)
    j = next(k for k, s in enumerate(meas.b.sites) if s.site == sb)
    bm = meas.cross[(i, j)].best_match()
    pa = report.arrays[f"density/A/{sa}"]
    pb = report.arrays[f"density/B/{sb}"]
    same, logr = 0, []
    for f in range(F):
        a, b = int(la[f]), int(lb[f])
        # The test matches planted feature f across the models when A's latent for f has
        # B's latent for f as its best match, above τ.
        if int(bm.match_a[a]) == b and float(corr_a[a]) >= tau:
            same += 1
            if pa[a] > 0 and pb[b] > 0:
                logr.append(math.log(float(pb[b]) / float(pa[a])))
    mf, bf = pair["matched_fraction_a"], pair["baseline_fraction_a"]
    return {
        "site_a": sa,
        "site_b": sb,
        "matched_fraction_a": mf,
        "baseline_fraction_a": bf,
        "matched_fraction_b": pair["matched_fraction_b"],
        "baseline_fraction_b": pair["baseline_fraction_b"],
        "well_above_baseline": mf - bf >= MATCH_MARGIN and mf >= MATCH_RATIO * bf,
        "planted_matched": same,
        "planted_features": F,
        "planted_median_log_ratio": _median(np.array(logr)) if logr else None,
        "test_median_log_ratio": pair["median_log_ratio"],
    }


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if np.size(x) else None


def _quantiles(x: np.ndarray) -> dict | None:
    if not np.size(x):
        return None
    q = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {k: float(v) for k, v in zip(("q10", "q25", "q50", "q75", "q90"), q)} | {"max": float(x.max())}


# ----------------------------------------------------------------------------- entry point
def run_planted(out_dir: str, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Build, test and compare with the truth; writes planted.json, planted.md and the test's
    report (report.json/md/html) into ``out_dir``; returns the planted.json dict."""
    t0 = time.time()
    size = QUICK if quick else FULL
    run = prepare_planted(out_dir, size, seed, progress)
    t_prep = time.time() - t0
    report = run_test(run.config, run.models["A"], run.models["B"], progress=progress)
    report.write(out_dir)
    truth = compare_with_truth(run, report)
    data = report.data
    result = {
        "what": "the superposition-versus-universality test on planted ground truth",
        "quick": quick,
        "seed": seed,
        "planted": asdict(run.spec) | {"p_f": run.spec.densities.tolist(), "vocab_size": run.spec.vocab_size},
        "models": {
            k: {
                "name": data["models"][k]["name"],
                "non_embedding_params": data["models"][k]["non_embedding_params"],
                "train_loss": run.lm_loss[k],
                "eval_loss": data["models"][k]["eval_loss"]["value"],
            }
            for k in ("A", "B")
        },
        "dictionaries": run.sae_summary,
        "verdict": data["verdict"]["outcome"],
        **truth,
        "seconds": {"prepare": round(t_prep, 1), "total": round(time.time() - t0, 1)},
    }
    write_text(os.path.join(out_dir, "planted.json"), json.dumps(result, indent=2))
    write_text(os.path.join(out_dir, "planted.md"), planted_markdown(result))
    return result


def planted_markdown(r: dict, level: int = 1) -> str:
    """The planted comparison as Markdown (``level``: heading level of its title)."""
    h = "#" * level
    s = r["summary"]
    d = s["density"]
    pl = r["planted"]
    lines = [
        f"{h} Planted ground truth: does the test recover what was put in?",
        "",
        f"{pl['n_features']} planted features fire with probabilities log-spaced from {pl['p_max']:g} down to "
        f"{pl['p_min']:g} over a Zipf background of {pl['background']} tokens (a feature writes its trigger "
        "token, then a fixed next token). Models: "
        + "; ".join(
            f"{m['name']}, {m['non_embedding_params']:,} non-embedding parameters, eval loss {m['eval_loss']:.3f}"
            for m in r["models"].values()
        )
        + f". Test verdict on the pair: `{r['verdict']}`.",
        "",
        f"{h}# Densities",
        "",
        "For each planted feature, the dictionary latent whose activation correlates best with the feature's "
        f"indicator; a feature is *represented* when that correlation reaches {d['represented_corr']} (a latent "
        "at lower correlation is shared by several features, and its density is theirs together). Measured "
        "density = the test's density of that latent.",
        "",
        f"- represented: {d['represented']} of {d['of']} (feature, site) pairs",
        f"- median relative error |p_measured / p_planted − 1| among them: {format_number(d['median_rel_error'])} "
        f"(target < {d['target_median_rel_error']:g}): **{'pass' if d['pass'] else 'FAIL'}**",
        f"- quantiles: {_fmt_q(d['quantiles_rel_error'])}",
        f"- at the test's τ = {d['tau']:g} instead ({d['at_tau']} pairs, merged latents included): median "
        f"{format_number(d['median_rel_error_at_tau'])}; quantiles {_fmt_q(d['quantiles_rel_error_at_tau'])}",
        "",
        "| model | site | represented | median rel. error (vs planted) | (vs realised) |",
        "|---|---|---|---|---|",
    ]
    for site in r["sites"]:
        lines.append(
            f"| {site['model']} | {site['site']} | {site['n_represented']}/{len(site['features'])} | "
            f"{format_number(site['median_rel_error'])} | {format_number(site['median_rel_error_realised'])} |"
        )
    lines += ["", "Per feature (first site of each model): planted p, measured p, best correlation.", ""]
    firsts = {}
    for site in r["sites"]:
        firsts.setdefault(site["model"], site)
    lines += [
        "| feature | p planted | " + " | ".join(f"{k} {v['site']}: p measured (ρ)" for k, v in firsts.items()) + " |",
        "|---|---|" + "---|" * len(firsts),
    ]
    for f in range(pl["n_features"]):
        cells = [f"{v['features'][f]['p_measured']:.2e} ({v['features'][f]['corr']:.2f})" for v in firsts.values()]
        lines.append(f"| {f} | {pl['p_f'][f]:.2e} | " + " | ".join(cells) + " |")
    lines += _universality_markdown(s["matching"], h)
    return "\n".join(lines)


def _universality_markdown(m: dict, h: str) -> list[str]:
    """The matching half of planted.md: matched fraction against baseline, per depth pair."""
    lines = [
        "",
        f"{h}# Universality",
        "",
        "Every planted feature is shared by construction. Matched fraction of A's alive latents (ρ* ≥ τ) against "
        "the token-shuffled baseline; planted features whose two latents the test matches to each other; and "
        "the ln density ratio of those (truth: 0).",
        "",
        "| site A | site B | matched | baseline | well above | planted matched | median ln ratio (planted) | "
        "test's median ln ratio [CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in m["pairs"]:
        t = p["test_median_log_ratio"] or {}
        lines.append(
            f"| {p['site_a']} | {p['site_b']} | {p['matched_fraction_a']:.2f} | {p['baseline_fraction_a']:.2f} | "
            f"{'yes' if p['well_above_baseline'] else 'no'} | {p['planted_matched']}/{p['planted_features']} | "
            f"{format_number(p['planted_median_log_ratio'])} | {format_number(t.get('value'))} "
            f"[{format_number(t.get('lo'))}, {format_number(t.get('hi'))}] |"
        )
    lines += [
        "",
        f"Matched fraction well above baseline (by ≥ {MATCH_MARGIN:g} and ≥ {MATCH_RATIO:g}×) at every depth pair: "
        f"**{'pass' if m['pass'] else 'FAIL'}**.",
        "",
    ]
    return lines


def format_number(x: float | None) -> str:
    """Three significant digits, or a dash for a missing number."""
    return "—" if x is None else f"{x:.3g}"


def _fmt_q(q: dict | None) -> str:
    return "—" if not q else ", ".join(f"{k} {v:.3g}" for k, v in q.items())
