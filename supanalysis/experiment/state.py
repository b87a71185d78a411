"""Checkpoints of the test's measurement pass: what was measured so far, and for which run.

A checkpoint folder belongs to exactly one run. ``fingerprint.json`` (written first) names
it: the measurement-relevant config (not the analysis thresholds), the token file, the
weights of both models, and the world size. Every rank then keeps its own
``measure.rank{r}.safetensors``: its accumulators, its position in the token stream (the
next global batch), the eval losses; and the trained dictionaries' own training
checkpoints live under ``sae/``. Writes are durable and atomic (:mod:`supanalysis.durable`),
so a kill at any instant leaves the previous checkpoint intact. A folder from another run, or a
corrupt file, is refused with the reason, never mixed in; ``fingerprint.json`` carries a
checksum of itself. While a run is using the folder, its rank 0 holds an advisory lock on
``lock`` there, so a second run on the same folder is refused at once; the kernel drops the
lock when the process dies, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..accumulators import CrossCorrelation
from ..accumulators._state import atomic_save, load_file_checked
from ..config import TestConfig
from ..distributed import agree, rank_world
from ..durable import (
    LOCK_FILE,
    FolderLock,
    FolderLocked,
    is_temp,
    read_checked_json,
    remove_stale_temps,
    with_checksum,
    write_text,
)
from .features import Codes, take_rows
from .measurements import ModelMeasurement, SitePair

KIND = "supanalysis.MeasureCheckpoint"
FINGERPRINT_FILE = "fingerprint.json"
ANALYSIS_ONLY = ("thresholds", "bootstrap", "device")  # changing these never changes a measurement
# Fields added after checkpoints were first written, with the value every older run had:
# left out of the fingerprint at that value, so older checkpoints still resume.
ADDED_WITH_DEFAULT = {"match_precision": "ieee", "models": []}
SPEC_ADDED_WITH_DEFAULT = {"shape": "", "seed": ""}
SAE_ADDED_WITH_DEFAULT = {"seed_ceiling": False}


class CheckpointMismatch(ValueError):
    """A checkpoint exists but was written by another run (or is unreadable)."""


class CheckpointInUse(CheckpointMismatch):
    """Another run, still alive, is using the checkpoint folder."""


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_hash(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, torch.Tensor):
            _hash_tensor(h, name, t)
    return h.hexdigest()


#: bytes hashed per step of the token hash (bounds the copy a memory-mapped file needs)
TOKEN_HASH_CHUNK = 64 << 20


def token_file_hash(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """sha256 of every token (with count and dtype): a file edited anywhere, even in the
    middle at the same size, belongs to another run. Streamed in chunks (~1 GB/s)."""
    raw = np.asarray(tokens).reshape(-1).view(np.uint8)
    h = hashlib.sha256(f"{raw.size}|{tokens.dtype}|".encode())
    for lo in range(0, raw.size, TOKEN_HASH_CHUNK):
        h.update(raw[lo : lo + TOKEN_HASH_CHUNK].tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: TestConfig, tokens: np.ndarray, models: Iterable[nn.Module], world: int) -> dict[str, str]:
    """Component hashes naming one measurement run (see the module docstring)."""
    conf = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ANALYSIS_ONLY and not (k in ADDED_WITH_DEFAULT and v == ADDED_WITH_DEFAULT[k])
    }
    for k in ("model_a", "model_b"):
        conf[k] = {f: v for f, v in conf[k].items() if SPEC_ADDED_WITH_DEFAULT.get(f, object()) != v}
    if isinstance(conf.get("sae"), dict):
        conf["sae"] = {f: v for f, v in conf["sae"].items() if SAE_ADDED_WITH_DEFAULT.get(f, object()) != v}
    # models: primary A, primary B, then the rest of the family in config order.
    a, b, *rest = list(models)
    out = {
        "config": hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest(),
        "tokens": token_file_hash(cfg.tokens, tokens),
        "model_a": module_hash(a),
        "model_b": module_hash(b),
        "world_size": str(world),
    }
    out.update({f"model_{n + 2}": module_hash(m) for n, m in enumerate(rest)})
    return out


def _describe_mismatch(found: Mapping[str, str], want: Mapping[str, str]) -> str:
    what = {
        "config": "the measurement settings (config)",
        "tokens": "the token file",
        "model_a": "model A's weights",
        "model_b": "model B's weights",
        "world_size": "the number of ranks",
    }
    diff = [what.get(k, k) for k in sorted(set(found) | set(want)) if found.get(k) != want.get(k)]
    return ", ".join(diff)


def _read_fingerprint(path: Path) -> tuple[dict, bool]:
    """(the fingerprint a folder names, whether it carried a checksum), or CheckpointMismatch.

    One without a checksum (written before fingerprints had one) is still this run's when every
    field equals this run's: that comparison vouches for each byte a checksum would.
    """
    how = "delete the folder, or use another one, to start the run afresh"
    try:
        return read_checked_json(path)
    except (ValueError, OSError) as exc:
        raise CheckpointMismatch(
            f"checkpoint {path} is corrupt or unreadable ({exc}); refusing to resume from it: {how}"
        ) from exc


_OPEN_SCOPES = threading.local()


def _scopes() -> list[list[MeasureCheckpoint]]:
    if not hasattr(_OPEN_SCOPES, "stack"):
        _OPEN_SCOPES.stack = []
    return _OPEN_SCOPES.stack


def releases_checkpoints(fn: Callable) -> Callable:
    """Decorate a function that opens checkpoint folders: every folder it opened (on this
    thread) is closed, its lock released, when it returns or raises. Without this a lock lasts
    until :meth:`MeasureCheckpoint.close` or until the checkpoint object is collected, and an
    exception's traceback can keep that object alive long after the run ended."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        opened: list[MeasureCheckpoint] = []
        _scopes().append(opened)
        try:
            return fn(*args, **kwargs)
        finally:
            _scopes().pop()
            for ck in opened:
                ck.close()

    return wrapper


