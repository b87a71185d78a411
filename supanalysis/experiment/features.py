"""Features per site: resolve (or train) the site's dictionary, encode activations into codes, and
measure a trained dictionary's seed ceiling (:func:`seed_ceiling_best`).

:func:`train_site_sae` is the one place a TopK SAE is trained for a site with the test's
:class:`~supanalysis.config.SAETraining` settings: the test (dictionary ``"train"``) and the
planted-truth run both use it, so their dictionaries are trained the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..accumulators.tiled import best_match_tiled
from ..capture import ActivationSource
from ..config import ModelSpec, SAETraining, TestConfig
from ..data import TokenSequences
from ..dictionary import (
    Dictionary,
    NeuronBasis,
    TopKTrainConfig,
    TrainResult,
    check_dictionary_site,
    load_dictionary,
    train_topk_sae,
)
from ..dictionary.activations import TopK
from ..dictionary.base import FeatureBasis
from ..distributed import agree, broadcast_module, rank_world
from .rows import sanitize

_T = TypeVar("_T")

#: the second SAE's seed is the run's seed plus this (any other seed would do)
SEED_CEILING_OFFSET = 1
#: the second SAE's checkpoint folder, inside the first one's
SEED_CEILING_DIR = "seed_ceiling"

Codes = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # dense [T, n] or top-k (indices [T, k], values [T, k])


def encode(d: FeatureBasis, x: torch.Tensor) -> Codes:
    """Codes of activations ``x`` [T, m]: a TopK dictionary's stay sparse (k per token, never n)."""
    if isinstance(d, NeuronBasis):
        return x.float()
    if isinstance(d, Dictionary) and isinstance(d.activation, TopK):
        return d.encode(x.float(), sparse=True)
    return d.encode(x.float())


def take_rows(codes: Codes, sel: slice | torch.Tensor) -> Codes:
    """The tokens ``sel`` of ``codes`` (a slice or an index tensor), in the same form."""
    return codes[sel] if isinstance(codes, torch.Tensor) else (codes[0][sel], codes[1][sel])


def to_dense(codes: Codes, n: int) -> torch.Tensor:
    """Codes as a dense [T, n] tensor (top-k padding, index -1, contributes nothing)."""
    if isinstance(codes, torch.Tensor):
        return codes
    idx, val = codes
    out = val.new_zeros(idx.shape[0], n)
    return out.scatter_(1, idx.clamp_min(0), torch.where(idx >= 0, val, 0))


