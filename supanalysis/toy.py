"""Toy models of superposition (Elhage et al. 2022), many independent instances at once.

Model: h = W x, x' = ReLU(Wᵀ h + b) with W [m, n]; loss Σ_i I_i (x_i − x'_i)². Each
feature is nonzero with probability p (per instance, so one run sweeps sparsities) and
uniform in [0, 1] when nonzero. Every (density, seed) pair is one instance of a single
batched tensor, so a whole sparsity sweep with several restarts is one training run; the
restart with the lowest loss is kept per density (the published recipe: gradient descent
sometimes settles in a worse local optimum, e.g. a square instead of a pentagon).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class ToyConfig:
    """One batch of toy models.

    n_features: n, inputs per instance.
    n_hidden: m, the bottleneck width.
    densities: firing probability p of every feature, one entry per sweep point.
    importance_decay: feature i has importance decay**i (1.0 = uniform).
    relu: False gives the linear model x' = WᵀW x + b.
    steps, batch, lr: AdamW schedule (cosine decay from lr to lr·final_lr_fraction).
    seeds: independent initialisations per density; the lowest-loss one is kept.
    final_lr_fraction: where the cosine decay ends (1.0 = constant lr). Decaying lets the
        geometry settle precisely (pentagon angles, unit norms) in few steps.
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
    seeds: int = 1
    final_lr_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.n_hidden < 1:
            raise ValueError(f"n_features and n_hidden must be positive, got {self.n_features}, {self.n_hidden}")
        if not self.densities or not all(0.0 < p <= 1.0 for p in self.densities):
            raise ValueError(f"densities must be in (0, 1], got {list(self.densities)}")
        if self.importance_decay <= 0:
            raise ValueError(f"importance_decay must be positive, got {self.importance_decay}")
        for name in ("steps", "batch", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 < self.final_lr_fraction <= 1:
            raise ValueError(f"lr must be > 0 and final_lr_fraction in (0, 1], got {self.lr}, {self.final_lr_fraction}")

    @property
    def importance(self) -> torch.Tensor:
        """I_i = decay**i, shape [n]."""
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)


@dataclass
class ToyModels:
    """Trained instances, one per density (the best seed of each).

    W [I, m, n], b [I, n], loss [I] (training loss averaged over the last tenth of the steps).
    seed_losses [I, seeds]: the same for every restart; chosen [I]: the restart kept.
    """

    config: ToyConfig
    W: torch.Tensor
    b: torch.Tensor
    loss: torch.Tensor
    seed_losses: torch.Tensor | None = None
    chosen: torch.Tensor | None = None

    @property
    def densities(self) -> list[float]:
        return [float(p) for p in self.config.densities]

    def directions(self, i: int) -> torch.Tensor:
        """Feature directions of instance i as rows: Wᵀ [n, m]."""
        return self.W[i].T.contiguous()


def sample_features(batch: int, densities: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """x [batch, I, n]: each entry nonzero with its instance's p, uniform in [0, 1] when nonzero."""
    return _sample(densities, batch, n, generator).transpose(0, 1)


def _sample(densities: torch.Tensor, batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """x [I, batch, n] from one uniform draw: given u < p, u / p is uniform in [0, 1)."""
    p = densities.reshape(-1, 1, 1)
    u = torch.rand(p.shape[0], batch, n, generator=generator)
    return torch.where(u < p, u / p, torch.zeros(()))


def forward(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """x [B, I, n] -> x' [B, I, n] through each instance's own W [I, m, n], b [I, n]."""
    out = _forward(W.transpose(1, 2), b[:, None, :], x.transpose(0, 1), relu)
    return out.transpose(0, 1)


def _forward(Wt: torch.Tensor, b: torch.Tensor, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """Batched-matmul layout (what trains fast on a CPU): x [I, B, n], Wt [I, n, m], b [I, 1, n]."""
    out = torch.baddbmm(b, torch.bmm(x, Wt), Wt.transpose(1, 2))
    return torch.relu(out) if relu else out


def _lr_at(step: int, cfg: ToyConfig) -> float:
    f = cfg.final_lr_fraction
    return cfg.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))


def train_toy_models(cfg: ToyConfig, progress: bool = False, desc: str = "training toy models") -> ToyModels:
    """Train every (density, seed) instance of ``cfg`` at once; keep the best seed per density.

    The seeds of one density see the same data at every step, so their tail losses are a
    paired comparison (the choice is not decided by sampling noise).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    D, S, n, m = len(cfg.densities), cfg.seeds, cfg.n_features, cfg.n_hidden
    dens = torch.tensor([float(p) for p in cfg.densities], dtype=torch.float32)
    imp = cfg.importance
    # Instance d * S + s is seed s of density d; rows of Wt are feature directions.
    Wt = torch.nn.Parameter(torch.randn(D * S, n, m, generator=g) * (2.0 / (n + m)) ** 0.5)
    b = torch.nn.Parameter(torch.zeros(D * S, 1, n))
    opt = torch.optim.AdamW([Wt, b], lr=cfg.lr, weight_decay=0.0)
    tail = max(1, cfg.steps // 10)
    running = torch.zeros(D * S, dtype=torch.float64)
    for step in tqdm(range(cfg.steps), desc=desc, unit="step", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = _sample(dens, cfg.batch, n, g).repeat_interleave(S, dim=0)
        err = (x - _forward(Wt, b, x, cfg.relu)) ** 2
        loss = (err * imp).sum(-1).mean(1)  # [D*S]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # instances are independent: their gradients do not mix
        opt.step()
        if step >= cfg.steps - tail:
            running += loss.detach().double()
    seed_losses = (running / tail).reshape(D, S)
    chosen = seed_losses.argmin(1)
    keep = torch.arange(D) * S + chosen
    W = Wt.detach()[keep].transpose(1, 2).contiguous()
    return ToyModels(cfg, W, b.detach()[keep, 0].clone(), seed_losses[torch.arange(D), chosen], seed_losses, chosen)


def adjacent_angles(directions: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between neighbouring directions in the plane, going round once.

    directions: [n, 2] rows (e.g. :meth:`ToyModels.directions` of an m = 2 model). A regular
    n-gon gives n angles of 360/n; the angles always sum to 360.
    """
    if directions.ndim != 2 or directions.shape[1] != 2:
        raise ValueError(f"directions must be [n, 2], got shape {tuple(directions.shape)}")
    theta = torch.sort(torch.atan2(directions[:, 1].double(), directions[:, 0].double())).values
    gaps = torch.diff(torch.cat([theta, theta[:1] + 2 * math.pi]))
    return torch.rad2deg(gaps)