class MeasureCheckpoint:
    """The checkpoint folder of one run, seen from one rank.

    ``open`` binds the folder to the run's fingerprint: a fresh folder gets it written; a
    folder holding another run's checkpoint is refused; one holding this run's is resumed
    only when ``resume`` is true (otherwise refused, so two runs never mix silently).
    In a distributed run rank 0 opens first; the other ranks then ``join`` (the folder must
    be this run's, or absent on a node that does not share rank 0's filesystem).

    Rank 0's ``open`` also takes the folder's lock (refusing, with :class:`CheckpointInUse`,
    a folder another live run holds); the ranks of one run share it. :meth:`close` (or
    ``with``, or :func:`releases_checkpoints` around the run) releases it.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: Mapping[str, str], rank: int, world: int) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.rank, self.world = rank, world
        self._lock: FolderLock | None = None

    @property
    def state_path(self) -> Path:
        return self.folder / f"measure.rank{self.rank}.safetensors"

    def sae_dir(self, label: str, site: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in site)
        return self.folder / "sae" / f"{label}.{safe}"

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        fingerprint: Mapping[str, str],
        rank: int,
        world: int,
        resume: bool,
        join: bool = False,
    ) -> MeasureCheckpoint:
        ck = cls(folder, fingerprint, rank, world)
        if join:
            ck._bind(resume, join=True)
            return ck
        ck._refuse_foreign()  # before locking, so no lock file is left in someone else's folder
        try:
            ck._lock = FolderLock(ck.folder)
        except FolderLocked as exc:
            raise CheckpointInUse(
                f"checkpoint folder {ck.folder} is in use by another run ({exc.holder or 'holder unknown'}); "
                "two runs never share a checkpoint folder: wait for that run to end, or use another folder"
            ) from None
        try:
            remove_stale_temps(ck.folder)  # under the lock, every temp file is a killed writer's
            ck._bind(resume, join=False)
        except BaseException:
            ck.close()
            raise
        if _scopes():
            _scopes()[-1].append(ck)
        return ck

    def close(self) -> None:
        """Release the folder's lock (rank 0); the checkpoint's files stay. Safe to repeat."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> MeasureCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse_foreign(self) -> None:
        if (self.folder / FINGERPRINT_FILE).is_file():
            return
        # A writer killed before its rename leaves only a temp file: not a checkpoint.
        if self.folder.is_dir() and any(p.name != LOCK_FILE and not is_temp(p) for p in self.folder.iterdir()):
            raise CheckpointMismatch(
                f"checkpoint folder {self.folder} is not empty and holds no {FINGERPRINT_FILE}; "
                "refusing to write into it"
            )

    def _bind(self, resume: bool, join: bool) -> None:
        """Check the folder's fingerprint against this run's, or write it into a fresh folder."""
        fp_path = self.folder / FINGERPRINT_FILE
        if not fp_path.is_file():
            if not join:
                self._refuse_foreign()  # again, now under the lock
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_fingerprint()
            return
        found, checked = _read_fingerprint(fp_path)
        if found != self.fingerprint:
            raise CheckpointMismatch(
                f"checkpoint folder {self.folder} belongs to another run (differs in: "
                f"{_describe_mismatch(found, self.fingerprint)}); refusing to mix it in. "
                "Use another checkpoint folder or delete this one."
            )
        if not resume and not join:
            raise CheckpointMismatch(
                f"checkpoint folder {self.folder} already holds this run's checkpoint; pass resume=True "
                "(--resume) to continue it, or use another folder"
            )
        if not checked and not join:
            self._write_fingerprint()  # an older folder's: equal to this run's, now checksummed

    def _write_fingerprint(self) -> None:
        text = json.dumps(with_checksum(self.fingerprint), indent=2, sort_keys=True) + "\n"
        write_text(self.folder / FINGERPRINT_FILE, text)

    def load_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """This rank's saved state and metadata, or None when there is none yet."""
        if not self.state_path.is_file():
            return None
        try:
            tensors, meta = load_file_checked(self.state_path, KIND)
        except ValueError as exc:
            raise CheckpointMismatch(f"checkpoint {self.state_path} is corrupt: {exc}; refusing to resume") from exc
        if meta.get("fingerprint") != self.fingerprint or meta.get("rank") != self.rank:
            raise CheckpointMismatch(
                f"checkpoint {self.state_path} was written by another run or rank; refusing to mix it in"
            )
        return tensors, meta

    def save_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
        full = {"kind": KIND, "version": "1", "fingerprint": self.fingerprint, "rank": self.rank, **meta}
        atomic_save(tensors, full, self.state_path)


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def open_checkpoint(
    folder: str | os.PathLike, cfg: TestConfig, tokens: np.ndarray, models: list[nn.Module], resume: bool
) -> tuple[MeasureCheckpoint, tuple[dict[str, torch.Tensor], dict] | None]:
    """Bind the folder to this run (rank 0 first, taking its lock) and read this rank's saved
    state, if any. The caller closes the checkpoint (see :func:`releases_checkpoints`)."""
    rank, world = rank_world()
    fp = run_fingerprint(cfg, tokens, models, world)
    ck: MeasureCheckpoint | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            ck = MeasureCheckpoint.open(folder, fp, rank, world, resume)
        except CheckpointMismatch as exc:
            error = exc
    try:
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
    except BaseException:
        if ck is not None:
            ck.close()  # a refused run leaves the folder free at once
        raise
    assert ck is not None
    return ck, saved


