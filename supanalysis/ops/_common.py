"""Argument checks at the op boundary, shared by every op and backend: each names the
argument it rejects.

Checks run before any state is touched or any kernel is launched, so a rejected call
leaves accumulators unchanged and no kernel is driven out of bounds.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECIALS = {"nan": float("nan"), "inf": float("inf"), "huge": 3.0e4}


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_rank(name: str, t: torch.Tensor, rank: int, shape_doc: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {shape_doc}, got shape {tuple(t.shape)}")


def check_features(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() == 0 or t.shape[-1] != n:
        raise ValueError(f"{name} must have {n} features in its last dimension, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {v}" for k, v in devs.items())
        raise ValueError(f"tensors must be on one device: {desc}")
    return next(iter(devs.values()))


def check_threshold(name: str, value: object) -> float:
    """A finite real threshold as float (NaN compares false with everything: it would
    silently mean "never fires")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def clamp_topk(topk: object, partners: int) -> int:
    """``topk`` as a non-negative int, at most ``partners`` (outputs are [n, topk])."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
    return min(topk, max(partners, 0))


def check_index_bounds(name: str, indices: torch.Tensor, n: int) -> None:
    """Every index in [0, n) or -1 (padding): the kernels index rows and columns with them."""
    if indices.numel() == 0:
        return
    mn, mx = int(indices.min()), int(indices.max())
    if mn < -1 or mx >= n:
        raise ValueError(f"{name} must be in [-1, {n}) (-1 = padding), found {mn if mn < -1 else mx}")


def check_indices_range(name: str, indices: torch.Tensor, n: int, allow_padding: bool = True) -> None:
    """Indices in [0, n) (or -1, padding) with no feature listed twice in a row."""
    if indices.numel() == 0:
        return
    lo = -1 if allow_padding else 0
    mn, mx = int(indices.min()), int(indices.max())
    if mn < lo or mx >= n:
        bad = mn if mn < lo else mx
        raise ValueError(f"{name} must be in [{lo}, {n}), found {bad}")
    if indices.dim() and indices.shape[-1] > 1:
        s, _ = torch.sort(indices, dim=-1)
        dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(-1).nonzero()[0, 0])
            raise ValueError(f"{name} lists a feature twice in row {row}; top-k codes must be distinct")


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [T, n] without copying when the leading dims are mergeable."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def plant_special(x: torch.Tensor, special: str) -> torch.Tensor:
    """x with its first entry set to a special value ("" = unchanged), for example inputs.
    "huge" is near float16's largest finite value, so it is huge in every float dtype."""
    if special and x.numel():
        x = x.clone()
        x.view(-1)[0] = SPECIALS[special]
    return x
