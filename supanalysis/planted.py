"""The whole test on planted ground truth: does the pipeline recover what was put in?

Data: :mod:`supanalysis.planted_data`, in one of two planting modes. A run is a family of four
TinyTransformers of equal non-embedding parameters, two shapes 16x apart in aspect ratio, two
seeds each (A0, A1 train on family A's stream, B0, B1 on family B's), a TopK SAE per site
trained with the test's own :class:`~supanalysis.config.SAETraining`, and one
:func:`~supanalysis.experiment.run_test` on ``[A0, B0, A1, B1]`` (primary pair A0/B0; the
second seeds give the within-shape ceilings). Then every planted feature is looked up in the
primary pair's dictionaries (best-correlated latent over the test's statistics tokens) and
held against the truth: its density against p_f; which planted features the test matched
across the models (none whose context B lacks should be); ln(p_B / p_A) of those against 0.
:mod:`supanalysis.commands.planted` judges the verdict's universality against the mode.
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
from .calibration import dictionary_seed_ceiling
from .capture import ActivationSource
from .config import ModelSpec, TestConfig, Thresholds
from .data import TokenSequences
from .dictionary import load_dictionary, save_saelens
from .durable import with_checksum, write_text
from .experiment import TestReport, run_test
from .experiment.features import SEED_CEILING_OFFSET, encode, seed_best_match, train_site_sae
from .experiment.plan import sequence_budget
from .models import TinyConfig, TinyTransformer
from .models import load as load_model
from .models.train import LMTrainConfig, train_language_model
from .planted_data import FAMILY, FULL, PRIMARY, QUICK, PlantedSize, PlantedSpec, family_streams, indicators
from .planted_markdown import MATCH_MARGIN, MATCH_RATIO, planted_markdown

#: relative density error below which the planted densities count as recovered
DENSITY_TARGET = 0.20
#: a dictionary *represents* a planted feature when some latent correlates this well with its
#: indicator. Stricter than the test's τ on purpose: a latent at ρ ≈ 0.5-0.8 is one that several
#: features share (merged), and its density is theirs together, not the feature's.
REPRESENTED_CORR = 0.9


@dataclass
class PlantedRun:
    """What :func:`prepare_planted` built: the test config, the truth for its statistics slice,
    and per family label ("A0", "B0", "A1", "B1") the model, its spec and its training loss."""

    config: TestConfig
    spec: PlantedSpec
    mode: str
    absent: tuple[int, ...]  # features whose context family B never saw in training
    stats_labels: np.ndarray  # label per position of the statistics slice, in stream order
    stats_start: int  # first sequence of the statistics slice in the token file
    models: dict[str, TinyTransformer] = field(default_factory=dict)
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    sae_summary: list[dict] = field(default_factory=list)
    lm_loss: dict[str, float] = field(default_factory=dict)


def eval_sequences(size: PlantedSize) -> int:
    """Sequences of the test's eval slice, as experiment.plan.plan_tokens cuts it."""
    return sequence_budget(size.eval_tokens + size.eval_tokens // size.seq_len, size.seq_len)


def prepare_planted(
    out: str,
    size: PlantedSize,
    seed: int = 0,
    mode: str = "universal",
    progress: bool = True,
    shared: PlantedRun | None = None,
) -> PlantedRun:
    """Generate the data, train the family and its dictionaries, write ``config.json``.

    shared: a run at the same size and seed whose family-A models (and dictionaries) are
    reused: A's stream does not depend on the mode, so retraining them would repeat the work.
    """
    spec, L = size.spec, size.seq_len
    # The test's token file is exactly eval | statistics (dictionaries are given, so the
    # test cuts no SAE-training slice); experiment.plan.plan_tokens's slicing is reproduced
    # here so the labels line up with the tokens the test measures.
    n_eval = eval_sequences(size)
    n_stats = sequence_budget(size.stats_tokens, L)
    streams = family_streams(spec, mode, size.lm_tokens + size.sae.tokens + L, (n_eval + n_stats) * L, seed)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tokens_path = os.path.abspath(os.path.join(out, "data", "tokens.npy"))
    np.save(tokens_path, streams.test)
    np.save(os.path.join(out, "data", "labels.npy"), streams.test_labels)
    run = PlantedRun(TestConfig(), spec, mode, streams.absent, streams.test_labels[n_eval * L :], n_eval)
    for i, (shape, s) in enumerate(FAMILY):
        label = shape + s
        if shape == "A" and shared is not None:
            run.models[label], run.specs[label] = shared.models[label], shared.specs[label]
            run.lm_loss[label] = shared.lm_loss[label]
            run.sae_summary += [d for d in shared.sae_summary if d["model"] == label]
            continue
        train = streams.train_a if shape == "A" else streams.train_b
        _build_model(run, out, size, train, label, seed + i, progress)
    run.config = TestConfig(
        models=[run.specs[shape + s] for shape, s in FAMILY],
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


def _build_model(
    run: PlantedRun, out: str, size: PlantedSize, train: np.ndarray, label: str, seed: int, progress: bool
) -> None:
    """Train one family member on ``train`` (LM stream | SAE stream) and its dictionaries."""
    shape, L = label[0], size.seq_len
    n_layers, d, heads = size.shape_a if shape == "A" else size.shape_b
    torch.manual_seed(seed)
    model = TinyTransformer(
        TinyConfig(n_layers=n_layers, d_model=d, n_heads=heads, d_ff=4 * d, vocab_size=run.spec.vocab_size, n_ctx=L)
    )
    # A higher peak lr than the demo's: these models are tiny and the data simple.
    lm_cfg = LMTrainConfig(steps=size.lm_steps, batch_size=16, seq_len=L, lr=1e-2, warmup=20, seed=seed)
    losses = train_language_model(
        model, train[: size.lm_tokens], lm_cfg, progress=progress, desc=f"training {label} (L={n_layers}, d={d})"
    )
    run.lm_loss[label] = float(np.mean(losses[-50:]))
    folder = os.path.abspath(os.path.join(out, "models", label))
    model.save(folder)
    run.models[label] = model.eval()
    sites = list(size.sites_b) if (shape == "B" and size.sites_b) else [f"resid_post.{i}" for i in range(n_layers)]
    dict_dir = os.path.abspath(os.path.join(out, "saes", label))
    # A TopK SAE per site exactly as the test trains one for dictionary="train" (SAETraining).
    sae_seqs = TokenSequences(train[size.lm_tokens :], L, 16)
    for site in sites:
        sae = train_site_sae(model, sae_seqs, site, d, size.sae, seed, progress=progress)
        save_saelens(sae.dictionary, os.path.join(dict_dir, site))
        summary = {"model": label, "site": site, "d_sae": sae.dictionary.W_dec.shape[0], "fvu": sae.fvu}
        summary |= {"l0": sae.l0, "dead_fraction": sae.dead_fraction}
        if label in PRIMARY:
            summary |= _seed_ceiling(model, sae.dictionary, sae_seqs, site, d, size, seed, out)
        run.sae_summary.append(summary)
    kind = "wide-shallow" if shape == "A" else "narrow-deep"
    run.specs[label] = ModelSpec(
        path=folder,
        name=f"{label}: {kind} (L={n_layers}, d={d})",
        sites=sites,
        dictionary=dict_dir,
        shape=shape,
        seed=label[1:],
    )


def _seed_ceiling(model, first, sae_seqs, site: str, d: int, size: PlantedSize, seed: int, out: str) -> dict:
    """The dictionary-seed ceiling of a primary-pair site: a second SAE on the same activations
    (another seed), both encoding the test's first ``match_tokens`` tokens; the fraction of the
    first's live latents whose best match in the second reaches τ, and their mean best match."""
    second = train_site_sae(model, sae_seqs, site, d, size.sae, seed + SEED_CEILING_OFFSET).dictionary
    test = np.load(os.path.join(out, "data", "tokens.npy"), mmap_mode="r")
    held = TokenSequences(test, size.seq_len, 16, max_sequences=max(1, size.match_tokens // size.seq_len))
    batches = [b[site].float() for b in ActivationSource(model, held, [site], progress=False)]
    best = seed_best_match(first, second, batches)
    fired = torch.zeros(first.W_dec.shape[0], dtype=torch.bool)
    for x in batches:
        idx, val = encode(first, x)
        fired[idx[val > 0].unique()] = True
    frac, corr = dictionary_seed_ceiling(best, fired, Thresholds().tau, n_boot=size.bootstrap, seed=seed)
    return {"seed_ceiling": asdict(frac), "seed_ceiling_mean_corr": asdict(corr)}


# ----------------------------------------------------------------------------- the truth pass
@dataclass
class _TruthPass:
    """Per (label, site): each planted feature's best latent [F], its correlation [F], the
    latents' densities [n]; per depth pair (site_a, site_b): the latents' best match both ways."""

    best: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    cross: dict[tuple[str, str], object]
    tokens: int


@torch.no_grad()
def _truth_pass(run: PlantedRun, sites: dict[str, list[str]], pairs: list[tuple[str, str]]) -> _TruthPass:
    """Stream the statistics tokens the test used (same slice, same order) through the primary
    pair and its dictionaries: every latent against every planted indicator, and A0's latents
    against B0's at each depth pair."""
    cfg, F = run.config, run.spec.n_features
    tokens = np.load(cfg.tokens, mmap_mode="r")
    n_stats = sequence_budget(cfg.stats_tokens, cfg.seq_len)
    dicts, sources = {}, []
    for label in PRIMARY:
        for site in sites[label]:
            dicts[(label, site)] = load_dictionary(os.path.join(run.specs[label].dictionary, site))
        seqs = TokenSequences(tokens, cfg.seq_len, cfg.batch_size, start=run.stats_start, max_sequences=n_stats)
        model = run.models[label]
        sources.append(ActivationSource(model, seqs, sites[label], max_tokens=cfg.stats_tokens, progress=False))
    width = {k: d.W_dec.shape[0] for k, d in dicts.items()}
    ind_cc = {k: CrossCorrelation(n, F) for k, n in width.items()}
    stats = {k: ActivationStats(n, cfg.activation_threshold) for k, n in width.items()}
    cross = {(sa, sb): CrossCorrelation(width[("A0", sa)], width[("B0", sb)]) for sa, sb in pairs}
    offset = 0
    for batches in zip(*sources):
        codes = {(lab, s): dicts[(lab, s)].encode(b[s].float()) for lab, b in zip(PRIMARY, batches) for s in b}
        T = next(iter(codes.values())).shape[0]
        ind = torch.from_numpy(indicators(run.stats_labels[offset : offset + T], F))
        for k, c in codes.items():
            ind_cc[k].update(c, ind)
            stats[k].update(c)
        for (sa, sb), cc in cross.items():
            cc.update(codes[("A0", sa)], codes[("B0", sb)])
        offset += T
    best = {}
    for k, cc in ind_cc.items():
        bm = cc.best_match()  # its "b" side is the indicators: for each planted feature, its best latent
        best[k] = (bm.match_b.cpu(), bm.max_corr_b.cpu(), stats[k].density.cpu())
    return _TruthPass(best, {k: cc.best_match() for k, cc in cross.items()}, offset)


def _site_truth(run: PlantedRun, report: TestReport, tp: _TruthPass, label: str, site: str) -> dict:
    """One site: the test's density of each planted feature's best latent against the truth."""
    spec, tau, p_true = run.spec, run.config.thresholds.tau, run.spec.densities
    latent, corr, dens, n = *tp.best[(label, site)], tp.tokens
    tested = report.arrays.get(f"density/{label[0]}/{site}")
    # Same tokens, same dictionary: the test's densities must equal this pass's.
    if tested is not None and not torch.allclose(tested.cpu().double(), dens.double(), atol=1e-9):
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
    return {
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


def _primary_sites(run: PlantedRun, data: dict) -> dict[str, list[str]]:
    """The primary pair's sites, as the report lists them (the config's where it does not)."""
    return {
        lab: [r["site"] for r in data.get("sites", {}).get(lab[0], [])] or list(run.specs[lab].sites or [])
        for lab in PRIMARY
    }


def compare_with_truth(run: PlantedRun, report: TestReport) -> dict:
    """The test's numbers against the planted ones (see the module docstring)."""
    spec, tau = run.spec, run.config.thresholds.tau
    data = report.data
    site_names = _primary_sites(run, data)
    tp = _truth_pass(run, site_names, [(p["site_a"], p["site_b"]) for p in data["pairs"]])
    sites = [_site_truth(run, report, tp, lab, s) for lab in PRIMARY for s in site_names[lab]]
    errors = np.array([f["rel_error"] for s in sites for f in s["features"] if f["represented"]])
    errors_tau = np.array([f["rel_error"] for s in sites for f in s["features"] if f["corr"] >= tau])
    pairs = [_pair_truth(p, tp, tau, spec.n_features, run.absent) for p in data["pairs"]]
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
        "universality": _universality(data),
    }
    return {"sites": sites, "summary": summary}


def _universality(data: dict) -> dict:
    """What the test decided on universality: the verdict's decision, each depth pair's, and
    the family's relative-universality rows (judged against the mode by ``commands.planted``)."""
    pairs = data["pairs"]
    return {
        "verdict": data["verdict"].get("universality"),
        "pairs": [{"site_a": p["site_a"], "site_b": p["site_b"]} | (p.get("universality") or {}) for p in pairs],
        "relative": (data.get("family") or {}).get("relative_universality", []),
    }


def _pair_truth(pair: dict, tp: _TruthPass, tau: float, F: int, absent: tuple[int, ...]) -> dict:
    """One depth pair: matched fraction vs baseline, and what the test did with planted features."""
    sa, sb = pair["site_a"], pair["site_b"]
    (la, _, pa), (lb, _, pb) = tp.best[("A0", sa)], tp.best[("B0", sb)]
    bm = tp.cross[(sa, sb)]
    same, same_absent, logr = 0, 0, []
    for f in range(F):
        a, b = int(la[f]), int(lb[f])
        # The test matches planted feature f across the models when A's latent for f has
        # B's latent for f as its best match, above τ.
        if int(bm.match_a[a]) == b and float(bm.max_corr_a[a]) >= tau:
            same += 1
            same_absent += f in absent
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
        # A context B never learnt cannot be shared: a match among them is a false one.
        "planted_matched_absent": same_absent,
        "planted_absent": len(absent),
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
    """One universal-mode run (see :func:`run_planted_mode`); -> the planted.json dict."""
    return run_planted_mode(out_dir, QUICK if quick else FULL, seed, progress)[0]


def reload_planted(out_dir: str, size: PlantedSize, previous: dict) -> PlantedRun:
    """A finished run's family read back from ``out_dir`` (models, dictionaries, test tokens and
    their labels, config.json) with the training summary of its planted.json ``previous``:
    nothing is trained. For testing trained families again after a change to the analysis."""
    config = TestConfig.load(os.path.join(out_dir, "config.json"))
    labels = np.load(os.path.join(out_dir, "data", "labels.npy"))
    n_eval = eval_sequences(size)
    mode = previous["mode"]
    run = PlantedRun(config, size.spec, mode, tuple(previous["absent_features"]), labels[n_eval * size.seq_len :],
                     n_eval)  # fmt: skip
    specs = config.model_specs()
    if len(specs) != len(FAMILY):
        raise ValueError(f"{out_dir}/config.json lists {len(specs)} models, a planted family has {len(FAMILY)}")
    for (shape, s), spec in zip(FAMILY, specs):
        run.models[shape + s], run.specs[shape + s] = load_model(spec.path).eval(), spec
    run.lm_loss = dict(previous["train_loss"])
    run.sae_summary = list(previous["dictionaries"])
    return run


def run_planted_mode(
    out_dir: str,
    size: PlantedSize,
    seed: int = 0,
    progress: bool = True,
    mode: str = "universal",
    shared: PlantedRun | None = None,
    retest: dict | None = None,
) -> tuple[dict, PlantedRun]:
    """Build, test and compare with the truth; writes planted.json, planted.md and the test's
    report (report.json/md/html) into ``out_dir``; -> (the planted.json dict, the run, whose
    family-A models a run of the other mode at the same seed can reuse via ``shared``).

    retest: the planted.json of a run finished in ``out_dir``: its trained family is tested
    again (:func:`reload_planted`) instead of being built; the result says ``"retested": true``
    and keeps the original training time."""
    t0 = time.time()
    if retest is not None:
        run, t_prep = reload_planted(out_dir, size, retest), float(retest["seconds"]["prepare"])
    else:
        run = prepare_planted(out_dir, size, seed, mode, progress, shared)
        t_prep = time.time() - t0
    report = run_test(run.config, progress=progress)
    report.write(out_dir)
    truth = compare_with_truth(run, report)
    data = report.data
    result = {
        "what": "the superposition-versus-universality test on planted ground truth",
        "quick": size == QUICK,
        "seed": seed,
        "mode": mode,
        "absent_features": list(run.absent),
        "planted": asdict(run.spec) | {"p_f": run.spec.densities.tolist(), "vocab_size": run.spec.vocab_size},
        "models": {
            k: {
                "name": data["models"][k]["name"],
                "non_embedding_params": data["models"][k]["non_embedding_params"],
                "train_loss": run.lm_loss[k + "0"],
                "eval_loss": data["models"][k]["eval_loss"]["value"],
            }
            for k in ("A", "B")
        },
        "train_loss": run.lm_loss,
        "dictionaries": run.sae_summary,
        "verdict": data["verdict"]["outcome"],
        **truth,
        # a retest's own time is the test's: the total adds it to the original training
        "seconds": {"prepare": round(t_prep, 1), "total": round(time.time() - t0 + (t_prep if retest else 0.0), 1)},
    }
    if retest is not None:
        result["retested"] = True
    # planted.json last: its presence marks the run finished (commands.planted.finished_run)
    write_text(os.path.join(out_dir, "planted.md"), planted_markdown(result))
    write_text(os.path.join(out_dir, "planted.json"), json.dumps(with_checksum(result), indent=2))
    return result, run
