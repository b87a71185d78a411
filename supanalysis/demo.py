"""``supanalysis demo``: the whole test on two models trained here, from nothing.

Corpus: the Python standard library's own source files read as bytes (on every machine;
nothing is downloaded). Models: two TinyTransformers with the same 12·L·d² and aspect
ratios 16x apart — wide-shallow A (L=2, d=128) and narrow-deep B (L=8, d=64), both
393,216 — trained on the same bytes. Then a TopK SAE per layer of each, and the test on
held-out bytes, written as report.json / report.md / report.html. The model folders and
the test config are kept, so ``supanalysis test --config OUT/config.json`` reruns the test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelSpec, SAETraining, TestConfig, Thresholds
from .data import stdlib_corpus
from .models import TinyConfig, TinyTransformer
from .models.train import LMTrainConfig, train_language_model
from .pipeline import TestReport, run_test


@dataclass(frozen=True)
class DemoSize:
    """Sizes of one demo flavour (the full one and --quick share every code path)."""

    corpus_bytes: int
    shape_a: tuple[int, int]  # (n_layers, d_model)
    shape_b: tuple[int, int]
    steps: int
    sae_tokens: int
    sae_expansion: int
    stats_tokens: int
    match_tokens: int
    eval_tokens: int
    bootstrap: int


FULL = DemoSize(8_000_000, (2, 128), (8, 64), 400, 40_000, 4, 30_000, 20_000, 10_000, 1000)
QUICK = DemoSize(2_000_000, (1, 64), (4, 32), 150, 12_000, 4, 8_000, 8_000, 4_000, 200)
SEQ_LEN = 128


def _tiny(n_layers: int, d_model: int) -> TinyTransformer:
    return TinyTransformer(
        TinyConfig(n_layers=n_layers, d_model=d_model, n_heads=4, d_ff=4 * d_model, vocab_size=256, n_ctx=SEQ_LEN)
    )


def prepare_demo(out: str, size: DemoSize, seed: int = 0, progress: bool = True) -> TestConfig:
    """Build the corpus, train and save both models, write ``config.json``; return the config."""
    corpus = stdlib_corpus(size.corpus_bytes)
    # Hold out the tail for the test itself (eval loss, SAE training, statistics).
    need = size.eval_tokens + size.sae_tokens + size.stats_tokens
    held = max(int(0.1 * corpus.size), 2 * need)
    if held >= corpus.size // 2:
        raise ValueError(f"corpus of {corpus.size} bytes is too small for {need} analysis tokens")
    train, test = corpus[:-held], corpus[-held:]
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    tokens_path = os.path.join(out, "data", "tokens.npy")
    np.save(tokens_path, test)
    specs = []
    for label, (L, d) in (("A", size.shape_a), ("B", size.shape_b)):
        torch.manual_seed(seed + (0 if label == "A" else 1))
        model = _tiny(L, d)
        cfg = LMTrainConfig(steps=size.steps, batch_size=16, seq_len=SEQ_LEN, seed=seed)
        train_language_model(model, train, cfg, progress=progress, desc=f"training model {label} (L={L}, d={d})")
        folder = os.path.join(out, "models", label)
        model.save(folder)
        shape = "wide-shallow" if label == "A" else "narrow-deep"
        specs.append(
            ModelSpec(path=os.path.abspath(folder), name=f"{label}: {shape} (L={L}, d={d})", dictionary="train")
        )
    config = TestConfig(
        model_a=specs[0],
        model_b=specs[1],
        tokens=os.path.abspath(tokens_path),
        seq_len=SEQ_LEN,
        batch_size=16,
        eval_tokens=size.eval_tokens,
        stats_tokens=size.stats_tokens,
        match_tokens=size.match_tokens,
        sae=SAETraining(expansion=size.sae_expansion, k=8, tokens=size.sae_tokens, batch_size=1024),
        thresholds=Thresholds(),
        bootstrap=size.bootstrap,
        seed=seed,
    )
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config.to_dict(), fh, indent=2)
    return config


def run_demo(out: str, quick: bool = False, seed: int = 0, progress: bool = True) -> TestReport:
    """Prepare the models and run the test on them; the report is written into ``out``."""
    t0 = time.time()
    config = prepare_demo(out, QUICK if quick else FULL, seed, progress)
    report = run_test(config, progress=progress)
    report.data["notes"].append(
        f"Demo ({'quick' if quick else 'full'}): two TinyTransformers trained here on the Python standard "
        f"library's source bytes; {time.time() - t0:.0f} s end to end."
    )
    report.write(out)
    return report


def _cmd_demo(args: argparse.Namespace) -> int:
    from .cli import print_summary

    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print_summary(report.data, args.out)
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train two equal-parameter models here and run the test on them")
    p.add_argument("--quick", action="store_true", help="smaller everything, same code path (< 2 minutes)")
    p.add_argument("--out", default="supanalysis-out/demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
