"""SAELens dictionary folders.

``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, ``dtype``, ``metadata.hook_name``,
``metadata.model_from_pretrained_kwargs``...) and ``sae_weights.safetensors`` with ``W_enc``
(d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,), ``threshold``
(d_sae,) for JumpReLU; optional ``sparsity.safetensors`` with ``sparsity`` (d_sae,) = log10
firing density. Loading reproduces ``SAE.load_from_disk``: weights cast to the config's dtype
(default float32), TopK's ``rescale_acts_by_decoder_norm``, JumpReLU's ReLU.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ._io import (
    CFG,
    DTYPE_NAMES,
    int_field,
    parse_dtype,
    read_json,
    read_tensors,
    save_tensors,
    typed_field,
    write_json,
)
from .activations import JumpReLU, ReLU, TopK
from .base import Dictionary
from .convention import convention_from_tl_kwargs

SAELENS_WEIGHTS, SAELENS_SPARSITY = "sae_weights.safetensors", "sparsity.safetensors"
_ARCHITECTURES = ("standard", "topk", "jumprelu")


def save_saelens(d: Dictionary, folder: str | Path) -> Path:
    """Write ``d`` as a SAELens folder; ``d.metadata`` (``hook_name``, ``model_name``...) goes
    into cfg.json both at the top level and under ``metadata``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    act = d.activation
    arch = {ReLU: "standard", TopK: "topk", JumpReLU: "jumprelu"}.get(type(act))
    if arch is None:
        raise ValueError(f"SAELens has no architecture for activation {act.name!r}")
    if d.transcoder:
        raise ValueError("a transcoder is not a SAELens SAE folder")
    metadata = dict(d.metadata)
    if d.capture_convention.processing:
        metadata["model_from_pretrained_kwargs"] = dict(d.capture_convention.processing)
    cfg: dict[str, Any] = {
        **metadata,
        "architecture": arch,
        "d_in": d.d_in,
        "d_sae": d.n_features,
        "dtype": DTYPE_NAMES.get(d.dtype, str(d.dtype)),
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": act.k} if arch == "topk" else {},
        "normalize_activations": d.metadata.get("normalize_activations", "none"),
        "metadata": metadata,
    }
    if arch == "topk":
        cfg["k"] = act.k
        cfg["rescale_acts_by_decoder_norm"] = d.rescale_acts_by_decoder_norm
    write_json(folder, cfg)
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d._W_dec, "b_dec": d.b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = act.threshold
    save_tensors(tensors, folder / SAELENS_WEIGHTS)
    if d.log10_density is not None:
        save_tensors({"sparsity": d.log10_density}, folder / SAELENS_SPARSITY)
    return folder


def _activation(cfg: dict[str, Any], arch: str, d_sae: int, folder: Path) -> Any:
    fn = typed_field(cfg, "activation_fn_str", str, None, folder) or typed_field(
        cfg, "activation_fn", str, "relu", folder
    )
    if arch == "topk" or fn == "topk":
        kwargs = typed_field(cfg, "activation_fn_kwargs", dict, {}, folder)
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
            raise ValueError(f"{folder / CFG}: a topk SAE needs an int 'k' in [1, d_sae={d_sae}], got {k!r}")
        return TopK(k)
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{folder / CFG}: architecture={arch!r} is not supported (supported: {_ARCHITECTURES})")
    if fn != "relu":
        raise ValueError(f"{folder / CFG}: activation_fn={fn!r} is not supported (relu or topk)")
    return "relu"


def _refuse_unsupported(cfg: dict[str, Any], metadata: dict[str, Any], folder: Path) -> None:
    head = metadata.get("hook_head_index", cfg.get("hook_head_index"))
    if head is not None:
        raise ValueError(f"{folder / CFG}: hook_head_index={head!r} (an SAE on one attention head) is not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{folder / CFG}: finetuning_scaling_factor=True is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        warnings.warn(f"{folder}: normalize_activations={norm!r} is recorded in metadata but not applied", stacklevel=3)


def load_saelens(folder: str | Path) -> Dictionary:
    """Read a SAELens folder (architectures ``standard``, ``topk``, ``jumprelu``)."""
    folder = Path(folder)
    cfg = read_json(folder)
    d_in, d_sae = int_field(cfg, "d_in", folder), int_field(cfg, "d_sae", folder)
    arch = typed_field(cfg, "architecture", str, "standard", folder)
    activation = _activation(cfg, arch, d_sae, folder)
    metadata = dict(typed_field(cfg, "metadata", dict, {}, folder))
    _refuse_unsupported(cfg, metadata, folder)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    dtype = parse_dtype(cfg.get("dtype") or "float32", str(folder / CFG))
    t = read_tensors(folder / SAELENS_WEIGHTS, expected, dtype=dtype)
    for key in ("hook_name", "model_name", "model_from_pretrained_kwargs"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    tl_kwargs = metadata.get("model_from_pretrained_kwargs") or {}
    if not isinstance(tl_kwargs, dict):
        raise ValueError(f"{folder / CFG}: model_from_pretrained_kwargs must be an object, got {tl_kwargs!r}")
    rescale = typed_field(cfg, "rescale_acts_by_decoder_norm", bool, False, folder)
    d = Dictionary.from_tensors(
        t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], activation,
        threshold=t.get("threshold"),
        apply_b_dec_to_input=typed_field(cfg, "apply_b_dec_to_input", bool, True, folder),
        metadata=metadata,
        rescale_acts_by_decoder_norm=rescale and isinstance(activation, TopK),
        capture_convention=convention_from_tl_kwargs(tl_kwargs, metadata.get("hook_name"), str(folder / CFG)),
    )  # fmt: skip
    sparsity = folder / SAELENS_SPARSITY
    if sparsity.is_file():
        # log10 density may be -inf for a latent that never fired: only the dtype is checked.
        d.log10_density = read_tensors(sparsity, {"sparsity": (d_sae,)}, finite=False)["sparsity"]
    return d
