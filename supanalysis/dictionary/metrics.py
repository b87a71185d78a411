"""Reconstruction metrics of a dictionary: fraction of variance unexplained, L0, dead latents."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..accumulators._state import chan_merge
from .base import Dictionary


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖², over rows of (T, m)."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(x.dtype).tiny)


@torch.no_grad()
def evaluate_sae(sae: Dictionary, source: Iterable, site: str | None, n_tokens: int | None = None) -> dict[str, float]:
    """Held-out metrics over a stream: exact FVU (float64; variance around the global
    mean, merged batch by batch with Chan's formula), mean L0, and the fraction of latents
    that never fired.

    Args:
        sae: the dictionary.
        source: iterable of ``{site: (T, m)}`` dicts or of (T, m) tensors (one pass).
        site: key in the dicts, or ``None`` for tensors.
        n_tokens: stop after this many activations (``None``: the whole pass).
    """
    count, sse, l0 = 0, 0.0, 0.0
    mean = m2 = None
    fired = torch.zeros(sae.n_features, dtype=torch.bool)
    for item in source:
        x = item[site] if site is not None else item
        if n_tokens is not None:
            x = x[: n_tokens - count]
        if not x.shape[0]:
            break
        x = sae.capture_convention.apply(x) if isinstance(sae, Dictionary) else x  # what it rebuilds
        indices, values = sae.encode(x.to(sae.W_enc.dtype), sparse=True)
        x64 = x.double()
        sse += (x64 - sae.decode_sparse(indices, values).double()).pow(2).sum().item()
        l0 += (values > 0).sum().item()
        fired[indices[values > 0].cpu()] = True
        n_b, mean_b = x.shape[0], x64.mean(0)
        m2_b = (x64 - mean_b).pow(2).sum(0)
        if mean is None:
            mean, m2 = mean_b, m2_b
        else:
            mean, m2 = chan_merge(count, mean, m2, n_b, mean_b, m2_b)
        count += n_b
        if n_tokens is not None and count >= n_tokens:
            break
    if not count:
        raise ValueError("source yielded no activations")
    return {
        "tokens": count,
        "fvu": sse / m2.sum().item(),
        "l0": l0 / count,
        "never_fired_fraction": 1 - fired.float().mean().item(),
    }
