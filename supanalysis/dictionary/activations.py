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
    """ReLU of the k largest pre-activations per row, everything else 0 (Gao et al. 2024).

    ``relu_first=False`` selects among the raw pre-activations, then applies ReLU (SAELens);
    ``relu_first=True`` applies ReLU, then selects (sparsify). The dense codes agree; the
    indices differ only where fewer than k pre-activations are positive (which zero codes are
    listed) or among exact ties, and following the reference's order keeps even those equal.
    """

    def __init__(self, k: int, *, relu_first: bool = False) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK k must be a positive int, got {k!r}")
        self.k, self.relu_first = k, relu_first

    def sparse(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        k = min(self.k if k is None else k, pre.shape[-1])
        if self.relu_first:
            values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
            return indices, values
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return indices, torch.relu(values)

    def dense(self, pre: Tensor) -> Tensor:
        indices, values = self.sparse(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def extra_state(self) -> dict:
        return {"k": self.k}


@register_activation("groupmax")
class GroupMax(Activation):
    """sparsify's ``groupmax``: the latents form k contiguous groups of n/k; each group keeps
    its largest ReLU'd pre-activation, so every row has exactly k codes (one per group)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"GroupMax k must be a positive int, got {k!r}")
        self.k = k

    def _groups(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        n = pre.shape[-1]
        if n % self.k:
            raise ValueError(f"groupmax needs the latent count {n} to be a multiple of k={self.k}")
        values, indices = torch.relu(pre).unflatten(-1, (self.k, -1)).max(dim=-1)
        offsets = torch.arange(0, n, n // self.k, device=pre.device)
        return offsets + indices, values

    def sparse(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        indices, values = self._groups(pre)
        if k is not None and k < self.k:
            values, pick = values.topk(k, dim=-1, sorted=False)
            indices = indices.gather(-1, pick)
        return indices, values

    def dense(self, pre: Tensor) -> Tensor:
        indices, values = self._groups(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def extra_state(self) -> dict:
        return {"k": self.k}


@register_activation("jumprelu")
class JumpReLU(Activation):
    """relu(pre) where pre > threshold (a per-latent parameter, shape (n,)), else 0.

    The ReLU matters only for thresholds below 0, where SAELens keeps it: a latent with a
    negative threshold never emits a negative code."""

    def __init__(self, threshold: Tensor) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.as_tensor(threshold), requires_grad=False)

    def dense(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
