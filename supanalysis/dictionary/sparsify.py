"""EleutherAI sparsify dictionary folders.

One hookpoint's folder (its name is the hookpoint, e.g. ``layers.3``): ``cfg.json`` (``d_in``,
``k``, ``num_latents``, ``activation``, ``transcode``...) and ``sae.safetensors`` with
``encoder.weight`` (latents, d_in), ``encoder.bias`` (latents,), ``W_dec`` (latents, d_in),
``b_dec`` (d_in,). Loading reproduces ``SparseCoder.load_from_disk`` and ``encode``: every
tensor in the first tensor's dtype, ``relu(F.linear(x - b_dec, W, b))`` then top-k (or
groupmax), ``b_dec`` not subtracted for a transcoder.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from ._io import CFG, int_field, read_json, read_tensors, save_tensors, typed_field, write_json
from .activations import GroupMax, TopK
from .base import Dictionary

SPARSIFY_WEIGHTS = "sae.safetensors"
_KNOWN = {"expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk", "skip_connection", "d_in",
          "activation", "transcode"}  # fmt: skip
#: A folder name that is a module path with a layer index (``layers.3``, ``h.3.mlp``).
_HOOKPOINT_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*\.\d+(\.\w+)*$")


def save_sparsify(d: Dictionary, folder: str | Path) -> Path:
    """Write a TopK or groupmax ``d`` as an EleutherAI sparsify folder."""
    if not isinstance(d.activation, (TopK, GroupMax)) or d.apply_b_dec_to_input == d.transcoder:
        raise ValueError("sparsify stores TopK/groupmax dictionaries that subtract b_dec before encoding "
                         "(transcoders do not)")  # fmt: skip
    if d.rescale_acts_by_decoder_norm:
        raise ValueError("sparsify has no rescale_acts_by_decoder_norm")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        **d.metadata,
        "activation": d.activation.name,
        "expansion_factor": max(d.n_features // d.d_in, 1),
        "normalize_decoder": True,
        "num_latents": d.n_features,
        "k": d.activation.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": d.transcoder,
        "d_in": d.d_in,
    }
    write_json(folder, cfg)
    tensors = {"encoder.weight": d.W_enc.T, "encoder.bias": d.b_enc, "W_dec": d._W_dec, "b_dec": d.b_dec}
    save_tensors(tensors, folder / SPARSIFY_WEIGHTS)
    return folder


def _reference_dtype(path: Path):
    # sparsify builds every parameter in the dtype of the file's first tensor.
    if not path.is_file():
        raise FileNotFoundError(f"dictionary folder {path.parent} has no {path.name}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype
    except Exception as exc:  # a corrupt header surfaces as several types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_sparsify(folder: str | Path) -> Dictionary:
    """Read an EleutherAI sparsify folder (one hookpoint's ``cfg.json`` + ``sae.safetensors``)."""
    folder = Path(folder)
    cfg = read_json(folder)
    d_in, k = int_field(cfg, "d_in", folder), int_field(cfg, "k", folder)
    # num_latents 0/null means "use expansion_factor" (sparsify's convention); anything else
    # must be a positive int (a string or 8.0 used to reach the shape check, or pass it).
    n = int_field(cfg, "num_latents", folder) if cfg.get("num_latents") else None
    n = n or d_in * int_field(cfg, "expansion_factor", folder)
    if k > n:
        raise ValueError(f"{folder / CFG}: k={k} exceeds the number of latents {n}")
    if typed_field(cfg, "skip_connection", bool, False, folder):
        raise ValueError(f"{folder / CFG}: skip_connection=True (W_skip) is not supported")
    kind = typed_field(cfg, "activation", str, "topk", folder)
    if kind not in ("topk", "groupmax"):
        raise ValueError(f"{folder / CFG}: activation={kind!r} is not supported (topk or groupmax)")
    if kind == "groupmax" and n % k:
        raise ValueError(f"{folder / CFG}: groupmax needs num_latents={n} to be a multiple of k={k}")
    transcode = typed_field(cfg, "transcode", bool, False, folder)
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    path = folder / SPARSIFY_WEIGHTS
    t = read_tensors(path, expected, dtype=_reference_dtype(path))
    metadata = {key: v for key, v in cfg.items() if key not in _KNOWN}
    if "hookpoint" not in metadata and _HOOKPOINT_RE.match(folder.name):
        metadata["hookpoint"] = folder.name
    activation = TopK(k, relu_first=True) if kind == "topk" else GroupMax(k)
    return Dictionary.from_tensors(
        t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"], activation,
        apply_b_dec_to_input=not transcode, metadata=metadata, fused_encoder_bias=True, transcoder=transcode,
    )  # fmt: skip
