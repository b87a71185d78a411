"""What one run measures: which models and sites, which slice of the token file feeds what,
and which site pairs are compared.

The token file is cut into consecutive slices: eval | SAE training | statistics. The first
``match_tokens`` of the statistics tokens also feed the cross-model correlations.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import ModelSpec, TestConfig
from ..data import TokenSequences, open_tokens
from ..models import describe
from ..models import load as load_model

SitePair = tuple[int, int]


def run_device(cfg: TestConfig) -> torch.device:
    """The configured device, else CUDA when available, else the CPU."""
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sequence_budget(tokens: int, seq_len: int) -> int:
    """Sequences of ``seq_len`` needed to hold ``tokens`` tokens (at least one)."""
    return max(1, math.ceil(tokens / seq_len))


def dictionary_choices(specs: list[ModelSpec]) -> set[str]:
    """Every dictionary choice the specs make (``"neuron"``, ``"train"``, folders)."""
    out: set[str] = set()
    for spec in specs:
        out |= set(spec.dictionary.values()) if isinstance(spec.dictionary, dict) else {spec.dictionary}
    return out


def open_models(cfg: TestConfig, given: list[nn.Module | None], device: torch.device) -> list[nn.Module]:
    """Every model of :meth:`TestConfig.model_specs` (``given[k]`` or loaded from its folder),
    on ``device`` in eval mode."""
    specs = cfg.model_specs()
    if len(given) != len(specs):
        raise ValueError(f"the config lists {len(specs)} models, {len(given)} were given")
    two = not cfg.models
    models: list[nn.Module] = []
    for k, (spec, model) in enumerate(zip(specs, given)):
        what = f"model_{'ab'[k]}" if two else f"models[{k}]"
        if model is None:
            if not spec.path:
                raise ValueError(f"{what}.path is empty")
            if not os.path.isdir(spec.path):
                raise FileNotFoundError(f"{'model ' + 'AB'[k] if two else what} folder not found: {spec.path}")
            model = load_model(spec.path, device=device)
        if any(model is m for m in models):
            # Two sets of capture hooks would sit on the same modules: give this one its own copy.
            model = copy.deepcopy(model)
        models.append(model.to(device).eval())
    return models


def site_names(spec: ModelSpec, model: nn.Module) -> list[str]:
    """The spec's sites, by default every layer's residual stream."""
    return spec.sites or [f"resid_post.{layer}" for layer in range(describe(model).n_layers)]


@dataclass(frozen=True)
class TokenPlan:
    """The token file and its slices, in sequences of ``seq_len``."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    vocab: int
    n_eval: int
    n_train: int
    n_stats: int

    def seqs(self, start: int, count: int) -> TokenSequences:
        """``count`` sequences from sequence ``start``; every batch is checked against the vocabulary."""
        return TokenSequences(
            self.tokens, self.seq_len, self.batch_size, start=start, max_sequences=count, vocab_size=self.vocab
        )

    @property
    def train_seqs(self) -> TokenSequences:
        return self.seqs(self.n_eval, self.n_train)

    @property
    def stats_start(self) -> int:
        return self.n_eval + self.n_train


def open_token_file(cfg: TestConfig) -> np.ndarray:
    """The configured token file, memory-mapped."""
    if not cfg.tokens:
        raise ValueError("config.tokens must name a token file (.npy or .bin)")
    return open_tokens(cfg.tokens, cfg.token_dtype)


