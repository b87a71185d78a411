"""Dictionary folders on disk, one registry: SAELens and EleutherAI sparsify.

Only safetensors and JSON are read; nothing is unpickled. Loading checks every tensor's
presence and shape and names the offending one.

SAELens: ``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, ``hook_name``...) and
``sae_weights.safetensors`` with ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec``
(d_sae, d_in), ``b_dec`` (d_in,), ``threshold`` (d_sae,) for JumpReLU; optional
``sparsity.safetensors`` with ``sparsity`` (d_sae,) = log10 firing density.

sparsify: ``cfg.json`` (``d_in``, ``k``, ``num_latents``...) and ``sae.safetensors`` with
``encoder.weight`` (latents, d_in), ``encoder.bias`` (latents,), ``W_dec`` (latents, d_in),
``b_dec`` (d_in,). Always TopK, always subtracts ``b_dec`` before encoding.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .activations import JumpReLU, ReLU, TopK
from .base import Dictionary

SAELENS_WEIGHTS, SAELENS_SPARSITY, SPARSIFY_WEIGHTS, CFG = (
    "sae_weights.safetensors",
    "sparsity.safetensors",
    "sae.safetensors",
    "cfg.json",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}  # fmt: skip


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / CFG
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {folder} has no {CFG}")
    return json.loads(path.read_text())


def _read_tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {path.parent} has no {path.name}")
    tensors = load_file(str(path))
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{path.name} is missing tensor {name!r} (expected shape {shape})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path.name}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return tensors


def _int_field(cfg: dict[str, Any], name: str, folder: Path) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{folder / CFG}: field {name!r} must be a positive int, got {value!r}")
    return value


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


# SAELens ------------------------------------------------------------------------------


def save_saelens(d: Dictionary, folder: str | Path) -> Path:
    """Write ``d`` as a SAELens folder; ``d.metadata`` (``hook_name``, ``model_name``...) goes
    into cfg.json both at the top level and under ``metadata``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    act = d.activation
    arch = {ReLU: "standard", TopK: "topk", JumpReLU: "jumprelu"}.get(type(act))
    if arch is None:
        raise ValueError(f"SAELens has no architecture for activation {act.name!r}")
    cfg: dict[str, Any] = {
        **d.metadata,
        "architecture": arch,
        "d_in": d.d_in,
        "d_sae": d.n_features,
        "dtype": _DTYPE_NAMES.get(d.W_enc.dtype, str(d.W_enc.dtype)),
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": act.k} if arch == "topk" else {},
        "normalize_activations": d.metadata.get("normalize_activations", "none"),
        "metadata": dict(d.metadata),
    }
    if arch == "topk":
        cfg["k"] = act.k
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = act.threshold
    save_file(_contiguous(tensors), str(folder / SAELENS_WEIGHTS))
    if d.log10_density is not None:
        save_file(_contiguous({"sparsity": d.log10_density}), str(folder / SAELENS_SPARSITY))
    return folder


