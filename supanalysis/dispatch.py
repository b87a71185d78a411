"""Measured backend choices for ``auto``: which backend the benchmark found faster.

On a GPU an op may have two fast backends (Triton and CUDA), and which one wins depends on
the op, the GPU generation and the dtype. Rather than guess, ``python -m bench
--write-dispatch FILE`` records, for every (op, device, dtype) it timed with two or more
backends, the fastest one and the times behind the choice. ``auto`` then takes that backend
when it can run here, and otherwise falls back to the op's static preference.

The table shipped with the package is ``supanalysis/dispatch.json``; the environment
variable ``SUPANALYSIS_DISPATCH`` names another file instead (a malformed one is an error,
not silently ignored). Devices are labelled ``cpu`` or ``cuda:sm_XY`` (compute capability),
so an H100's measurements never decide for another GPU generation.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .durable import write_text

SCHEMA = 1
SHIPPED = Path(__file__).with_name("dispatch.json")
ENV = "SUPANALYSIS_DISPATCH"
_BACKENDS = ("reference", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class Choice:
    """The measured winner for one (op, device, dtype) and the evidence."""

    op: str
    device: str  # "cpu" or "cuda:sm_XY"
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)  # every backend timed
    shape: str = ""
    source: str = ""  # device name, commit and date of the bench run
    variant: str = ""  # a named launcher of ``backend`` (ops/registry.py), "" for the default

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.op, self.device, self.dtype)


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda:sm_XY`` from the device's compute capability."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:sm_{major}{minor}"


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse(raw: object, where: str) -> dict[tuple[str, str, str], Choice]:
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA or not isinstance(raw.get("choices"), list):
        raise ValueError(f"{where}: not a supanalysis dispatch table (want {{'schema': {SCHEMA}, 'choices': [...]}})")
    out: dict[tuple[str, str, str], Choice] = {}
    for i, c in enumerate(raw["choices"]):
        try:
            choice = Choice(
                op=str(c["op"]),
                device=str(c["device"]),
                dtype=str(c["dtype"]),
                backend=str(c["backend"]),
                seconds={str(k): float(v) for k, v in dict(c.get("seconds", {})).items()},
                shape=str(c.get("shape", "")),
                source=str(c.get("source", "")),
                variant=str(c.get("variant", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: choice {i} is malformed ({exc})") from exc
        if choice.backend not in _BACKENDS:
            raise ValueError(f"{where}: choice {i} names unknown backend {choice.backend!r}")
        out[choice.key] = choice
    return out


@functools.cache
def _load(path: str) -> dict[tuple[str, str, str], Choice]:
    p = Path(path)
    if not p.exists():
        if path == str(SHIPPED):
            return {}
        raise FileNotFoundError(f"{ENV}={path}: no such dispatch table")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return _parse(raw, path)


def table_path() -> Path:
    """The table ``auto`` consults: ``$SUPANALYSIS_DISPATCH`` or the shipped one."""
    env = os.environ.get(ENV, "").strip()
    return Path(env) if env else SHIPPED


def table() -> dict[tuple[str, str, str], Choice]:
    """Every measured choice in the active table, by (op, device, dtype)."""
    return dict(_load(str(table_path())))


def measured_choice(op: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """The backend the benchmark found fastest for this op, device and dtype, if measured."""
    c = _lookup(op, device, dtype)
    return c.backend if c is not None else None


def measured_variant(op: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The named variant of the measured backend, "" when the table names none."""
    c = _lookup(op, device, dtype)
    return c.variant if c is not None else ""


def _lookup(op: str, device: torch.device, dtype: torch.dtype | None) -> Choice | None:
    if dtype is None:
        return None
    return _load(str(table_path())).get((op, device_label(device), dtype_label(dtype)))


def write(path: Path, choices: Iterable[Choice]) -> list[Choice]:
    """Merge ``choices`` into the table at ``path`` (a new measurement replaces the old one
    for the same op, device and dtype; others are kept) and write it atomically."""
    path = Path(path)
    current = _parse(json.loads(path.read_text()), str(path)) if path.exists() else {}
    for c in choices:
        current[c.key] = c
    ordered = [current[k] for k in sorted(current)]
    doc = {
        "schema": SCHEMA,
        "about": "Fastest backend per (op, device, dtype), written by `python -m bench --write-dispatch`.",
        "choices": [{k: v for k, v in asdict(c).items() if k != "variant" or v} for c in ordered],
    }
    write_text(path, json.dumps(doc, indent=2) + "\n")
    _load.cache_clear()
    return ordered
