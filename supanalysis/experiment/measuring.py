"""The measurement pass: everything that touches activations, threshold-independent.

One shared pass of the same tokens through both models feeds every accumulator:

    plan (models, token slices, sites)  ->  eval losses per model
    -> a feature basis per site (given, trained, or neurons) and its decoder geometry
    -> statistics batches: codes -> ActivationStats per site, CrossCorrelation per site pair
       (or the codes kept for tiled matching), checkpointed as it goes
    -> all-reduce across ranks -> Measurements
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..accumulators import ActivationStats, CrossCorrelation
from ..capture import ActivationSource
from ..config import ModelSpec, TestConfig
from ..dictionary import NeuronBasis
from ..dictionary.base import FeatureBasis
from ..distributed import all_reduce_sum, interference_split, rank_world, shard_range
from ..models import describe
from ..sites import resolve_sites
from .features import Codes, encode, resolve_dictionary, seed_ceiling_best, site_choice
from .losses import eval_losses
from .matching import batch_seed, dense_correlations, is_tiled, match_tiled, update_dense
from .measurements import (
    FamilyMeasurement,
    Matcher,
    Measurements,
    ModelMeasurement,
    PairMeasurement,
    SiteMeasurement,
    SitePair,
)
from .plan import (
    TokenPlan,
    grid_pairs,
    model_grid_sites,
    open_models,
    open_token_file,
    pair_by_depth,
    plan_pairs,
    plan_tokens,
    run_device,
    site_names,
)
from .state import (
    CheckpointMismatch,
    Kept,
    MeasureCheckpoint,
    PassState,
    module_hash,
    open_checkpoint,
    releases_checkpoints,
)
from .timing import StageClock

Saved = tuple[dict[str, torch.Tensor], dict] | None  # a rank's checkpointed tensors and metadata


@releases_checkpoints  # the checkpoint folder's lock ends with the call, returned or raised
def measure(
    cfg: TestConfig,
    model_a: nn.Module | None = None,
    model_b: nn.Module | None = None,
    *,
    models: list[nn.Module | None] | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every_tokens: int | None = None,
    checkpoint_every_seconds: float | None = 600.0,
    clock: StageClock | None = None,
) -> Measurements:
    """Run every model over the tokens and fill every accumulator (see the module docstring).

    ``models``: the family's modules in config order (None entries are loaded from their
    folders); ``model_a``/``model_b`` are the two-model shorthand.

    Distributed (inside a torch.distributed process group, e.g. under torchrun): each rank
    takes a contiguous share of the eval sequences, of the dictionaries' rows for the
    interference, and of the statistics batches; the accumulators then all-reduce exactly,
    so every rank returns what one process would (to float64 rounding). Dictionaries
    trained here are trained on rank 0 and broadcast.

    Checkpoints (``checkpoint_dir``): the statistics pass saves every rank's accumulators
    and its position every ``checkpoint_every_tokens`` tokens or ``checkpoint_every_seconds``
    seconds, whichever comes first, and at the end; ``resume=True`` continues from there
    and gives the same measurements as an uninterrupted run. See :mod:`.state`.

    ``clock``: each stage's wall time, tokens and peak memory are recorded on it (see :mod:`.timing`).
    """
    if checkpoint_every_tokens is not None and checkpoint_every_tokens < 1:
        raise ValueError(f"checkpoint_every_tokens must be positive, got {checkpoint_every_tokens}")
    rank, world = rank_world()
    dev = run_device(cfg)
    clock = clock if clock is not None else StageClock(dev)
    with clock.stage("plan"):
        tokens = open_token_file(cfg)
    specs = cfg.model_specs()
    given = models if models is not None else ([model_a, model_b] if not cfg.models else [None] * len(specs))
    with clock.stage("load_models"):
        mods = open_models(cfg, list(given), dev)
    ia, ib = cfg.primary_pair()
    order = [ia, ib, *(k for k in range(len(specs)) if k not in (ia, ib))]
    with clock.stage("plan"):
        plan = plan_tokens(cfg, tokens, mods)
    ck, saved = (None, None)
    if checkpoint_dir is not None:
        ck, saved = open_checkpoint(checkpoint_dir, cfg, tokens, [mods[k] for k in order], resume)
    keys = {ia: "A", ib: "B", **{k: f"M{k}" for k in order[2:]}}
    measured = {k: measure_model(specs[k], mods[k], keys[k], cfg, plan, ck, saved, progress, dev, clock) for k in order}
    a, b = measured[ia][0], measured[ib][0]
    mms = [measured[k][0] for k in range(len(specs))]
    grid = model_grid_sites(mms) if len(mms) > 2 else None
    on_grid = grid_pairs(grid[ia], grid[ib]) if grid else []
    layers = ([s.layer for s in a.sites], a.shape.n_layers, [s.layer for s in b.sites], b.shape.n_layers)
    pairs = plan_pairs(cfg, *layers, grid=on_grid)
    tiled = is_tiled(cfg, a, b, pairs)
    family = family_correlations(cfg, mms, (ia, ib), grid, dev)
    state = PassState(
        a,
        b,
        {} if tiled else dense_correlations(cfg, a, b, pairs.all, dev),
        {} if tiled else dense_correlations(cfg, a, b, pairs.depth, dev),
        Kept.for_sites(len(a.sites), len(b.sites), tiled),
        {k: measured[k][0] for k in order[2:]},
        family,
    )
    stats = StatisticsPass(cfg, plan, [mods[k] for k in order], [measured[k][1] for k in order], state, tiled, dev,
                           clock)  # fmt: skip
    saver = Saver(ck, state, stats.dictionary_hashes(), checkpoint_every_tokens, checkpoint_every_seconds, clock)
    with clock.stage("statistics") as st:
        stats.run(saved, saver, progress)
        st.count(stats.measured)
    if world > 1:
        with clock.stage("all_reduce"):
            all_reduce(state, dev)
    cross, baselines = state.cross, state.baselines
    if tiled:
        with clock.stage("tiled_matching", sum(p.numel() for p in state.kept.perms)):
            cross, baselines = match_tiled(cfg, a, b, pairs, state.kept, progress and rank == 0, world > 1)
    depth = [PairMeasurement(i, j, cross[(i, j)], baselines[(i, j)]) for (i, j) in pairs.depth]
    primary_cross = {ij: cross[ij] for ij in sorted(set(pairs.depth) | set(on_grid))}
    fam = family_measurement(cfg, mms, (ia, ib), family, primary_cross)
    return Measurements(cfg, a, b, depth, cross, str(dev), cfg.backend, fam)


def family_correlations(
    cfg: TestConfig,
    mms: list[ModelMeasurement],
    primary: tuple[int, int],
    grid: list[list[int]] | None,
    device: torch.device,
) -> dict[tuple[int, int], dict[SitePair, CrossCorrelation]]:
    """One empty cross-correlation per site pair of every model pair but the primary: the
    depth pairs, and every pair of grid sites (``grid``: per model, its grid sites).

    These are always dense (no baseline, no any-layer): their co-moments must fit ``match_max_bytes``.
    """
    out: dict[tuple[int, int], dict[SitePair, CrossCorrelation]] = {}
    need = 0
    for x in range(len(mms)):
        for y in range(x + 1, len(mms)):
            if (x, y) == tuple(sorted(primary)):
                continue
            mx, my = mms[x], mms[y]
            depth = pair_by_depth([s.layer for s in mx.sites], mx.shape.n_layers,
                                  [s.layer for s in my.sites], my.shape.n_layers)  # fmt: skip
            wanted = sorted(set(depth) | set(grid_pairs(grid[x], grid[y]) if grid else ()))
            need += sum(8 * mx.sites[i].stats.n_features * my.sites[j].stats.n_features for i, j in wanted)
            out[(x, y)] = dense_correlations(cfg, mx, my, wanted, device)
    if need > cfg.match_max_bytes:
        raise ValueError(
            f"the family's cross-correlations need {need:,} bytes, more than match_max_bytes = "
            f"{cfg.match_max_bytes:,}: raise it, or compare fewer models or sites"
        )
    return out


def family_measurement(
    cfg: TestConfig,
    mms: list[ModelMeasurement],
    primary: tuple[int, int],
    family: dict[tuple[int, int], dict[SitePair, CrossCorrelation]],
    primary_cross: dict[SitePair, Matcher],
) -> FamilyMeasurement:
    """The family's models and every pair's correlations (the primary pair's: its depth and grid pairs)."""
    specs = cfg.model_specs()
    shapes = [s.shape_label(k) for k, s in enumerate(specs)]
    cross: dict[tuple[int, int], dict[SitePair, Matcher]] = dict(family)
    ia, ib = primary  # ia < ib: A is the first model (TestConfig.primary_pair)
    cross[(ia, ib)] = dict(primary_cross)
    return FamilyMeasurement(mms, shapes, [s.seed for s in specs], family_labels(shapes, primary), primary, cross)


def family_labels(shapes: list[str], primary: tuple[int, int]) -> list[str]:
    """A letter per shape (A for the primary A's, B for B's, then C, D, ... in config order),
    a prime per further seed of that shape: A, A', B, B', ..."""
    letters: dict[str, str] = {shapes[primary[0]]: "A", shapes[primary[1]]: "B"}
    for sh in shapes:
        letters.setdefault(sh, chr(ord("A") + len(letters)) if len(letters) < 26 else f"S{len(letters)}")
    seen: dict[str, int] = {}
    out = []
    for sh in shapes:
        out.append(letters[sh] + "'" * seen.get(sh, 0))
        seen[sh] = seen.get(sh, 0) + 1
    return out


def measure_model(
    spec: ModelSpec,
    model: nn.Module,
    label: str,
    cfg: TestConfig,
    plan: TokenPlan,
    ck: MeasureCheckpoint | None,
    saved: Saved,
    progress: bool,
    device: torch.device,
    clock: StageClock,
) -> tuple[ModelMeasurement, list[FeatureBasis]]:
    """One model's eval losses (or the checkpoint's), and every site with its feature basis."""
    shape = describe(model)
    names = site_names(spec, model)
    sites = resolve_sites(model, names)
    if saved is not None:
        losses = saved[0][f"losses.{label.lower()}"]
    else:
        with clock.stage("eval_losses") as st:
            losses = eval_losses(model, plan.seqs, plan.n_eval, cfg.eval_tokens, device)
            st.count(losses.numel())
    name = spec.name or (Path(spec.path).name if spec.path else f"model {label}")
    mm = ModelMeasurement(name, spec.path or "in-memory", shape, losses)
    dicts = []
    # The width of each site comes from one captured batch (module paths may be anything).
    probe = next(iter(ActivationSource(model, plan.seqs(0, 1), names, progress=False)))
    for s in sites:
        m = probe[s.name].shape[-1]
        sae_dir = ck.sae_dir(label, s.name) if ck is not None else None
        trains = site_choice(spec, s.name) == "train"
        with clock.stage("sae_training" if trains else "dictionaries", cfg.sae.tokens if trains else None):
            d, desc = resolve_dictionary(spec, s.name, m, model, cfg, plan.train_seqs, sae_dir, progress, device)
            d = d.to(device)
        with clock.stage("geometry"):
            site = new_site(cfg, s.name, s.layer if s.layer is not None else -1, m, desc, d, device)
        if trains and cfg.sae.seed_ceiling and label in ("A", "B"):  # the sites the report tabulates
            with clock.stage("seed_ceiling", cfg.sae.tokens):
                held_out = plan.seqs(plan.stats_start, plan.n_stats)
                site.seed_best = seed_ceiling_best(d, s.name, m, model, cfg, plan.train_seqs, held_out, sae_dir,
                                                   progress, device)  # fmt: skip
        convention = getattr(d, "capture_convention", None)
        site.capture_convention = convention.as_dict() if convention is not None else None
        mm.sites.append(site)
        dicts.append(d)
    return mm, dicts


def new_site(
    cfg: TestConfig, site: str, layer: int, m: int, desc: str, d: FeatureBasis, device: torch.device
) -> SiteMeasurement:
    """A site with empty statistics and its dictionary's decoder geometry (interference)."""
    r = interference_split(d.W_dec.detach().float(), backend=cfg.backend)
    n_lat = d.W_dec.shape[0]
    return SiteMeasurement(
        site, layer, m, desc,
        ActivationStats(n_lat, cfg.activation_threshold, device=device, backend=cfg.backend),
        ActivationStats(m, 0.0, device=device, backend=cfg.backend), 0.0,
        r.dims.cpu(), r.max_abs_cos.cpu(), r.sum_dims, r.d_star, r.welch_bound, r.total_sq_cos,
    )  # fmt: skip


def site_updates(mm: ModelMeasurement, dicts: list[FeatureBasis], batch: dict[str, torch.Tensor]) -> list[Codes]:
    """Update every site's statistics with one batch ``{site: [T, m]}``; return the codes per site."""
    out = []
    for s, d in zip(mm.sites, dicts):
        x = batch[s.site].float()
        codes = encode(d, x)
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


def all_reduce(state: PassState, device: torch.device) -> None:
    """Sum every rank's accumulators (exact merges; every rank then holds the whole)."""
    for _, mm in state.labelled_models():
        for s in mm.sites:
            s.stats.all_reduce()
            s.x_stats.all_reduce()
            s.sse = all_reduce_sum(s.sse, device)
    accs = [*state.cross.values(), *state.baselines.values(), *(cc for _, cc in state.family_accumulators())]
    for acc in accs:
        acc.all_reduce()


@dataclass
class Saver:
    """Checkpoints the pass (when a folder was given) every so many tokens or seconds."""

    ck: MeasureCheckpoint | None
    state: PassState
    dictionaries: dict[str, str]
    every_tokens: int | None
    every_seconds: float | None
    clock: StageClock = field(default_factory=StageClock)
    last_time: float = field(default_factory=time.monotonic)
    last_tokens: int = 0

    def save(self, next_batch: int) -> None:
        if self.ck is not None:
            meta = {"next_batch": next_batch, "dictionaries": self.dictionaries}
            with self.clock.stage("statistics.checkpoint"):
                self.ck.save_state(self.state.tensors(), meta)

    def restart_clock(self) -> None:
        self.last_time, self.last_tokens = time.monotonic(), 0

    def tick(self, tokens: int, next_batch: int) -> None:
        """``tokens`` more were measured; save when a checkpoint is due."""
        self.last_tokens += tokens
        due_tokens = self.every_tokens is not None and self.last_tokens >= self.every_tokens
        due_time = self.every_seconds is not None and time.monotonic() - self.last_time >= self.every_seconds
        if due_tokens or due_time:
            self.save(next_batch)
            self.restart_clock()


@dataclass
class StatisticsPass:
    """This rank's share of the statistics batches: global batches [0, n_batches), this
    rank's block [k_lo, k_hi)."""

    cfg: TestConfig
    plan: TokenPlan
    models: list[nn.Module]
    dicts: list[list[FeatureBasis]]
    state: PassState
    tiled: bool
    device: torch.device
    clock: StageClock = field(default_factory=StageClock)
    measured: int = 0  # statistics tokens measured by this run (not restored from a checkpoint)

    @property
    def mms(self) -> list[ModelMeasurement]:
        """The models' measurements in the pass's order: A, B, then the rest of the family."""
        return [self.state.a, self.state.b, *self.state.others.values()]

    def dictionary_hashes(self) -> dict[str, str]:
        labels = ["A", "B", *(f"M{k}" for k in self.state.others)]
        return {
            f"{label}.{s.site}": module_hash(d)
            for label, mm, ds in zip(labels, self.mms, self.dicts)
            for s, d in zip(mm.sites, ds)
        }

    def run(self, saved: Saved, saver: Saver, progress: bool) -> None:
        """Measure every batch of this rank's block not yet in the checkpoint, saving as it goes."""
        rank, world = rank_world()
        k_lo, k_hi = shard_range(math.ceil(self.plan.n_stats / self.plan.batch_size), rank, world)
        k = k_lo
        if saved is not None:
            k = self.resume(saved, saver)
        else:
            saver.save(k)  # eval losses and dictionaries are done: a resumed run never redoes them
        self.stream(k, k_lo, k_hi, saver, progress and rank == 0)
        saver.save(k_hi)  # the finished pass: resuming it only redoes the all-reduce and the analysis

    def resume(self, saved: tuple[dict[str, torch.Tensor], dict], saver: Saver) -> int:
        """Restore the checkpointed accumulators; return the next batch to measure."""
        tensors, meta = saved
        if meta.get("dictionaries") != saver.dictionaries:
            raise CheckpointMismatch(
                f"checkpoint {saver.ck.state_path} was measured with other dictionaries than the ones "
                "resolved now (a dictionary file changed?); refusing to mix it in"
            )
        self.state.restore(tensors, self.device)
        return int(meta["next_batch"])

    def stream(self, k: int, k_lo: int, k_hi: int, saver: Saver, progress: bool) -> None:
        """Batches k .. k_hi - 1 (every position of a batch is kept: bs · L tokens a batch)."""
        cfg, bs, L = self.cfg, self.plan.batch_size, self.plan.seq_len
        first_seq, n_seq = k * bs, min(self.plan.n_stats, k_hi * bs) - k * bs
        todo = max(0, min(n_seq * L, cfg.stats_tokens - k * bs * L))
        done_before = max(0, min(k_hi * bs * L, cfg.stats_tokens) - k_lo * bs * L - todo)
        bar = tqdm(total=done_before + todo, initial=done_before, unit="tok", unit_scale=True,
                   desc="statistics and matching", disable=not progress)  # fmt: skip
        saver.restart_clock()
        if todo > 0:
            seqs = self.plan.seqs(self.plan.stats_start + first_seq, n_seq)
            sources = [
                ActivationSource(model, seqs, [s.site for s in mm.sites], max_tokens=todo, progress=False)
                for model, mm in zip(self.models, self.mms)
            ]
            with torch.no_grad():
                for batches in self.forwards(zip(*sources)):
                    T = self.batch(list(batches), k)
                    k += 1
                    self.measured += T
                    bar.update(T)
                    saver.tick(T, k)
        bar.close()

    def forwards(self, batches: Iterator[tuple[dict[str, torch.Tensor], ...]]) -> Iterator[tuple]:
        """``batches``, each one's forwards and captures timed as "statistics.forward" (the
        exhausted last call included)."""
        while True:
            with self.clock.stage("statistics.forward", per_batch=True) as st:
                item = next(batches, None)
                if item is not None:
                    st.count(next(iter(item[0].values())).shape[0])
            if item is None:
                return
            yield item

    def batch(self, batches: list[dict[str, torch.Tensor]], k: int) -> int:
        """Global batch ``k`` (one ``{site: [T, m]}`` per model, same tokens): statistics of
        every site, then the match tokens into the pairs."""
        T = next(iter(batches[0].values())).shape[0]
        with self.clock.stage("statistics.codes", T, per_batch=True):
            codes = [site_updates(mm, ds, b) for mm, ds, b in zip(self.mms, self.dicts, batches)]
        codes_a, codes_b = codes[0], codes[1]
        take = max(0, min(T, self.cfg.match_tokens - k * self.plan.batch_size * self.plan.seq_len))
        if take:
            with self.clock.stage("statistics.matching", take, per_batch=True):
                gen = torch.Generator().manual_seed(batch_seed(self.cfg.seed, k))
                perm = torch.randperm(take, generator=gen).to(self.device)
                if self.tiled:
                    self.state.kept.keep(codes_a, codes_b, take, perm)
                update_dense(self.state.cross, self.state.baselines, codes_a, codes_b, take, perm)
                self.family_updates(codes, take)
        return T

    def family_updates(self, codes: list[list[Codes]], take: int) -> None:
        """The match tokens into every further model pair (dense, no baseline)."""
        if not self.state.family:
            return
        by_index = dict(zip(self.order, codes))
        for (x, y), ccs in self.state.family.items():
            update_dense(ccs, {}, by_index[x], by_index[y], take, torch.empty(0))

    @property
    def order(self) -> list[int]:
        """Config index of each model in the pass's order."""
        ia, ib = self.cfg.primary_pair()
        return [ia, ib, *self.state.others]
