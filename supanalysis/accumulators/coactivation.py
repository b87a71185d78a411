"""CoActivation: how often pairs of features fire on the same token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from ..ops._common import check_features, check_float, check_index, check_indices_range, check_rank, flatten_tokens
from ..ops.coactivation import coactivation_update, coactivation_update_sparse
from ._state import Spec, check_device, check_threshold, check_top_k, is_int, positive_int_field, threshold_field
from .base import Accumulator

METRICS = ("count", "jaccard", "lift")


class CoActivation(Accumulator):
    """Exact pair counts C[i, j] = #tokens on which features i and j both fire.

    Dense counts (int64 [n, n]); meant for n up to a few tens of thousands
    (``max_bytes`` guards the allocation). The diagonal is each feature's firing count.
    """

    KIND = "CoActivation"
    STATE: ClassVar[dict[str, str]] = {"n_tokens": "_n_tokens", "counts": "_counts"}
    CONFIG: ClassVar[dict] = {"n": positive_int_field, "threshold": threshold_field}
    LOAD_KWARGS: ClassVar[dict] = {"max_bytes": 1 << 62}  # the file's counts were already read at full size

    def __init__(
        self,
        n: int,
        threshold: float = 0.0,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        max_bytes: int = 8 << 30,
    ) -> None:
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if n * n * 8 > max_bytes:
            raise MemoryError(f"CoActivation({n}) needs {n * n * 8 / 2**30:.1f} GiB of int64 counts, over max_bytes")
        self.n = n
        self.threshold = check_threshold(threshold, "CoActivation")
        self.backend = backend
        self._device = check_device(device, "device", allow_meta=True) if device is not None else None
        self._counts = torch.zeros(n, n, dtype=torch.int64, device=self._device or "cpu")
        self._n_tokens = 0

    def update(self, x: torch.Tensor) -> CoActivation:
        """Add dense activations. x: (..., n); a feature fires where finite and > threshold."""
        check_float("x", x)
        check_features("x", x, self.n)
        self._adopt(x)
        x2 = flatten_tokens(x)
        coactivation_update(self._counts, x2, self.threshold, backend=self.backend)
        self._n_tokens += x2.shape[0]
        return self

    def update_sparse(self, indices: torch.Tensor) -> CoActivation:
        """Add top-k codes: indices (T, k) of the active features, -1 = padding."""
        check_index("indices", indices)
        check_rank("indices", indices, 2, "[tokens, k]")
        # Before the range check, which reads values (.item() fails on a meta tensor).
        check_device(indices.device, "indices")
        check_indices_range("indices", indices, self.n)
        self._adopt(indices)
        coactivation_update_sparse(self._counts, indices.contiguous(), backend=self.backend)
        self._n_tokens += indices.shape[0]
        return self

    def _merge_state(self, o: Mapping[str, torch.Tensor]) -> None:
        self._counts += o["counts"]
        self._n_tokens += int(o["n_tokens"])

    def _all_reduce_tensors(self, group) -> None:
        import torch.distributed as dist

        dist.all_reduce(self._counts, group=group)

    def counts(self) -> torch.Tensor:
        """[n, n] int64 co-firing counts (a copy)."""
        return self._counts.clone()

    def scores(self, metric: str = "count") -> torch.Tensor:
        """[n, n] float64: count, Jaccard C_ij/(C_ii+C_jj−C_ij) or lift C_ij·N/(C_ii·C_jj) (0 where undefined)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        C = self._counts.double()
        if metric == "count":
            return C
        d = C.diagonal()
        if metric == "jaccard":
            den = d[:, None] + d[None, :] - C
        else:
            den = d[:, None] * d[None, :] / max(self._n_tokens, 1)
        return torch.where(den > 0, C / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(C))

    def top_partners(self, k: int, metric: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
        """(index [n, k] int64, score [n, k] float64) of each feature's top partners (self excluded).

        k is clamped to the n - 1 other features (k >= n returns every partner, ranked). Ties
        go to the smaller index.
        """
        kk = check_top_k(k, self.n)
        S = self.scores(metric)
        S.fill_diagonal_(-float("inf"))
        # Stable descending sort: among equal scores the smaller index comes first.
        order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :kk]
        return order, S.gather(1, order)

    @classmethod
    def _spec(cls, config: Mapping[str, object]) -> Spec:
        n = config["n"]
        return {"n_tokens": ((), torch.int64), "counts": ((n, n), torch.int64)}

    def _problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """C is symmetric with 0 <= C_ij <= C_jj <= n_tokens (co-firing needs firing) and
        C_ij >= C_ii + C_jj - n_tokens (two features firing on more than all tokens overlap)."""
        C, nt = state["counts"], int(state["n_tokens"])
        d = C.diagonal()
        ok = (
            nt >= 0
            and not bool((C < 0).any())
            and torch.equal(C, C.T)
            and not bool((C > d[None, :]).any())
            and not bool((d > nt).any())
            and not bool((C < d[:, None] + d[None, :] - nt).any())
        )
        return [] if ok else ["need n_tokens >= 0, C symmetric, C_ii + C_jj - n_tokens <= C_ij <= C_jj <= n_tokens"]