def train_site_sae(
    model: nn.Module,
    seqs: TokenSequences,
    site: str,
    m: int,
    sae: SAETraining,
    seed: int,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """A TopK SAE of width ``sae.expansion · m`` on ``site``'s activations over ``seqs``."""
    src = ActivationSource(model, seqs, [site], progress=False)
    return train_topk_sae(
        src,
        site,
        d_sae=sae.expansion * m,
        k=sae.k,
        n_tokens=sae.tokens,
        config=TopKTrainConfig(batch_size=sae.batch_size, lr=sae.lr, seed=seed, log_every=10**9),
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )


def on_rank0(work: Callable[[], _T], what: str, device: torch.device) -> _T | None:
    """``work()`` on rank 0 only (None elsewhere); an error there is raised on every rank."""
    rank, _ = rank_world()
    error: Exception | None = None
    out: _T | None = None
    if rank == 0:
        try:
            out = work()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if not agree(error is None, device):
        raise error or RuntimeError(f"rank 0 failed to {what}; see its error")
    return out


def train_dictionary(
    site: str,
    m: int,
    model: nn.Module,
    cfg: TestConfig,
    seqs: TokenSequences,
    sae_dir: Path | None,
    progress: bool,
    device: torch.device,
) -> tuple[FeatureBasis, str]:
    """Train a site's TopK SAE (rank 0 only in a distributed run; the others receive its weights).

    With a checkpoint folder, training checkpoints there and a resumed run continues it
    (or, when it had finished, reloads the result without training again).
    """
    _, world = rank_world()
    sae = cfg.sae
    tokens = torch.zeros(1, dtype=torch.int64, device=device)

    def train() -> Dictionary:
        result = train_site_sae(model, seqs, site, m, sae, cfg.seed, checkpoint_dir=sae_dir, progress=progress)
        tokens.add_(result.tokens)
        return result.dictionary.to(device)

    d = on_rank0(train, f"train the dictionary of {site}", device)
    if world > 1:
        if d is None:
            d = Dictionary(m, sae.expansion * m, TopK(sae.k), metadata={"hook_name": site}).to(device)
        broadcast_module(d)
        dist.broadcast(tokens, src=0)
    assert d is not None
    return d, f"TopK SAE trained here (n={d.n_features}, k={sae.k}, {int(tokens)} tokens)"


def held_out_tokens(cfg: TestConfig) -> int:
    """Tokens the dictionary-seed ceiling is measured on: the match tokens (the first of the
    statistics slice, held out from SAE training, where the FVU is measured too), or every
    statistics token when nothing is matched."""
    return cfg.match_tokens or cfg.stats_tokens


@torch.no_grad()
def seed_best_match(
    first: FeatureBasis,
    second: FeatureBasis,
    batches: Iterable[torch.Tensor],
    *,
    max_bytes: int = 8 << 30,
    backend: str | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(n latents of ``first``,) float64 on the CPU: each latent's best Pearson correlation with a
    latent of ``second``, both encoding the same activations ``batches`` ([T, m] each); 0 for a
    latent constant on them. Co-moment in row blocks of ``max_bytes`` (one block when it fits)."""
    kept = []
    for x in batches:
        x = x.to(device) if device is not None else x
        kept.append((encode(first, x), encode(second, x)))
    n1, n2 = first.W_dec.shape[0], second.W_dec.shape[0]

    def stream():
        for c1, c2 in kept:
            if isinstance(c1, tuple) and isinstance(c2, tuple):
                yield (c1[0], c1[1], c2[0], c2[1])
            else:
                yield (to_dense(c1, n1), to_dense(c2, n2))

    found = best_match_tiled(stream, n1, n2, max_bytes=max_bytes, backend=backend, device=device, progress=False)
    return found.best.max_corr_a.double().cpu()


def seed_ceiling_best(
    first: FeatureBasis,
    site: str,
    m: int,
    model: nn.Module,
    cfg: TestConfig,
    seqs: TokenSequences,
    held_out: TokenSequences,
    sae_dir: Path | None,
    progress: bool,
    device: torch.device,
) -> torch.Tensor:
    """The dictionary-seed ceiling's best matches: ``first`` (the site's trained SAE) against a
    second SAE trained on the same activations ``seqs`` with another seed, over the first
    :func:`held_out_tokens` of ``held_out`` (:func:`seed_best_match`).

    Rank 0 trains the second SAE (checkpointed in ``sae_dir/seed_ceiling``, resumed like the
    first) and streams the tokens; every rank gets the result.
    """
    _, world = rank_world()

    def measure() -> torch.Tensor:
        folder = sae_dir / SEED_CEILING_DIR if sae_dir is not None else None
        seed = cfg.seed + SEED_CEILING_OFFSET
        second = train_site_sae(model, seqs, site, m, cfg.sae, seed, checkpoint_dir=folder, progress=progress)
        src = ActivationSource(model, held_out, [site], max_tokens=held_out_tokens(cfg), progress=False)
        best = seed_best_match(first, second.dictionary.to(device), (b[site] for b in src),
                               max_bytes=cfg.match_max_bytes, backend=cfg.backend, device=device)  # fmt: skip
        return best.to(device)

    best = on_rank0(measure, f"measure the dictionary-seed ceiling of {site}", device)
    if world > 1:
        if best is None:
            best = torch.empty(first.W_dec.shape[0], dtype=torch.float64, device=device)
        dist.broadcast(best, src=0)
    assert best is not None
    return best.cpu()


def load_site_dictionary(choice: str, site: str, m: int, model: nn.Module | None = None) -> tuple[FeatureBasis, str]:
    """The dictionary in folder ``choice`` (or its subfolder named after the site), checked
    against the site of ``model`` it is used at (its declared training site and capture convention)."""
    folder = Path(choice)
    if (folder / sanitize(site)).is_dir():
        folder = folder / sanitize(site)
    elif (folder / site).is_dir():
        folder = folder / site
    d = load_dictionary(folder)
    if d.d_in != m:
        raise ValueError(f"dictionary {folder} has d_in={d.d_in}, but site {site!r} has {m} neurons")
    if model is not None:
        try:
            check_dictionary_site(d, site, model)
        except ValueError as exc:
            raise ValueError(f"dictionary {folder}: {exc}") from exc
    return d, f"{folder}"


def site_choice(spec: ModelSpec, site: str) -> str:
    """The spec's dictionary choice for ``site``: ``"neuron"``, ``"train"`` or a folder."""
    choice = spec.dictionary
    if isinstance(choice, dict):
        if site not in choice:
            raise ValueError(f"dictionary mapping for {spec.name or spec.path} has no entry for site {site!r}")
        choice = choice[site]
    return choice


def resolve_dictionary(
    spec: ModelSpec,
    site: str,
    m: int,
    model: nn.Module,
    cfg: TestConfig,
    train_seqs: TokenSequences,
    sae_dir: Path | None,
    progress: bool,
    device: torch.device,
) -> tuple[FeatureBasis, str]:
    """The site's feature basis and its description in words (the report's ``dictionary``)."""
    choice = site_choice(spec, site)
    if choice == "neuron":
        return NeuronBasis(m), f"neuron basis (m={m})"
    if choice == "train":
        return train_dictionary(site, m, model, cfg, train_seqs, sae_dir, progress, device)
    return load_site_dictionary(choice, site, m, model)
