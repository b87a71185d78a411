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
from safetensors import SafetensorError
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
    # Name the file in the error (json's own message does not), and refuse a non-object.
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_tensors(path: Path, expected: dict[str, tuple[int, ...]], *, finite: bool = True) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {path.parent} has no {path.name}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:  # truncated/corrupt file: name it, as a ValueError
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
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
        if finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path.name}: tensor {name!r} holds NaN or infinite values")
    return tensors


def _int_field(cfg: dict[str, Any], name: str, folder: Path) -> int:
    value = cfg.get(name)
    # bool is an int subclass: d_in=true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{folder / CFG}: field {name!r} must be a positive int, got {value!r}")
    return value


def _typed_field(cfg: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any, folder: Path) -> Any:
    """cfg[name] (or ``default`` when absent/null) checked against ``types``: a wrong type in
    cfg.json used to surface as AttributeError, or (``bool("false")``) load silently wrong."""
    value = cfg.get(name)
    if value is None:
        return default
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ValueError(f"{folder / CFG}: field {name!r} must be {names}, got {value!r}")
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
    arch = _typed_field(cfg, "architecture", str, "standard", folder)
    fn = _typed_field(cfg, "activation_fn_str", str, "relu", folder)
    if arch == "topk" or fn == "topk":
        kwargs = _typed_field(cfg, "activation_fn_kwargs", dict, {}, folder)
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
            raise ValueError(f"{folder / CFG}: a topk SAE needs an int 'k' in [1, d_sae={d_sae}], got {k!r}")
        activation: Any = TopK(k)
    elif arch in ("standard", "jumprelu"):
        activation = "relu"
    else:
        raise ValueError(f"{folder / CFG}: architecture={arch!r} is not supported")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    apply_b_dec = _typed_field(cfg, "apply_b_dec_to_input", bool, True, folder)
    metadata = dict(_typed_field(cfg, "metadata", dict, {}, folder))
    t = _read_tensors(folder / SAELENS_WEIGHTS, expected)
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        warnings.warn(
            f"{folder}: normalize_activations={norm!r} is recorded in metadata but not applied",
            stacklevel=2,
        )
    for key in ("hook_name", "model_name"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    d = Dictionary.from_tensors(
        t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], activation,
        threshold=t.get("threshold"),
        apply_b_dec_to_input=apply_b_dec,
        metadata=metadata,
    )  # fmt: skip
    sparsity = folder / SAELENS_SPARSITY
    if sparsity.is_file():
        # log10 density may be -inf for a latent that never fired: only the dtype is checked.
        d.log10_density = _read_tensors(sparsity, {"sparsity": (d_sae,)}, finite=False)["sparsity"]
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
    # num_latents 0/null means "use expansion_factor" (sparsify's convention); anything else
    # must be a positive int (a string or 8.0 used to reach the shape check, or pass it).
    n = _int_field(cfg, "num_latents", folder) if cfg.get("num_latents") else None
    n = n or d_in * _int_field(cfg, "expansion_factor", folder)
    if k > n:
        raise ValueError(f"{folder / CFG}: k={k} exceeds the number of latents {n}")
    if _typed_field(cfg, "skip_connection", bool, False, folder):
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
