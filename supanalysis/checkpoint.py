"""Checkpoints of the test's measurement pass: what was measured so far, and for which run.

A checkpoint folder belongs to exactly one run. ``fingerprint.json`` (written first) names
it: the measurement-relevant config (not the analysis thresholds), the token file, the
weights of both models, and the world size. Every rank then keeps its own
``measure.rank{r}.safetensors``: its accumulators, its position in the token stream (the
next global batch), the eval losses; and the trained dictionaries' own training
checkpoints live under ``sae/``. Writes are atomic (temp file, fsync, rename), so a kill at
any instant leaves the previous checkpoint intact. A folder from another run, or a
corrupt file, is refused with the reason, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .accumulators._state import atomic_save, atomic_write, load_file_checked
from .config import TestConfig

KIND = "supanalysis.MeasureCheckpoint"
FINGERPRINT_FILE = "fingerprint.json"
ANALYSIS_ONLY = ("thresholds", "bootstrap", "device")  # changing these never changes a measurement
# Fields added after checkpoints were first written, with the value every older run had:
# left out of the fingerprint at that value, so older checkpoints still resume.
ADDED_WITH_DEFAULT = {"match_precision": "ieee"}


class CheckpointMismatch(ValueError):
    """A checkpoint exists but was written by another run (or is unreadable)."""


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


def token_file_hash(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Size plus sha256 of the first and last MiB: catches another or a changed file cheaply."""
    raw = np.asarray(tokens).reshape(-1).view(np.uint8)
    h = hashlib.sha256(f"{raw.size}|{tokens.dtype}|".encode())
    h.update(raw[: 1 << 20].tobytes())
    h.update(raw[-(1 << 20) :].tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: TestConfig, tokens: np.ndarray, models: Iterable[nn.Module], world: int) -> dict[str, str]:
    """Component hashes naming one measurement run (see the module docstring)."""
    conf = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ANALYSIS_ONLY and not (k in ADDED_WITH_DEFAULT and v == ADDED_WITH_DEFAULT[k])
    }
    a, b = list(models)
    return {
        "config": hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest(),
        "tokens": token_file_hash(cfg.tokens, tokens),
        "model_a": module_hash(a),
        "model_b": module_hash(b),
        "world_size": str(world),
    }


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


class MeasureCheckpoint:
    """The checkpoint folder of one run, seen from one rank.

    ``open`` binds the folder to the run's fingerprint: a fresh folder gets it written; a
    folder holding another run's checkpoint is refused; one holding this run's is resumed
    only when ``resume`` is true (otherwise refused, so two runs never mix silently).
    In a distributed run rank 0 opens first; the other ranks then ``join`` (the folder must
    be this run's, or absent on a node that does not share rank 0's filesystem).
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: Mapping[str, str], rank: int, world: int) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.rank, self.world = rank, world

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
        fp_path = ck.folder / FINGERPRINT_FILE
        if fp_path.is_file():
            try:
                found = json.loads(fp_path.read_text())
                if not isinstance(found, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as exc:
                raise CheckpointMismatch(
                    f"checkpoint {fp_path} is unreadable ({exc}); refusing to resume from it"
                ) from exc
            if found != ck.fingerprint:
                raise CheckpointMismatch(
                    f"checkpoint folder {ck.folder} belongs to another run (differs in: "
                    f"{_describe_mismatch(found, ck.fingerprint)}); refusing to mix it in. "
                    "Use another checkpoint folder or delete this one."
                )
            if not resume and not join:
                raise CheckpointMismatch(
                    f"checkpoint folder {ck.folder} already holds this run's checkpoint; pass resume=True "
                    "(--resume) to continue it, or use another folder"
                )
        else:
            if not join and ck.folder.is_dir() and any(ck.folder.iterdir()):
                raise CheckpointMismatch(
                    f"checkpoint folder {ck.folder} is not empty and holds no {FINGERPRINT_FILE}; "
                    "refusing to write into it"
                )
            ck.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(fp_path, json.dumps(ck.fingerprint, indent=2, sort_keys=True) + "\n")
        return ck

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


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
