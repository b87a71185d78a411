"""The superposition-versus-universality test, end to end.

``measure`` does everything that touches activations (one shared pass of the same tokens
through both models feeds every accumulator); ``analyse`` turns the accumulators into the
report with the thresholds of the day, so changing τ, φ, C or a tolerance never reruns a
model. ``run_test`` is the two in sequence. SCIENCE.md is the specification of every number.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import science as S
from .accumulators import ActivationStats, CrossCorrelation
from .accumulators.tiled import TiledBestMatch, best_match_tiled
from .capture import ActivationSource
from .checkpoint import CheckpointMismatch, MeasureCheckpoint, module_hash, prefixed, run_fingerprint, unprefixed
from .config import ModelSpec, TestConfig, Thresholds
from .data import TokenSequences, open_tokens
from .dictionary import Dictionary, NeuronBasis, TopKTrainConfig, load_dictionary, train_topk_sae
from .dictionary.activations import TopK
from .dictionary.base import FeatureBasis
from .distributed import (
    agree,
    all_gather_cat,
    all_reduce_sum,
    broadcast_module,
    interference_split,
    rank_world,
    shard_range,
)
from .models import ModelShape, describe
from .models import load as load_model
from .sites import resolve_sites

SCHEMA = "supanalysis.test_report/1"


# ----------------------------------------------------------------------------- helpers
def _device(cfg: TestConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def token_losses(
    model: nn.Module, seqs: TokenSequences, device: torch.device, max_tokens: int, allow_empty: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy (nats) of every predicted position, up to ``max_tokens``. -> (N,)"""
    out, have = [], 0
    for ids in seqs:
        ids = ids.to(device)
        logits = _logits(model, ids[:, :-1]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(ce.cpu().double())
        have += ce.numel()
        if have >= max_tokens:
            break
    if not out:
        if allow_empty:
            return torch.zeros(0, dtype=torch.float64)
        raise ValueError("the token file has no eval sequences")
    return torch.cat(out)[:max_tokens]


def _sequence_budget(tokens: int, seq_len: int) -> int:
    return max(1, math.ceil(tokens / seq_len))


def pair_by_depth(layers_a: list[int], L_a: int, layers_b: list[int], L_b: int) -> list[tuple[int, int]]:
    """Index pairs (i into A's sites, j into B's) matched by relative depth (l+1)/L.

    Every site of the model with fewer sites gets the site of the other whose relative depth
    is closest (ties: the shallower one), so each site of the shallower model appears once.
    """
    da = [(layer + 1) / L_a for layer in layers_a]
    db = [(layer + 1) / L_b for layer in layers_b]
    pairs = []
    if len(da) <= len(db):
        for i, d in enumerate(da):
            pairs.append((i, min(range(len(db)), key=lambda j: (abs(db[j] - d), j))))
    else:
        for j, d in enumerate(db):
            pairs.append((min(range(len(da)), key=lambda i: (abs(da[i] - d), i)), j))
    return sorted(set(pairs))


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


# ----------------------------------------------------------------------------- measurements
@dataclass
class SiteMeasurement:
    """Everything measured at one site of one model (threshold-independent)."""

    site: str
    layer: int
    m: int
    dictionary: str
    stats: ActivationStats  # of the dictionary's codes
    x_stats: ActivationStats  # of the raw activations (total variance for the FVU)
    sse: float  # Σ ‖x − decode(encode(x))‖² (0 for the neuron basis)
    dims: torch.Tensor
    max_abs_cos: torch.Tensor
    sum_dims: float
    d_star: float
    welch_bound: float
    total_sq_cos: float


@dataclass
class PairMeasurement:
    """Cross-model correlations of one site pair, with the token-shuffled baseline."""

    i: int
    j: int
    corr: CrossCorrelation | TiledBestMatch  # TiledBestMatch: the "tiled" mode (see measure)
    baseline: CrossCorrelation | TiledBestMatch | None


@dataclass
class ModelMeasurement:
    name: str
    source: str
    shape: ModelShape
    losses: torch.Tensor  # per-token eval cross-entropy (N,)
    sites: list[SiteMeasurement] = field(default_factory=list)


@dataclass
class Measurements:
    """The threshold-independent result of :func:`measure`."""

    config: TestConfig
    a: ModelMeasurement
    b: ModelMeasurement
    pairs: list[PairMeasurement]
    cross: dict[tuple[int, int], CrossCorrelation | TiledBestMatch]  # all site pairs (any-layer matching)
    device: str
    backend: str | None


def _resolve_dictionary(
    spec: ModelSpec,
    site: str,
    m: int,
    model: nn.Module,
    cfg: TestConfig,
    train_seqs: TokenSequences,
    progress: bool,
    sae_dir: Path | None,
    device: torch.device,
) -> tuple[FeatureBasis, str]:
    choice = spec.dictionary
    if isinstance(choice, dict):
        if site not in choice:
            raise ValueError(f"dictionary mapping for {spec.name or spec.path} has no entry for site {site!r}")
        choice = choice[site]
    if choice == "neuron":
        return NeuronBasis(m), f"neuron basis (m={m})"
    if choice == "train":
        return _train_dictionary(site, m, model, cfg, train_seqs, progress, sae_dir, device)
    folder = Path(choice)
    if (folder / _clean(site)).is_dir():
        folder = folder / _clean(site)
    elif (folder / site).is_dir():
        folder = folder / site
    d = load_dictionary(folder)
    if d.d_in != m:
        raise ValueError(f"dictionary {folder} has d_in={d.d_in}, but site {site!r} has {m} neurons")
    return d, f"{folder}"


def _train_dictionary(
    site: str,
    m: int,
    model: nn.Module,
    cfg: TestConfig,
    train_seqs: TokenSequences,
    progress: bool,
    sae_dir: Path | None,
    device: torch.device,
) -> tuple[FeatureBasis, str]:
    """Train a TopK SAE (rank 0 only in a distributed run; the others receive its weights).

    With a checkpoint folder, training checkpoints there and a resumed run continues it
    (or, when it had finished, reloads the result without training again).
    """
    rank, world = rank_world()
    d_sae = cfg.sae.expansion * m
    tokens = torch.zeros(1, dtype=torch.int64, device=device)
    error: Exception | None = None
    d: Dictionary | None = None
    if rank == 0:
        try:
            src = ActivationSource(model, train_seqs, [site], progress=False)
            result = train_topk_sae(
                src,
                site,
                d_sae=d_sae,
                k=cfg.sae.k,
                n_tokens=cfg.sae.tokens,
                config=TopKTrainConfig(batch_size=cfg.sae.batch_size, lr=cfg.sae.lr, seed=cfg.seed, log_every=10**9),
                checkpoint_dir=sae_dir,
                progress=progress,
            )
            d = result.dictionary.to(device)
            tokens += result.tokens
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    if not agree(error is None, device):
        raise error or RuntimeError(f"rank 0 failed to train the dictionary of {site}; see its error")
    if world > 1:
        if d is None:
            d = Dictionary(m, d_sae, TopK(cfg.sae.k), metadata={"hook_name": site}).to(device)
        broadcast_module(d)
        dist.broadcast(tokens, src=0)
    assert d is not None
    return d, f"TopK SAE trained here (n={d.n_features}, k={cfg.sae.k}, {int(tokens)} tokens)"


Codes = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # dense [T, n] or top-k (indices, values)


def _encode(d: FeatureBasis, x: torch.Tensor) -> Codes:
    """A TopK dictionary's codes stay sparse (k per token, never n); others are dense."""
    if isinstance(d, NeuronBasis):
        return x.float()
    if isinstance(d, Dictionary) and isinstance(d.activation, TopK):
        return d.encode(x.float(), sparse=True)
    return d.encode(x.float())


def _rows(codes: Codes, sel) -> Codes:
    return codes[sel] if isinstance(codes, torch.Tensor) else (codes[0][sel], codes[1][sel])


def _dense(codes: Codes, n: int) -> torch.Tensor:
    if isinstance(codes, torch.Tensor):
        return codes
    idx, val = codes
    out = val.new_zeros(idx.shape[0], n)
    return out.scatter_(1, idx.clamp_min(0), torch.where(idx >= 0, val, 0))


@dataclass
class _Kept:
    """The match tokens' codes per site and the baseline's permutations, kept for the tiled
    matching (empty in the dense mode); checkpointed with the accumulators."""

    a: dict[int, list[Codes]]
    b: dict[int, list[Codes]]
    perms: list[torch.Tensor]

    def keep(self, codes_a: list[Codes], codes_b: list[Codes], take: int, perm: torch.Tensor) -> None:
        for kept, codes in ((self.a, codes_a), (self.b, codes_b)):
            for i, c in enumerate(codes):
                kept[i].append(_rows(c, slice(0, take)))
        self.perms.append(perm)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for side, kept in (("a", self.a), ("b", self.b)):
            for i, batches in kept.items():
                for n, c in enumerate(batches):
                    if isinstance(c, tuple):
                        out[f"kept.{side}{i}.{n}.idx"], out[f"kept.{side}{i}.{n}.val"] = c
                    else:
                        out[f"kept.{side}{i}.{n}.dense"] = c
        out.update({f"kept.perm.{n}": p for n, p in enumerate(self.perms)})
        return out

    def restore(self, t: dict[str, torch.Tensor], device: torch.device) -> None:
        n_batches = sum(1 for key in t if key.startswith("kept.perm."))
        self.perms = [t[f"kept.perm.{n}"].to(device) for n in range(n_batches)]
        for side, kept in (("a", self.a), ("b", self.b)):
            for i in kept:
                kept[i] = []
                for n in range(n_batches):
                    key = f"kept.{side}{i}.{n}"
                    if key + ".dense" in t:
                        kept[i].append(t[key + ".dense"].to(device))
                    else:
                        kept[i].append((t[key + ".idx"].to(device), t[key + ".val"].to(device)))


def _cross_update(cc: CrossCorrelation, ca: Codes, cb: Codes) -> None:
    if isinstance(ca, tuple) and isinstance(cb, tuple):
        cc.update_sparse(ca[0], ca[1], cb[0], cb[1])
    else:  # a neuron basis on one side: that side is dense anyway
        cc.update(_dense(ca, cc.n_a), _dense(cb, cc.n_b))


def _batch_seed(seed: int, batch: int) -> int:
    # One generator per global batch: the shuffled baseline does not depend on how the
    # batches are split across ranks or across an interruption.
    return ((seed & 0xFFFFFFFF) << 32) | (batch & 0xFFFFFFFF)


def _open_checkpoint(
    folder: str | os.PathLike, cfg: TestConfig, tokens: np.ndarray, models: list[nn.Module], resume: bool
) -> tuple[MeasureCheckpoint, tuple[dict[str, torch.Tensor], dict] | None]:
    """Bind the folder to this run (rank 0 first) and read this rank's saved state, if any."""
    rank, world = rank_world()
    fp = run_fingerprint(cfg, tokens, models, world)
    ck: MeasureCheckpoint | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            ck = MeasureCheckpoint.open(folder, fp, rank, world, resume)
        except CheckpointMismatch as exc:
            error = exc
    if not agree(error is None):
        raise error or CheckpointMismatch(f"rank 0 refused the checkpoint folder {folder}; see its error")
    saved = None
    try:
        if ck is None:
            ck = MeasureCheckpoint.open(folder, fp, rank, world, resume, join=True)
        saved = ck.load_state()
    except CheckpointMismatch as exc:
        error = exc
    if not agree(error is None):
        raise error or CheckpointMismatch(f"another rank refused its checkpoint in {folder}; see its error")
    assert ck is not None
    return ck, saved


def _state_tensors(
    a: ModelMeasurement,
    b: ModelMeasurement,
    cross: dict[tuple[int, int], CrossCorrelation],
    baselines: dict[tuple[int, int], CrossCorrelation],
    kept: _Kept,
) -> dict[str, torch.Tensor]:
    """Every accumulator of this rank, flattened for a checkpoint (see _restore_state)."""
    out: dict[str, torch.Tensor] = {"losses.a": a.losses, "losses.b": b.losses, **kept.tensors()}
    for label, mm in (("a", a), ("b", b)):
        for i, s in enumerate(mm.sites):
            out.update(prefixed(f"{label}{i}.stats", s.stats.state_dict()))
            out.update(prefixed(f"{label}{i}.x_stats", s.x_stats.state_dict()))
            out[f"{label}{i}.sse"] = torch.tensor(s.sse, dtype=torch.float64)
    for (i, j), cc in cross.items():
        out.update(prefixed(f"cross.{i}.{j}", cc.state_dict()))
    for (i, j), bl in baselines.items():
        out.update(prefixed(f"baseline.{i}.{j}", bl.state_dict()))
    return out


def _restore_state(
    t: dict[str, torch.Tensor],
    a: ModelMeasurement,
    b: ModelMeasurement,
    cross: dict[tuple[int, int], CrossCorrelation],
    baselines: dict[tuple[int, int], CrossCorrelation],
    kept: _Kept,
    device: torch.device,
) -> None:
    kept.restore(t, device)
    for label, mm in (("a", a), ("b", b)):
        for i, s in enumerate(mm.sites):
            s.stats.load_state_dict(unprefixed(f"{label}{i}.stats", t))
            s.x_stats.load_state_dict(unprefixed(f"{label}{i}.x_stats", t))
            s.sse = float(t[f"{label}{i}.sse"])
    for (i, j), cc in cross.items():
        cc.load_state_dict(unprefixed(f"cross.{i}.{j}", t))
    for (i, j), bl in baselines.items():
        bl.load_state_dict(unprefixed(f"baseline.{i}.{j}", t))


def _eval_losses(model: nn.Module, cfg: TestConfig, seqs, n_eval: int, device: torch.device) -> torch.Tensor:
    """Per-token eval losses; in a distributed run each rank takes a contiguous share."""
    rank, world = rank_world()
    if world == 1:
        return token_losses(model, seqs(0, n_eval), device, cfg.eval_tokens)
    lo, hi = shard_range(n_eval, rank, world)
    part = token_losses(model, seqs(lo, hi - lo), device, 1 << 62, allow_empty=True)
    # Rank order is sequence order, so the concatenation is the single-process result.
    return all_gather_cat(part.to(device)).cpu()[: cfg.eval_tokens]


def measure(
    cfg: TestConfig,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every_tokens: int | None = None,
    checkpoint_every_seconds: float | None = 600.0,
) -> Measurements:
    """Run both models over the tokens and fill every accumulator (see module docstring).

    Distributed (inside a torch.distributed process group, e.g. under torchrun): each rank
    takes a contiguous share of the eval sequences, of the dictionaries' rows for the
    interference, and of the statistics batches; the accumulators then all-reduce exactly,
    so every rank returns what one process would (to float64 rounding). Dictionaries
    trained here are trained on rank 0 and broadcast.

    Checkpoints (``checkpoint_dir``): the statistics pass saves every rank's accumulators
    and its position every ``checkpoint_every_tokens`` tokens or ``checkpoint_every_seconds``
    seconds, whichever comes first, and at the end; ``resume=True`` continues from there
    and gives the same measurements as an uninterrupted run. See :mod:`supanalysis.checkpoint`.
    """
    if checkpoint_every_tokens is not None and checkpoint_every_tokens < 1:
        raise ValueError(f"checkpoint_every_tokens must be positive, got {checkpoint_every_tokens}")
    rank, world = rank_world()
    dev = _device(cfg)
    if not cfg.tokens:
        raise ValueError("config.tokens must name a token file (.npy or .bin)")
    tokens = open_tokens(cfg.tokens, cfg.token_dtype)
    models, specs = [], [cfg.model_a, cfg.model_b]
    for spec, given, label in ((cfg.model_a, model_a, "A"), (cfg.model_b, model_b, "B")):
        if given is None:
            if not spec.path:
                raise ValueError(f"model_{label.lower()}.path is empty")
            if not os.path.isdir(spec.path):
                raise FileNotFoundError(f"model {label} folder not found: {spec.path}")
            given = load_model(spec.path, device=dev)
        if models and given is models[0]:
            # Both sides' capture hooks would sit on the same modules: give B its own copy.
            given = copy.deepcopy(given)
        models.append(given.to(dev).eval())
    vocab = min(int(describe(m).vocab_size) for m in models)
    if tokens.size and int(np.max(tokens[: min(tokens.size, 1 << 22)])) >= vocab:
        raise ValueError(f"token file {cfg.tokens} has ids >= the models' vocabulary size {vocab}")

    # The token file is cut into consecutive slices: eval | SAE training | statistics.
    L, bs = cfg.seq_len, cfg.batch_size
    n_eval = _sequence_budget(cfg.eval_tokens + cfg.eval_tokens // L, L)
    n_train = _sequence_budget(cfg.sae.tokens, L) if "train" in _dictionary_choices(specs) else 0
    n_stats = _sequence_budget(cfg.stats_tokens, L)
    total = len(TokenSequences(tokens, L))
    if n_eval + n_stats + n_train > total:
        raise ValueError(
            f"the token file holds {total} sequences of {L} tokens; this config needs {n_eval + n_train + n_stats} "
            f"(eval {n_eval}, SAE training {n_train}, statistics {n_stats}): lower the token counts or add data"
        )
    # vocab_size: every batch is checked, not only the head of the file scanned above.
    seqs = lambda start, count: TokenSequences(tokens, L, bs, start=start, max_sequences=count, vocab_size=vocab)  # noqa: E731
    train_seqs = seqs(n_eval, n_train)

    ck, saved = (None, None)
    if checkpoint_dir is not None:
        ck, saved = _open_checkpoint(checkpoint_dir, cfg, tokens, models, resume)

    mms: list[ModelMeasurement] = []
    dicts: list[list[FeatureBasis]] = []
    for spec, model, label in zip(specs, models, "AB"):
        shape = describe(model)
        names = spec.sites or [f"resid_post.{layer}" for layer in range(shape.n_layers)]
        sites = resolve_sites(model, names)
        if saved is not None:
            losses = saved[0][f"losses.{label.lower()}"]
        else:
            losses = _eval_losses(model, cfg, seqs, n_eval, dev)
        mm = ModelMeasurement(
            spec.name or (Path(spec.path).name if spec.path else f"model {label}"),
            spec.path or "in-memory",
            shape,
            losses,
        )
        ds = []
        # The width of each site comes from one captured batch (module paths may be anything).
        probe = next(iter(ActivationSource(model, seqs(0, 1), names, progress=False)))
        for s in sites:
            m = probe[s.name].shape[-1]
            sae_dir = ck.sae_dir(label, s.name) if ck is not None else None
            d, desc = _resolve_dictionary(spec, s.name, m, model, cfg, train_seqs, progress, sae_dir, dev)
            d = d.to(dev)
            r = interference_split(d.W_dec.detach().float(), backend=cfg.backend)
            n_lat = d.W_dec.shape[0]
            mm.sites.append(
                SiteMeasurement(
                    s.name, s.layer if s.layer is not None else -1, m, desc,
                    ActivationStats(n_lat, cfg.activation_threshold, device=dev, backend=cfg.backend),
                    ActivationStats(m, 0.0, device=dev, backend=cfg.backend), 0.0,
                    r.dims.cpu(), r.max_abs_cos.cpu(), r.sum_dims, r.d_star, r.welch_bound, r.total_sq_cos,
                )
            )  # fmt: skip
            ds.append(d)
        mms.append(mm)
        dicts.append(ds)

    a, b = mms
    la = [s.layer for s in a.sites]
    lb = [s.layer for s in b.sites]
    depth_pairs = pair_by_depth(la, a.shape.n_layers, lb, b.shape.n_layers)
    all_pairs = [(i, j) for i in range(len(a.sites)) for j in range(len(b.sites))] if cfg.any_layer else depth_pairs

    def corr(i: int, j: int) -> CrossCorrelation:
        return CrossCorrelation(
            a.sites[i].stats.n_features, b.sites[j].stats.n_features, device=dev, backend=cfg.backend,
            precision=cfg.match_precision,
        )  # fmt: skip

    # Dense mode holds every co-moment; beyond match_max_bytes the match tokens' codes are
    # kept instead and each pair is matched in row blocks afterwards (tiled mode).
    need = sum(8 * a.sites[i].stats.n_features * b.sites[j].stats.n_features for i, j in [*all_pairs, *depth_pairs])
    tiled = need > cfg.match_max_bytes and cfg.match_tokens > 0
    cross = {} if tiled else {(i, j): corr(i, j) for (i, j) in all_pairs}
    baselines = {} if tiled else {p: corr(*p) for p in depth_pairs}
    kept = _Kept(
        {i: [] for i in range(len(a.sites))} if tiled else {}, {j: [] for j in range(len(b.sites))} if tiled else {}, []
    )

    # The statistics pass: global batches [0, n_batches), this rank's block [k_lo, k_hi).
    dict_hashes = {
        f"{label}.{s.site}": module_hash(d) for label, mm, ds in (("A", a, dicts[0]), ("B", b, dicts[1]))
        for s, d in zip(mm.sites, ds)
    }  # fmt: skip
    n_batches = math.ceil(n_stats / bs)
    k_lo, k_hi = shard_range(n_batches, rank, world)
    k = k_lo
    if saved is not None:
        state, meta = saved
        if meta.get("dictionaries") != dict_hashes:
            raise CheckpointMismatch(
                f"checkpoint {ck.state_path} was measured with other dictionaries than the ones "
                "resolved now (a dictionary file changed?); refusing to mix it in"
            )
        _restore_state(state, a, b, cross, baselines, kept, dev)
        k = int(meta["next_batch"])

    def save(next_batch: int) -> None:
        if ck is not None:
            ck.save_state(
                _state_tensors(a, b, cross, baselines, kept), {"next_batch": next_batch, "dictionaries": dict_hashes}
            )

    if saved is None:
        save(k)  # eval losses and dictionaries are done: a resumed run never redoes them
    stats_start = n_eval + n_train
    per_batch = bs * L  # tokens of a full batch (the pipeline keeps every position)
    names_a = [s.site for s in a.sites]
    names_b = [s.site for s in b.sites]
    first_seq, n_seq = k * bs, min(n_stats, k_hi * bs) - k * bs
    budget = cfg.stats_tokens - k * per_batch
    todo = max(0, min(n_seq * L, budget))
    done_before = min(k_hi * bs * L, cfg.stats_tokens) - k_lo * per_batch - todo
    bar = tqdm(
        total=max(0, done_before) + todo,
        initial=max(0, done_before),
        unit="tok",
        unit_scale=True,
        desc="statistics and matching",
        disable=not progress or rank != 0,
    )
    last_time, last_tokens = time.monotonic(), 0
    if todo > 0:
        batch_seqs = seqs(stats_start + first_seq, n_seq)
        src_a = ActivationSource(models[0], batch_seqs, names_a, max_tokens=todo, progress=False)
        src_b = ActivationSource(models[1], batch_seqs, names_b, max_tokens=todo, progress=False)
        with torch.no_grad():
            for ba, bb in zip(src_a, src_b):
                codes_a = _site_updates(a, dicts[0], ba)
                codes_b = _site_updates(b, dicts[1], bb)
                T = next(iter(ba.values())).shape[0]
                take = max(0, min(T, cfg.match_tokens - k * per_batch))
                if take:
                    gen = torch.Generator().manual_seed(_batch_seed(cfg.seed, k))
                    perm = torch.randperm(take, generator=gen).to(dev)
                    if tiled:
                        kept.keep(codes_a, codes_b, take, perm)
                    for (i, j), cc in cross.items():
                        _cross_update(cc, _rows(codes_a[i], slice(0, take)), _rows(codes_b[j], slice(0, take)))
                    for (i, j), bl in baselines.items():
                        _cross_update(bl, _rows(codes_a[i], slice(0, take)), _rows(codes_b[j], perm))
                k += 1
                last_tokens += T
                bar.update(T)
                due_tokens = checkpoint_every_tokens is not None and last_tokens >= checkpoint_every_tokens
                due_time = checkpoint_every_seconds is not None and (
                    time.monotonic() - last_time >= checkpoint_every_seconds
                )
                if due_tokens or due_time:
                    save(k)
                    last_time, last_tokens = time.monotonic(), 0
    bar.close()
    save(k_hi)  # the finished pass: resuming it only redoes the all-reduce and the analysis
    if world > 1:
        for s in a.sites + b.sites:
            s.stats.all_reduce()
            s.x_stats.all_reduce()
            s.sse = all_reduce_sum(s.sse, dev)
        for acc in list(cross.values()) + list(baselines.values()):
            acc.all_reduce()
    if tiled:
        cross, baselines = _match_tiled(cfg, a, b, all_pairs, depth_pairs, kept, progress and rank == 0, world > 1)
    pairs = [PairMeasurement(i, j, cross[(i, j)], baselines[(i, j)]) for (i, j) in depth_pairs]
    return Measurements(cfg, a, b, pairs, cross, str(dev), cfg.backend)


def _match_tiled(
    cfg: TestConfig,
    a: ModelMeasurement,
    b: ModelMeasurement,
    all_pairs: list[tuple[int, int]],
    depth_pairs: list[tuple[int, int]],
    kept: _Kept,
    progress: bool,
    distributed: bool,
) -> tuple[dict, dict]:
    """Each pair's best match (and its shuffled baseline) in row blocks over the kept codes
    (every rank's own, each block all-reduced when distributed)."""

    def stream(i: int, j: int, shuffled: bool):
        na, nb = a.sites[i].stats.n_features, b.sites[j].stats.n_features

        def batches():
            for ca, cb, perm in zip(kept.a[i], kept.b[j], kept.perms):
                cb = _rows(cb, perm) if shuffled else cb
                if isinstance(ca, tuple) and isinstance(cb, tuple):
                    yield (ca[0], ca[1], cb[0], cb[1])
                else:
                    yield (_dense(ca, na), _dense(cb, nb))

        return batches

    def match(i: int, j: int, shuffled: bool) -> TiledBestMatch:
        na, nb = a.sites[i].stats.n_features, b.sites[j].stats.n_features
        return best_match_tiled(
            stream(i, j, shuffled),
            na,
            nb,
            max_bytes=cfg.match_max_bytes,
            backend=cfg.backend,
            precision=cfg.match_precision,
            progress=progress,
            device=_device(cfg),
            distributed=distributed,
        )

    cross = {(i, j): match(i, j, False) for (i, j) in all_pairs}
    baselines = {(i, j): match(i, j, True) for (i, j) in depth_pairs}
    return cross, baselines


def _dictionary_choices(specs: list[ModelSpec]) -> set[str]:
    out: set[str] = set()
    for spec in specs:
        out |= set(spec.dictionary.values()) if isinstance(spec.dictionary, dict) else {spec.dictionary}
    return out


def _site_updates(mm: ModelMeasurement, dicts: list[FeatureBasis], batch: dict[str, torch.Tensor]) -> list[Codes]:
    """Update every site's statistics with one batch; return the codes per site."""
    out = []
    for s, d in zip(mm.sites, dicts):
        x = batch[s.site].float()
        codes = _encode(d, x)
        if isinstance(codes, tuple):
            s.stats.update_sparse(*codes)
            recon = d.decode_sparse(*codes)
        else:
            s.stats.update(codes)
            recon = None if isinstance(d, NeuronBasis) else d.decode(codes)
        s.x_stats.update(x)
        if recon is not None:
            s.sse += float((x - recon).double().pow(2).sum())
        out.append(codes)
    return out


# ----------------------------------------------------------------------------- analysis
def _est(e: S.Estimate) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(e).items()}


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def analyse(meas: Measurements, thresholds: Thresholds | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The report (a dict following docs/report-schema.md) and its arrays, from measurements."""
    cfg = meas.config
    th = thresholds or cfg.thresholds
    nb = cfg.bootstrap
    arrays: dict[str, torch.Tensor] = {}
    models, sites_out, per_model = {}, {}, {}
    for label, mm in (("A", meas.a), ("B", meas.b)):
        sh = mm.shape
        models[label] = {
            "name": mm.name,
            "source": mm.source,
            "architecture": sh.architecture,
            "n_layers": sh.n_layers,
            "d_model": sh.d_model,
            "d_ff": sh.d_ff,
            "n_heads": sh.n_heads,
            "vocab_size": sh.vocab_size,
            "non_embedding_params": sh.non_embedding_params,
            "kaplan_params": sh.kaplan_params,
            "aspect_ratio": sh.aspect_ratio,
            "eval_loss": _est(S.bootstrap(mm.losses, "mean", n_boot=nb, seed=cfg.seed)),
        }
        rows = []
        for s in mm.sites:
            dens = s.stats.density.cpu()
            alive = dens > th.density_floor
            n_alive = int(alive.sum())
            sigma = n_alive / s.m
            med = float(dens[alive].median()) if n_alive else math.nan
            p_star = S.predicted_density(sigma, th.C)
            gmed = S.g(med) if 0 < med < 1 else None
            total_var = float(s.x_stats.state_dict()["m2"].sum())
            rows.append(
                {
                    "model": label,
                    "site": s.site,
                    "layer": s.layer,
                    "depth": (s.layer + 1) / sh.n_layers if s.layer >= 0 else None,
                    "m": s.m,
                    "dictionary": s.dictionary,
                    "n_latents": s.stats.n_features,
                    "n_alive": n_alive,
                    "sigma": sigma,
                    "median_density": _num(med),
                    "g_median": _num(gmed) if gmed is not None else None,
                    "C_star": _num(S.bound_tightness(sigma, med)) if n_alive else None,
                    "p_star": p_star,
                    "pressure": sigma / th.C >= math.e,
                    "tokens": s.stats.n_tokens,
                    "mean_l0": s.stats.mean_l0,
                    "dims_sum": _num(s.sum_dims),
                    "d_star": _num(s.d_star),
                    "mean_max_abs_cos": float(s.max_abs_cos.mean()) if s.max_abs_cos.numel() else None,
                    "welch_bound": s.welch_bound,
                    "total_sq_cos": s.total_sq_cos,
                    "fvu": (s.sse / total_var) if (s.sse and total_var > 0) else None,
                }
            )
            arrays[f"density/{label}/{_clean(s.site)}"] = dens.double()
            arrays[f"dims/{label}/{_clean(s.site)}"] = s.dims.double()
        sites_out[label] = rows
        M = sum(r["m"] for r in rows)
        nsum = sum(r["n_alive"] for r in rows)
        per_model[label] = {
            "neurons_total": M,
            "features_total": nsum,
            "sigma_model": nsum / M if M else None,
            "sigma_mean_site": float(np.mean([r["sigma"] for r in rows])) if rows else None,
        }

    la, lb = meas.a.losses, meas.b.losses
    n = min(la.numel(), lb.numel())
    rel = S.paired_relative_difference(la[:n], lb[:n], n_boot=nb, seed=cfg.seed)
    # P1 and P2 are properties of the models; P3 compares the neurons of each site pair.
    model_premises = [
        S.premise_equal_params(
            meas.a.shape.non_embedding_params, meas.b.shape.non_embedding_params, th.params_tolerance
        ),
        S.premise_equal_performance(rel, th.loss_tolerance),
    ]
    pairs_out, verdicts = [], []
    premises_all = None
    for p in meas.pairs:
        sa_, sb_ = meas.a.sites[p.i], meas.b.sites[p.j]
        ra, rb = sites_out["A"][p.i], sites_out["B"][p.j]
        p3 = S.premise_different_neurons(sa_.m, sb_.m, per_model["A"]["neurons_total"], per_model["B"]["neurons_total"])
        premises = [*model_premises, p3]
        premises_all = premises_all or premises  # the report's premise table shows the first pair's P3
        bm = p.corr.best_match()
        blm = p.baseline.best_match() if p.baseline is not None else None
        pa = sa_.stats.density.cpu()
        pb = sb_.stats.density.cpu()
        alive_a = pa > th.density_floor
        alive_b = pb > th.density_floor

        def frac(mc: torch.Tensor, alive: torch.Tensor) -> float:
            return float((mc.cpu()[alive] >= th.tau).double().mean()) if bool(alive.any()) else 0.0

        def mean_on(mc: torch.Tensor, alive: torch.Tensor) -> float | None:
            return float(mc.cpu()[alive].mean()) if bool(alive.any()) else None

        mf_a, mf_b = frac(bm.max_corr_a, alive_a), frac(bm.max_corr_b, alive_b)
        bf_a = frac(blm.max_corr_a, alive_a) if blm else 0.0
        bf_b = frac(blm.max_corr_b, alive_b) if blm else 0.0
        match = bm.match_a.cpu()
        sel = alive_a & (bm.max_corr_a.cpu() >= th.tau) & (match >= 0)
        ii = sel.nonzero().flatten()
        jj = match[ii]
        ok = pb[jj] > 0
        ii, jj = ii[ok], jj[ok]
        logr = torch.log(pb[jj] / pa[ii])
        lr = S.bootstrap(logr, "median", n_boot=nb, seed=cfg.seed)
        pi = S.predicted_ratio(ra["sigma"], rb["sigma"], th.C)
        v = S.site_verdict(premises, mf_a, bf_a, lr, pi, phi=th.phi)
        verdicts.append(v)
        key = f"{_clean(sa_.site)}__{_clean(sb_.site)}"
        arrays[f"max_corr/{key}/a"] = bm.max_corr_a.cpu().double()
        arrays[f"max_corr/{key}/b"] = bm.max_corr_b.cpu().double()
        if blm is not None:
            arrays[f"baseline_corr/{key}/a"] = blm.max_corr_a.cpu().double()
            arrays[f"baseline_corr/{key}/b"] = blm.max_corr_b.cpu().double()
        arrays[f"matched/{key}/p_a"] = pa[ii].double()
        arrays[f"matched/{key}/p_b"] = pb[jj].double()
        pairs_out.append(
            {
                "site_a": sa_.site,
                "site_b": sb_.site,
                "depth_a": ra["depth"],
                "depth_b": rb["depth"],
                "tokens": p.corr.n_tokens,
                "match_mode": p.corr.mode if isinstance(p.corr, TiledBestMatch) else "dense",
                "mean_max_corr_a": mean_on(bm.max_corr_a, alive_a),
                "mean_max_corr_b": mean_on(bm.max_corr_b, alive_b),
                "baseline_mean_max_corr_a": mean_on(blm.max_corr_a, alive_a) if blm else None,
                "baseline_mean_max_corr_b": mean_on(blm.max_corr_b, alive_b) if blm else None,
                "matched_fraction_a": mf_a,
                "matched_fraction_b": mf_b,
                "baseline_fraction_a": bf_a,
                "baseline_fraction_b": bf_b,
                "n_matched": int(ii.numel()),
                "median_log_ratio": _est(lr),
                "predicted_ratio": pi,
                "log_predicted_ratio": math.log(pi) if pi else None,
                "verdict": asdict(v),
            }
        )

    any_layer = []
    if cfg.any_layer and meas.cross:
        for i, s in enumerate(meas.a.sites):
            alive = s.stats.density.cpu() > th.density_floor
            scores = {}
            fracs = {}
            for j, sb_ in enumerate(meas.b.sites):
                cc = meas.cross.get((i, j))
                if cc is None:
                    continue
                mc = cc.best_match().max_corr_a.cpu()
                scores[sb_.site] = float(mc[alive].mean()) if bool(alive.any()) else None
                fracs[sb_.site] = float((mc[alive] >= th.tau).double().mean()) if bool(alive.any()) else 0.0
            if scores:
                best = max(scores, key=lambda k: -1.0 if scores[k] is None else scores[k])
                any_layer.append(
                    {"site_a": s.site, "best_site_b": best, "mean_max_corr": scores, "matched_fraction": fracs[best]}
                )

    overall = S.overall_verdict(verdicts)
    if premises_all is None:  # no pairs: still report the model-level premises
        premises_all = model_premises
    cfg_dict = cfg.to_dict()
    cfg_dict["thresholds"] = asdict(th)
    cfg_dict["C"] = th.C
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "library": _library_info(meas),
        "config": cfg_dict,
        "verdict": asdict(overall),
        "premises": [asdict(p) for p in premises_all],
        "models": models,
        "per_model": per_model,
        "sites": sites_out,
        "pairs": pairs_out,
        "any_layer": any_layer,
        "notes": [
            "Features n_s are dictionary latents whose firing density exceeds the density floor "
            f"({th.density_floor:g}); a latent fires on a token when its code exceeds {cfg.activation_threshold:g}.",
            "σ = n_s / m_s per site; per model, σ = Σ_s n_s / Σ_s m_s (both neuron conventions are reported).",
            "Correlations are Pearson over the same tokens; the baseline correlates A with B's codes on "
            "randomly permuted tokens, so matches above it are more than chance.",
            "r = ln(p_B(j)/p_A(i)) over matched pairs (ρ* ≥ τ, both densities positive); its median has a "
            f"bootstrap CI ({nb} resamples).",
            "π = g⁻¹(σ_B/C) / g⁻¹(σ_A/C) on the sparse branch of g(p) = −1/(p ln p); null where σ/C < e "
            "(no superposition pressure).",
            "Eval loss: mean next-token cross-entropy in nats over the eval tokens; P2 uses a paired bootstrap "
            "of the relative difference (B − A)/A.",
        ],
    }
    return _sanitize(report), arrays


def _library_info(meas: Measurements) -> dict:
    from . import __version__

    return {
        "supanalysis": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": meas.device,
        "backend": meas.backend or os.environ.get("SUPANALYSIS_BACKEND", "auto"),
    }


def _sanitize(obj):
    """NaN / inf -> None, tuples -> lists: the report schema forbids NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- entry point
@dataclass
class TestReport:
    """The outcome of :func:`run_test`: the report dict, its arrays, and the measurements."""

    __test__ = False  # not a pytest test class, despite the name

    data: dict
    arrays: dict[str, torch.Tensor]
    measurements: Measurements | None = None

    @property
    def verdict(self) -> dict:
        return self.data["verdict"]

    def reanalyse(self, thresholds: Thresholds) -> TestReport:
        """The same measurements under other thresholds (no model is run again)."""
        if self.measurements is None:
            raise ValueError("this report was loaded from disk without its measurements")
        data, arrays = analyse(self.measurements, thresholds)
        return TestReport(data, arrays, self.measurements)

    def to_json(self) -> dict:
        return self.data

    def to_markdown(self) -> str:
        from .report import render_markdown

        return render_markdown(self.data)

    def to_html(self) -> str:
        from .report import render_html

        return render_html(self.data, self.arrays)

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        from .report import write_report

        return write_report(folder, self.data, self.arrays)


def run_test(
    config: TestConfig | str | os.PathLike,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    *,
    progress: bool = True,
    **checkpointing,
) -> TestReport:
    """Measure and analyse; ``config`` is a :class:`TestConfig` or a TOML/JSON file.

    ``checkpointing``: ``checkpoint_dir``, ``resume``, ``checkpoint_every_tokens``,
    ``checkpoint_every_seconds`` as in :func:`measure`. Inside a torch.distributed process
    group every rank returns the same report (write it from rank 0).
    """
    cfg = config if isinstance(config, TestConfig) else TestConfig.load(config)
    meas = measure(cfg, model_a, model_b, progress=progress, **checkpointing)
    data, arrays = analyse(meas)
    return TestReport(data, arrays, meas)
