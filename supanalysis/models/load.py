"""Load a model from a local folder: our TinyTransformer format or a Hugging Face causal LM."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .tiny import CONFIG_FILE, TINY_MODEL_TYPE, TinyTransformer, read_config


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
    model_type = read_config(cfg_path).get("model_type")
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