def load_saelens(folder: str | Path) -> Dictionary:
    """Read a SAELens folder (architectures ``standard``, ``topk``, ``jumprelu``)."""
    folder = Path(folder)
    cfg = _read_json(folder)
    d_in, d_sae = _int_field(cfg, "d_in", folder), _int_field(cfg, "d_sae", folder)
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", "relu")
    if arch == "topk" or fn == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int):
            raise ValueError(f"{folder / CFG}: a topk SAE needs an int 'k', got {k!r}")
        activation: Any = TopK(k)
    elif arch in ("standard", "jumprelu"):
        activation = "relu"
    else:
        raise ValueError(f"{folder / CFG}: architecture={arch!r} is not supported")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    t = _read_tensors(folder / SAELENS_WEIGHTS, expected)
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        warnings.warn(
            f"{folder}: normalize_activations={norm!r} is recorded in metadata but not applied",
            stacklevel=2,
        )
    metadata = dict(cfg.get("metadata") or {})
    for key in ("hook_name", "model_name"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    d = Dictionary.from_tensors(
        t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], activation,
        threshold=t.get("threshold"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        metadata=metadata,
    )  # fmt: skip
    sparsity = folder / SAELENS_SPARSITY
    if sparsity.is_file():
        d.log10_density = _read_tensors(sparsity, {"sparsity": (d_sae,)})["sparsity"]
    return d


# sparsify -----------------------------------------------------------------------------


def save_sparsify(d: Dictionary, folder: str | Path) -> Path:
    """Write a TopK ``d`` as an EleutherAI sparsify folder."""
    if not isinstance(d.activation, TopK) or not d.apply_b_dec_to_input:
        raise ValueError("sparsify stores TopK dictionaries that subtract b_dec before encoding")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        **d.metadata,
        "expansion_factor": max(d.n_features // d.d_in, 1),
        "normalize_decoder": True,
        "num_latents": d.n_features,
        "k": d.activation.k,
        "multi_topk": False,
        "skip_connection": False,
        "d_in": d.d_in,
    }
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {"encoder.weight": d.W_enc.T, "encoder.bias": d.b_enc, "W_dec": d.W_dec,
               "b_dec": d.b_dec}  # fmt: skip
    save_file(_contiguous(tensors), str(folder / SPARSIFY_WEIGHTS))
    return folder


def load_sparsify(folder: str | Path) -> Dictionary:
    """Read an EleutherAI sparsify folder (one hookpoint's ``cfg.json`` + ``sae.safetensors``)."""
    folder = Path(folder)
    cfg = _read_json(folder)
    d_in, k = _int_field(cfg, "d_in", folder), _int_field(cfg, "k", folder)
    n = cfg.get("num_latents") or d_in * _int_field(cfg, "expansion_factor", folder)
    if cfg.get("skip_connection"):
        raise ValueError(f"{folder / CFG}: skip_connection=True (W_skip) is not supported")
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    t = _read_tensors(folder / SPARSIFY_WEIGHTS, expected)
    known = {"expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
             "skip_connection", "d_in"}  # fmt: skip
    metadata = {key: v for key, v in cfg.items() if key not in known}
    return Dictionary.from_tensors(
        t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"], TopK(k),
        apply_b_dec_to_input=True, metadata=metadata,
    )  # fmt: skip


# registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DictionaryFormat:
    """One on-disk format: how to recognise, read and write it.

    Attributes:
        name: registry key.
        weights_file: the file whose presence identifies the format.
        load: folder -> Dictionary.
        save: (Dictionary, folder) -> folder.
    """

    name: str
    weights_file: str
    load: Callable[[str | Path], Dictionary]
    save: Callable[[Dictionary, str | Path], Path]


FORMATS: dict[str, DictionaryFormat] = {
    "saelens": DictionaryFormat("saelens", SAELENS_WEIGHTS, load_saelens, save_saelens),
    "sparsify": DictionaryFormat("sparsify", SPARSIFY_WEIGHTS, load_sparsify, save_sparsify),
}


def load_dictionary(folder: str | Path, format: str | None = None) -> Dictionary:
    """Load a dictionary folder; ``format=None`` detects it from the weights file name."""
    folder = Path(folder)
    if format is None:
        found = [f for f in FORMATS.values() if (folder / f.weights_file).is_file()]
        if len(found) != 1:
            files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no folder"
            raise ValueError(
                f"cannot tell the format of {folder} (files: {files}); expected one of "
                + ", ".join(f"{f.weights_file} ({f.name})" for f in FORMATS.values())
            )
        return found[0].load(folder)
    if format not in FORMATS:
        raise ValueError(f"format={format!r} unknown; registered: {sorted(FORMATS)}")
    return FORMATS[format].load(folder)


def save_dictionary(d: Dictionary, folder: str | Path, format: str = "saelens") -> Path:
    """Save ``d`` in ``format`` (``"saelens"`` or ``"sparsify"``)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} unknown; registered: {sorted(FORMATS)}")
    return FORMATS[format].save(d, folder)
