"""Trainer checkpoints that are consistent as a whole and checked on load.

Layout of a checkpoint folder::

    trainer_state.json            the pointer: which step folder is current, the sha256 of
                                  each of its files, the trainer's counters and history, and
                                  a checksum of this JSON itself
    step-<tokens>/cfg.json, sae_weights.safetensors, trainer_state.safetensors
    cfg.json, sae_weights.safetensors   a SAELens copy of the current SAE, for readers

A checkpoint is written into a fresh step folder first; only then is ``trainer_state.json``
replaced (one atomic rename via :mod:`supanalysis.durable`), so a crash at any instant leaves
the previous pointer naming the previous, complete step folder. The SAELens copy is written
last; on load it must match the current or the previous checkpoint (a crash while copying),
and is rewritten from the step folder when it lags. A file whose bytes do not match its
recorded sha256 (a flipped bit, a truncated write) is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from .. import durable
from .base import Dictionary
from .formats import load_saelens, save_saelens

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
FORMAT = "supanalysis.topk_trainer/1"
_STEP_PREFIX = "step-"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_body_checksum = durable.body_checksum


def adam_tensors(opt: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, Tensor]:
    """Adam's moments as ``adam.<param index>.<name>`` tensors."""
    out = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, Tensor) and key != "step":
                out[f"adam.{i}.{key}"] = value
    return out


def restore_adam(opt: torch.optim.Optimizer, params: list[Tensor], saved: dict[str, Tensor], steps: int) -> None:
    state = {}
    for i, _p in enumerate(params):
        if f"adam.{i}.exp_avg" in saved:
            state[i] = {
                "step": torch.tensor(float(steps)),
                "exp_avg": saved[f"adam.{i}.exp_avg"],
                "exp_avg_sq": saved[f"adam.{i}.exp_avg_sq"],
            }
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def save_checkpoint(folder: Path, sae: Dictionary, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write the SAE, the trainer tensors (Adam moments, firing counters) and ``state``
    (JSON-able counters and history) as one checkpoint of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_pointer(folder) if (folder / STATE_JSON).is_file() else None
    step_dir = folder / f"{_STEP_PREFIX}{state['tokens']:012d}"
    if previous is not None and previous["step_dir"] == step_dir.name:
        # Already the current one; a run killed after switching the pointer may not have
        # finished publishing it, so finish that (idempotent) and write nothing new.
        _publish(folder, step_dir, previous["files"])
        return
    if step_dir.exists():
        shutil.rmtree(step_dir)  # left by a run killed before it switched the pointer
    save_saelens(sae, step_dir)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    durable.write_bytes(step_dir / STATE_TENSORS, save(cpu))
    files = {p.name: _sha256(p.read_bytes()) for p in sorted(step_dir.iterdir()) if p.is_file()}
    body = {
        "format": FORMAT,
        "step_dir": step_dir.name,
        "files": files,
        "previous_files": previous["files"] if previous is not None else {},
        "state": state,
    }
    durable.write_text(folder / STATE_JSON, json.dumps({**body, "checksum": _body_checksum(body)}, indent=1) + "\n")
    _publish(folder, step_dir, files)


def publish_current(folder: Path) -> None:
    """Finish publishing the checkpoint the pointer names (after a kill between the pointer
    switch and the end of :func:`save_checkpoint`); writes nothing when it is complete."""
    current = _read_pointer(folder)
    _publish(folder, folder / current["step_dir"], current["files"])


def _publish(folder: Path, step_dir: Path, files: dict[str, str]) -> None:
    """Copy the current step's SAE files to the folder's top level (where load_dictionary finds
    them), then drop older step folders and stale temp files."""
    for name, sha in files.items():
        top = folder / name
        if name != STATE_TENSORS and not (top.is_file() and _sha256(top.read_bytes()) == sha):
            durable.write_bytes(top, (step_dir / name).read_bytes())
    for old in folder.glob(f"{_STEP_PREFIX}*"):
        if old.is_dir() and old.name != step_dir.name:
            shutil.rmtree(old, ignore_errors=True)
    durable.remove_stale_temps(folder)


def _read_pointer(folder: Path) -> dict[str, Any]:
    path = folder / STATE_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable trainer checkpoint (truncated or corrupt: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "checksum" not in doc:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (no format tag or checksum)")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if _body_checksum(body) != doc["checksum"]:
        raise ValueError(f"{path} fails its checksum: the file was altered or corrupted")
    return body


def _verified_bytes(path: Path, sha: str) -> bytes:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing")
    data = path.read_bytes()
    if _sha256(data) != sha:
        raise ValueError(f"checkpoint file {path} fails its sha256 check: the file was altered or corrupted")
    return data


def _check_copy(folder: Path, step_dir: Path, pointer: dict[str, Any]) -> None:
    """The SAELens copy must be the current or the previous checkpoint's; bring it up to date."""
    for name, sha in pointer["files"].items():
        if name == STATE_TENSORS:
            continue
        path = folder / name
        if path.is_file():
            got = _sha256(path.read_bytes())
            if got == sha:
                continue
            if got != pointer["previous_files"].get(name):
                raise ValueError(f"checkpoint file {path} fails its sha256 check: the file was altered or corrupted")
        durable.write_bytes(path, (step_dir / name).read_bytes())


def load_checkpoint(folder: Path, device: torch.device) -> tuple[Dictionary, dict[str, Any], dict[str, Tensor]]:
    """(SAE, state, trainer tensors) of the current checkpoint, every file verified."""
    pointer = _read_pointer(folder)
    step_dir = folder / pointer["step_dir"]
    for name, sha in pointer["files"].items():
        _verified_bytes(step_dir / name, sha)
    _check_copy(folder, step_dir, pointer)
    sae = load_saelens(step_dir).to(device)
    path = step_dir / STATE_TENSORS
    try:
        tensors = {k: v.to(device) for k, v in load(path.read_bytes()).items()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    return sae, pointer["state"], tensors