# ----------------------------------------------------------------------------- flattening the pass
@dataclass
class Kept:
    """The match tokens' codes per site and the baseline's permutations, kept for the tiled
    matching (empty in the dense mode); checkpointed with the accumulators."""

    a: dict[int, list[Codes]]
    b: dict[int, list[Codes]]
    perms: list[torch.Tensor]

    @classmethod
    def for_sites(cls, n_a: int, n_b: int, tiled: bool) -> Kept:
        """Room for every site's codes when ``tiled``; nothing otherwise."""
        return cls({i: [] for i in range(n_a)} if tiled else {}, {j: [] for j in range(n_b)} if tiled else {}, [])

    def keep(self, codes_a: list[Codes], codes_b: list[Codes], take: int, perm: torch.Tensor) -> None:
        """Keep the first ``take`` tokens of one batch's codes and its baseline permutation."""
        for kept, codes in ((self.a, codes_a), (self.b, codes_b)):
            for i, c in enumerate(codes):
                kept[i].append(take_rows(c, slice(0, take)))
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

    def restore(self, t: Mapping[str, torch.Tensor], device: torch.device) -> None:
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


@dataclass
class PassState:
    """Every accumulator of this rank's statistics pass: what a checkpoint holds.

    others: the family's models beyond the primary pair, by config index;
    family: the cross-correlations of every model pair but the primary one (see
    :class:`~.measurements.FamilyMeasurement`).
    """

    a: ModelMeasurement
    b: ModelMeasurement
    cross: dict[SitePair, CrossCorrelation]
    baselines: dict[SitePair, CrossCorrelation]
    kept: Kept
    others: dict[int, ModelMeasurement] = field(default_factory=dict)
    family: dict[tuple[int, int], dict[SitePair, CrossCorrelation]] = field(default_factory=dict)

    def labelled_models(self) -> list[tuple[str, ModelMeasurement]]:
        """(checkpoint prefix, model): "a", "b", then "m<k>." per further model."""
        return [("a", self.a), ("b", self.b), *((f"m{k}.", mm) for k, mm in self.others.items())]

    def family_accumulators(self) -> list[tuple[str, CrossCorrelation]]:
        return [(f"family.{x}.{y}.{i}.{j}", cc) for (x, y), d in self.family.items() for (i, j), cc in d.items()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flattened for a checkpoint (see :meth:`restore`)."""
        out: dict[str, torch.Tensor] = {"losses.a": self.a.losses, "losses.b": self.b.losses, **self.kept.tensors()}
        out.update({f"losses.m{k}": mm.losses for k, mm in self.others.items()})
        for label, mm in self.labelled_models():
            for i, s in enumerate(mm.sites):
                out.update(prefixed(f"{label}{i}.stats", s.stats.state_dict()))
                out.update(prefixed(f"{label}{i}.x_stats", s.x_stats.state_dict()))
                out[f"{label}{i}.sse"] = torch.tensor(s.sse, dtype=torch.float64)
        for (i, j), cc in self.cross.items():
            out.update(prefixed(f"cross.{i}.{j}", cc.state_dict()))
        for (i, j), bl in self.baselines.items():
            out.update(prefixed(f"baseline.{i}.{j}", bl.state_dict()))
        for key, cc in self.family_accumulators():
            out.update(prefixed(key, cc.state_dict()))
        return out

    def restore(self, t: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """Load what :meth:`tensors` saved into these (freshly built) accumulators."""
        self.kept.restore(t, device)
        for label, mm in self.labelled_models():
            for i, s in enumerate(mm.sites):
                s.stats.load_state_dict(unprefixed(f"{label}{i}.stats", t))
                s.x_stats.load_state_dict(unprefixed(f"{label}{i}.x_stats", t))
                s.sse = float(t[f"{label}{i}.sse"])
        for (i, j), cc in self.cross.items():
            cc.load_state_dict(unprefixed(f"cross.{i}.{j}", t))
        for (i, j), bl in self.baselines.items():
            bl.load_state_dict(unprefixed(f"baseline.{i}.{j}", t))
        for key, cc in self.family_accumulators():
            cc.load_state_dict(unprefixed(key, t))
