"""Next-token losses: per token (premise P2 compares them pairwise) and sharded across ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TokenSequences
from ..distributed import all_gather_cat, rank_world, shard_range


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def token_losses(
    model: nn.Module, seqs: TokenSequences, device: torch.device, max_tokens: int, allow_empty: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy (nats) of every predicted position, up to ``max_tokens``. -> (N,) float64"""
    out, have = [], 0
    for ids in seqs:
        ids = ids.to(device)
        logits = _logits(model, ids[:, :-1]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(ce.cpu().double())
        have += ce.numel()
        if have >= max_tokens:
            break
    if not out:
        if allow_empty:
            return torch.zeros(0, dtype=torch.float64)
        raise ValueError("the token file has no eval sequences")
    return torch.cat(out)[:max_tokens]


def eval_losses(
    model: nn.Module,
    seqs: Callable[[int, int], TokenSequences],
    n_eval: int,
    eval_tokens: int,
    device: torch.device,
) -> torch.Tensor:
    """Per-token eval losses over the first ``n_eval`` sequences -> (eval_tokens,) float64.

    ``seqs(start, count)`` opens a slice of the token file. In a distributed run each rank
    takes a contiguous share of the sequences and the shares are gathered in rank order.
    """
    rank, world = rank_world()
    if world == 1:
        return token_losses(model, seqs(0, n_eval), device, eval_tokens)
    lo, hi = shard_range(n_eval, rank, world)
    part = token_losses(model, seqs(lo, hi - lo), device, 1 << 62, allow_empty=True)
    # Rank order is sequence order, so the concatenation is the single-process result.
    return all_gather_cat(part.to(device)).cpu()[:eval_tokens]
