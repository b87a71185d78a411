"""Train a causal language model on a flat token array (for the demo and tests)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class LMTrainConfig:
    """AdamW with linear warm-up and cosine decay, on random windows of the token array.

    steps: optimiser steps; batch_size, seq_len: windows per step and their length;
    lr: peak learning rate; warmup: warm-up steps; weight_decay: AdamW decay;
    seed: seeds the initial weights' generator is not touched; it seeds the window sampler.
    """

    steps: int = 500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0


def _lr_at(step: int, cfg: LMTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_language_model(
    model: nn.Module,
    tokens: np.ndarray,
    cfg: LMTrainConfig,
    *,
    progress: bool = True,
    desc: str = "training",
    position: int = 0,
) -> list[float]:
    """Train ``model`` (ids (B, S) -> logits (B, S, V)) in place; returns the loss per step.

    position: the progress bar's line, for models trained side by side in several processes."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size <= cfg.seq_len + 1:
        raise ValueError(f"need more than seq_len + 1 = {cfg.seq_len + 1} tokens, got {tokens.size}")
    device = next(model.parameters()).device
    gen = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, position=position)
    for step in bar:
        starts = gen.integers(0, tokens.size - cfg.seq_len - 1, size=cfg.batch_size)
        window = np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
        ids = torch.from_numpy(window).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        out = model(ids[:, :-1])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
