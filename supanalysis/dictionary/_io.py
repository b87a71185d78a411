"""Reading and writing dictionary folders: JSON config, safetensors weights, typed fields.

Only safetensors and JSON are read; nothing is unpickled. Every check names the file and the
offending tensor or field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from ..durable import write_bytes, write_text

CFG = "cfg.json"
#: dtypes a dictionary computes in, by the names SAELens and sparsify write.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_json(folder: Path) -> dict[str, Any]:
    path = folder / CFG
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {folder} has no {CFG}")
    # Name the file in the error (json's own message does not), and refuse a non-object.
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def write_json(folder: Path, cfg: dict[str, Any]) -> None:
    write_text(folder / CFG, json.dumps(cfg, indent=2) + "\n")


def parse_dtype(name: Any, where: str) -> torch.dtype:
    """A config's dtype string (``"float32"``, ``"torch.bfloat16"``) as a torch dtype."""
    key = name.removeprefix("torch.") if isinstance(name, str) else name
    if key not in DTYPES:
        raise ValueError(f"{where}: dtype={name!r} is not supported; a dictionary computes in one of {sorted(DTYPES)}")
    return DTYPES[key]


def read_tensors(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype | None = None,
    finite: bool = True,
    allowed_extra: frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """The tensors of ``path``, shapes checked, cast to ``dtype`` (as the reference loaders
    do: SAELens to its config's dtype, sparsify to its first tensor's); a tensor the format
    does not know is refused, never silently ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {path.parent} has no {path.name}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:  # truncated/corrupt file: name it, as a ValueError
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    unknown = sorted(set(tensors) - set(expected) - allowed_extra)
    if unknown:
        hint = " (W_skip: a skip connection, which is not supported)" if "W_skip" in unknown else ""
        raise ValueError(f"{path.name} holds tensors {unknown} that this format does not use{hint}")
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{path.name} is missing tensor {name!r} (expected shape {shape})")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{path.name}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        # Integer weights failed deep inside nn.Parameter; NaN/Inf weights loaded silently and
        # turned every code non-finite.
        if not t.is_floating_point():
            raise ValueError(f"{path.name}: tensor {name!r} must be floating point, got {t.dtype}")
        if dtype is not None:
            t = tensors[name] = t.to(dtype)
        if finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path.name}: tensor {name!r} holds NaN or infinite values")
    return tensors


def int_field(cfg: dict[str, Any], name: str, folder: Path) -> int:
    value = cfg.get(name)
    # bool is an int subclass: d_in=true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{folder / CFG}: field {name!r} must be a positive int, got {value!r}")
    return value


def typed_field(cfg: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any, folder: Path) -> Any:
    """cfg[name] (or ``default`` when absent/null) checked against ``types``: a wrong type in
    cfg.json used to surface as AttributeError, or (``bool("false")``) load silently wrong."""
    value = cfg.get(name)
    if value is None:
        return default
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ValueError(f"{folder / CFG}: field {name!r} must be {names}, got {value!r}")
    return value


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
