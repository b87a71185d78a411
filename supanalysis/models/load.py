"""Load a model from a local folder: our TinyTransformer format or a Hugging Face causal LM."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tiny import CONFIG_FILE, TINY_MODEL_TYPE, TinyTransformer, read_config

_MAX_HEADER = 100 * 2**20
_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|blocks|layer)\.(\d+)\.")
_LAYER_KEYS = ("n_layer", "num_hidden_layers", "num_layers")
_WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")
_EMBED_SUFFIXES = ("wte.weight", "embed_in.weight", "embed_tokens.weight")


def _safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from every ``*.safetensors`` header in ``folder`` (nothing else read)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _MAX_HEADER:
                raise ValueError(f"{path}: not a safetensors file (header length {size})")
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
        shapes.update({k: v.get("shape", []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)})
    return shapes


def _first_int(cfg: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        if isinstance(cfg.get(key), int) and not isinstance(cfg[key], bool):
            return key, cfg[key]
    return None


def check_config_against_weights(folder: str | Path, cfg: dict[str, Any]) -> None:
    """Refuse a Hugging Face ``config.json`` whose layer count, width or vocabulary disagree
    with the safetensors headers, before any model is built: transformers would first
    allocate the model the config describes (minutes, or all memory, for n_layer=20000)."""
    folder = Path(folder)
    shapes = _safetensors_shapes(folder)
    blocks = {int(m[1]) for name in shapes if (m := _BLOCK_RE.search(name))}
    layers = _first_int(cfg, _LAYER_KEYS)
    if layers is not None and blocks and layers[1] != max(blocks) + 1:
        raise ValueError(f"{folder}: config.json says {layers[0]}={layers[1]} but the weights hold "
                         f"{max(blocks) + 1} blocks")  # fmt: skip
    embed = next((shape for name, shape in shapes.items() if name.endswith(_EMBED_SUFFIXES)), None)
    if embed is None or len(embed) != 2:
        return
    width = _first_int(cfg, _WIDTH_KEYS)
    if width is not None and width[1] != embed[1]:
        raise ValueError(f"{folder}: config.json says {width[0]}={width[1]} but the token embedding is {embed}")
    vocab = _first_int(cfg, ("vocab_size",))
    if vocab is not None and vocab[1] != embed[0]:
        raise ValueError(f"{folder}: config.json says vocab_size={vocab[1]} but the token embedding is {embed}")


def load(
    path: str | Path | nn.Module,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load the model in the local folder ``path``, in eval mode.

    Args:
        path: a folder written by :meth:`TinyTransformer.save` (``config.json`` with
            ``model_type = "supanalysis-tiny"``) or by Hugging Face ``save_pretrained``
            (loaded with ``local_files_only=True``: nothing is ever downloaded). An
            ``nn.Module`` is passed through, so callers can accept either.
        device: where the weights go.
        dtype: cast the floating-point weights (``None`` keeps the checkpoint's dtype).
    """
    if isinstance(path, nn.Module):
        return path.eval()
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"path={str(path)!r} is not a local folder (nothing is downloaded)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} has no {CONFIG_FILE}; not a model folder")
    config = read_config(cfg_path)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{cfg_path}: model_type must be a string, got {model_type!r}")
    if model_type == TINY_MODEL_TYPE:
        model: nn.Module = TinyTransformer.load(folder, map_location=device)
    else:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as err:
            raise ImportError(
                f"{folder} holds a Hugging Face model (model_type={model_type!r}); "
                "install the 'hf' extra: pip install 'supanalysis[hf]'"
            ) from err
        # Safetensors only: refuse pickled pytorch_model.bin checkpoints.
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{folder} has no *.safetensors weights (pickled pytorch_model.bin checkpoints are never loaded)"
            )
        check_config_against_weights(folder, config)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, output_loading_info=True
            )
        except (ImportError, MemoryError):
            raise
        except Exception as exc:  # transformers/safetensors raise many types for a bad checkpoint
            msg = f"{folder}: cannot load this Hugging Face model (model_type={model_type!r}): {exc}"
            raise ValueError(msg) from exc
        # transformers fills missing weights with random values and only logs it: a config
        # with more layers than the checkpoint would load a model that looks valid.
        bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if bad:
            raise ValueError(f"{folder}: the weights do not match config.json (missing or mismatched: {bad[:5]})")
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
