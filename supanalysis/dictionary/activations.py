"""Dictionary activation functions, one registry (name -> class).

Each maps encoder pre-activations (T, n) to codes, densely (``dense``) or as the k largest
codes (``sparse`` -> indices (T, k) int64, values (T, k)) without building a (T, n) code
matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[Activation]] = {}


def register_activation(name: str) -> Callable[[type[Activation]], type[Activation]]:
    """Class decorator adding an activation to :data:`ACTIVATIONS` under ``name``."""

    def add(cls: type[Activation]) -> type[Activation]:
        cls.name = name
        ACTIVATIONS[name] = cls
        return cls

    return add


class Activation(nn.Module):
    """Base class. ``k`` is the number of codes ``sparse`` keeps (None: must be passed)."""

    name = "activation"
    k: int | None = None

    def dense(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def sparse(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` largest codes per row: (indices (T, k), values (T, k)); zero codes may
        appear among them when fewer than k are active."""
        k = k if k is not None else self.k
        if k is None:
            raise ValueError(f"{self.name} has no k; pass k= to sparse encode")
        k = min(k, pre.shape[-1])
        values, indices = self.dense(pre).topk(k, dim=-1, sorted=False)
        return indices, values

    def extra_state(self) -> dict:
        """JSON-able hyperparameters written to a dictionary's config."""
        return {}


@register_activation("relu")
class ReLU(Activation):
    def dense(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)


@register_activation("topk")
class TopK(Activation):
    """ReLU of the k largest pre-activations per row, everything else 0 (Gao et al. 2024)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK k must be a positive int, got {k!r}")
        self.k = k

    def sparse(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        k = min(self.k if k is None else k, pre.shape[-1])
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return indices, torch.relu(values)

    def dense(self, pre: Tensor) -> Tensor:
        indices, values = self.sparse(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def extra_state(self) -> dict:
        return {"k": self.k}


@register_activation("jumprelu")
class JumpReLU(Activation):
    """pre where pre > threshold (a per-latent parameter, shape (n,)), else 0."""

    def __init__(self, threshold: Tensor) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.as_tensor(threshold), requires_grad=False)

    def dense(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold)