def plan_tokens(cfg: TestConfig, tokens: np.ndarray, models: list[nn.Module]) -> TokenPlan:
    """Check the token file against the models' vocabulary and cut its slices."""
    vocab = min(int(describe(m).vocab_size) for m in models)
    if tokens.size and int(np.max(tokens[: min(tokens.size, 1 << 22)])) >= vocab:
        raise ValueError(f"token file {cfg.tokens} has ids >= the models' vocabulary size {vocab}")
    L = cfg.seq_len
    n_eval = sequence_budget(cfg.eval_tokens + cfg.eval_tokens // L, L)
    trains = "train" in dictionary_choices(cfg.model_specs())
    n_train = sequence_budget(cfg.sae.tokens, L) if trains else 0
    n_stats = sequence_budget(cfg.stats_tokens, L)
    total = len(TokenSequences(tokens, L))
    if n_eval + n_stats + n_train > total:
        raise ValueError(
            f"the token file holds {total} sequences of {L} tokens; this config needs {n_eval + n_train + n_stats} "
            f"(eval {n_eval}, SAE training {n_train}, statistics {n_stats}): lower the token counts or add data"
        )
    return TokenPlan(tokens, L, cfg.batch_size, vocab, n_eval, n_train, n_stats)


def pair_by_depth(layers_a: list[int], L_a: int, layers_b: list[int], L_b: int) -> list[SitePair]:
    """Index pairs (i into A's sites, j into B's) matched by relative depth (l+1)/L.

    Every site of the model with fewer sites gets the site of the other whose relative depth
    is closest (ties: the shallower one), so each site of the shallower model appears once.
    """
    da, db = relative_depths(layers_a, L_a), relative_depths(layers_b, L_b)
    pairs = []
    if len(da) <= len(db):
        for i, d in enumerate(da):
            pairs.append((i, min(range(len(db)), key=lambda j: (abs(db[j] - d), j))))
    else:
        for j, d in enumerate(db):
            pairs.append((min(range(len(da)), key=lambda i: (abs(da[i] - d), i)), j))
    return sorted(set(pairs))


def relative_depths(layers: list[int], n_layers: int) -> list[float]:
    """Each site's relative depth (layer + 1) / L: 1 is the last block's output."""
    return [(layer + 1) / n_layers for layer in layers]


def family_grid(site_layers: list[tuple[list[int], int]]) -> list[float]:
    """The family's common depth grid: the relative depths of the model with the fewest sites
    (the first such in config order). ``site_layers``: per model, (its sites' layers, its L).

    Every model has a site near each of these depths, so matching over the grid offers every
    model the same number of candidate sites, whatever its shape (docs/science.md, "Calibration").
    """
    layers, n_layers = min(site_layers, key=lambda s: len(s[0]))
    return relative_depths(layers, n_layers)


def grid_sites(layers: list[int], n_layers: int, grid: list[float]) -> list[int]:
    """Index of the site nearest each grid depth (ties: the shallower), in grid order."""
    d = relative_depths(layers, n_layers)
    return [min(range(len(d)), key=lambda j: (abs(d[j] - g), j)) for g in grid]


def model_grid_sites(models: list) -> list[list[int]]:
    """Per model (anything with ``.sites[k].layer`` and ``.shape.n_layers``, e.g. a
    ModelMeasurement), the indices of its sites on the family's common depth grid."""
    layers = [([s.layer for s in m.sites], m.shape.n_layers) for m in models]
    grid = family_grid(layers)
    return [grid_sites(ls, n, grid) for ls, n in layers]


def grid_pairs(sites_x: list[int], sites_y: list[int]) -> list[SitePair]:
    """Every (grid site of x, grid site of y): what matching over the grid needs measured."""
    return sorted({(i, j) for i in sites_x for j in sites_y})


@dataclass(frozen=True)
class PairPlan:
    """The site pairs compared: by depth (with a shuffled baseline each), and all of them
    (any-layer matching; the depth pairs alone when it is off)."""

    depth: list[SitePair]
    all: list[SitePair]


def plan_pairs(
    cfg: TestConfig, layers_a: list[int], L_a: int, layers_b: list[int], L_b: int, grid: list[SitePair] = ()
) -> PairPlan:
    """Depth pairs, plus every (i, j) when ``cfg.any_layer``, else plus the ``grid`` pairs."""
    depth = pair_by_depth(layers_a, L_a, layers_b, L_b)
    if cfg.any_layer:
        every = [(i, j) for i in range(len(layers_a)) for j in range(len(layers_b))]
    else:
        every = sorted(set(depth) | set(grid))
    return PairPlan(depth, every)
