"""TopKCodes: one batch of one side's top-k codes, checked once, shared by every pair it feeds.

Any-layer matching puts each site's codes into one cross-correlation per site of the other
model (16 pairs per site for a 16-layer partner). Validating the codes, finding their
non-finite tokens and computing their per-feature moments are properties of the codes
alone, so they are done once here and reused by every :meth:`CrossCorrelation.update_codes`
they take part in.
"""

from __future__ import annotations

import torch

from ..ops.activation_stats import StatsBatch, activation_stats_sparse, check_sparse_codes
from ._state import check_device


class TopKCodes:
    """Top-k codes ``indices, values [T, k]`` of ``n`` features (index -1 = padding).

    ``names`` are the argument names errors use. The indices are checked on construction
    (shape, dtype, range, no duplicates per token) and stored as int64. :meth:`finite`,
    :attr:`all_finite` and :meth:`moments` are computed on first use and cached;
    :meth:`rows` and :meth:`permuted` derive codes of the same tokens without checking
    them again.
    """

    def __init__(
        self, indices: torch.Tensor, values: torch.Tensor, n: int, *, names: tuple[str, str] = ("indices", "values")
    ) -> None:
        for name, t in zip(names, (indices, values)):
            if isinstance(t, torch.Tensor):
                check_device(t.device, name)  # before the range check reads a meta tensor
        check_sparse_codes(indices, values, n, *names)
        self._init(indices.long(), values, n, {})

    def _init(self, indices: torch.Tensor, values: torch.Tensor, n: int, moments: dict) -> None:
        self.indices, self.values, self.n = indices, values, n
        self._finite: torch.Tensor | None = None
        self._all_finite: bool | None = None
        self._moments = moments

    @classmethod
    def _derived(cls, indices: torch.Tensor, values: torch.Tensor, n: int, moments: dict) -> TopKCodes:
        out = cls.__new__(cls)
        out._init(indices, values, n, moments)
        return out

    @property
    def n_tokens(self) -> int:
        return self.indices.shape[0]

    def finite(self) -> torch.Tensor:
        """[T] bool: tokens whose values are all finite."""
        if self._finite is None:
            self._finite = torch.isfinite(self.values).all(1)
        return self._finite

    @property
    def all_finite(self) -> bool:
        """Whether every token is finite (one host read, cached)."""
        if self._all_finite is None:
            self._all_finite = bool(self.finite().all())
        return self._all_finite

    def moments(self, backend: str | None = None) -> StatsBatch:
        """Per-feature statistics of every token (zeros included), cached per backend."""
        key = backend or ""
        if key not in self._moments:
            self._moments[key] = activation_stats_sparse(
                self.indices, self.values, self.n, 0.0, backend=backend, validated=True
            )
        return self._moments[key]

    def rows(self, sel: torch.Tensor | slice) -> TopKCodes:
        """The tokens ``sel`` (a slice, index or mask tensor); their moments are computed afresh."""
        return self._derived(self.indices[sel], self.values[sel], self.n, {})

    def permuted(self, perm: torch.Tensor) -> TopKCodes:
        """The same tokens reordered by the permutation ``perm``. A permutation leaves each
        feature's moments unchanged, so the moments cache is shared (values as computed on
        the original order)."""
        if perm.shape != (self.n_tokens,):
            raise ValueError(f"perm must be a permutation of {self.n_tokens} tokens, got shape {tuple(perm.shape)}")
        return self._derived(self.indices[perm], self.values[perm], self.n, self._moments)
