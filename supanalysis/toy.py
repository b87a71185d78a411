"""Toy models of superposition (Elhage et al. 2022), many independent instances at once.

Model: h = W x, x' = ReLU(Wᵀ h + b) with W [m, n]; loss Σ_i I_i (x_i − x'_i)². Each
feature is nonzero with probability p (per instance, so one run sweeps sparsities) and
uniform in [0, 1] when nonzero. Instances are trained together as one batched tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ToyConfig:
    """One batch of toy models.

    n_features: n, inputs per instance.
    n_hidden: m, the bottleneck width.
    densities: firing probability p of every feature, one entry per instance.
    importance_decay: feature i has importance decay**i (1.0 = uniform).
    relu: False gives the linear model x' = WᵀW x + b.
    steps, batch, lr: AdamW training schedule.
    seed: generator seed for initialisation and data.
    """

    n_features: int = 5
    n_hidden: int = 2
    densities: Sequence[float] = (0.05,)
    importance_decay: float = 1.0
    relu: bool = True
    steps: int = 2000
    batch: int = 1024
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.n_hidden < 1:
            raise ValueError("n_features and n_hidden must be positive")
        if not self.densities or not all(0.0 < p <= 1.0 for p in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {list(self.densities)}")


@dataclass
class ToyModels:
    """Trained instances: W [I, m, n], b [I, n], final loss [I] (mean over the last steps)."""

    config: ToyConfig
    W: torch.Tensor
    b: torch.Tensor
    loss: torch.Tensor

    def directions(self, i: int) -> torch.Tensor:
        """Feature directions of instance i as rows: Wᵀ [n, m]."""
        return self.W[i].T.contiguous()


def sample_features(batch: int, densities: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """x [batch, I, n]: each entry nonzero with its instance's p, uniform in [0, 1] when nonzero."""
    I = densities.numel()
    on = torch.rand(batch, I, n, generator=generator) < densities[None, :, None]
    return torch.rand(batch, I, n, generator=generator) * on


def forward(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """x [B, I, n] -> x' [B, I, n] through each instance's own W [I, m, n], b [I, n]."""
    h = torch.einsum("imn,bin->bim", W, x)
    out = torch.einsum("imn,bim->bin", W, h) + b
    return torch.relu(out) if relu else out


def train_toy_models(cfg: ToyConfig) -> ToyModels:
    """Train every instance of ``cfg`` at once (CPU is plenty: the models are tiny)."""
    g = torch.Generator().manual_seed(cfg.seed)
    I, n, m = len(cfg.densities), cfg.n_features, cfg.n_hidden
    dens = torch.tensor(list(cfg.densities), dtype=torch.float32)
    imp = cfg.importance_decay ** torch.arange(n, dtype=torch.float32)
    W = torch.nn.Parameter(torch.randn(I, m, n, generator=g) * (2.0 / (n + m)) ** 0.5)
    b = torch.nn.Parameter(torch.zeros(I, n))
    opt = torch.optim.AdamW([W, b], lr=cfg.lr, weight_decay=0.0)
    tail = max(1, cfg.steps // 10)
    running = torch.zeros(I)
    for step in range(cfg.steps):
        x = sample_features(cfg.batch, dens, n, g)
        err = (x - forward(W, b, x, cfg.relu)) ** 2
        loss = (err * imp).sum(-1).mean(0)  # [I]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # instances are independent: their gradients do not mix
        opt.step()
        if step >= cfg.steps - tail:
            running += loss.detach()
    return ToyModels(cfg, W.detach().clone(), b.detach().clone(), running / tail)
