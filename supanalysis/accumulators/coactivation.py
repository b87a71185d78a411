"""CoActivation: how often pairs of features fire on the same token."""

from __future__ import annotations

import os

import torch

from ..ops._common import check_features, check_float, check_index, check_indices_range, check_rank, flatten_tokens
from ..ops.coactivation import coactivation_update, coactivation_update_sparse
from ._state import (
    FORMAT_VERSION,
    atomic_save,
    check_device,
    check_state,
    check_threshold,
    is_int,
    load_file_checked,
    resolve_device,
)

METRICS = ("count", "jaccard", "lift")


class CoActivation:
    """Exact pair counts C[i, j] = #tokens on which features i and j both fire.

    Dense counts (int64 [n, n]); meant for n up to a few tens of thousands
    (``max_bytes`` guards the allocation). The diagonal is each feature's firing count.
    """

    KIND = "CoActivation"

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

    def _adopt(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            check_device(t.device, "input")
        dev = resolve_device(self._device, *tensors)
        if self._device is None:
            self._device = dev
            self._counts = self._counts.to(dev)

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

    def merge(self, other: CoActivation) -> CoActivation:
        if not isinstance(other, CoActivation):
            raise TypeError(f"other must be a CoActivation, got {type(other).__name__}")
        if other.n != self.n or other.threshold != self.threshold:
            raise ValueError(f"cannot merge CoActivation(n={other.n}) into CoActivation(n={self.n})")
        self._counts += other._counts.to(self._counts.device)
        self._n_tokens += other._n_tokens
        return self

    def all_reduce(self, group=None) -> CoActivation:
        import torch.distributed as dist

        dist.all_reduce(self._counts, group=group)
        t = torch.tensor([self._n_tokens], dtype=torch.int64, device=self._counts.device)
        dist.all_reduce(t, group=group)
        self._n_tokens = int(t)
        return self

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

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

        Ties go to the smaller index; slots beyond the number of other features are -1 / 0.
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        S = self.scores(metric)
        S.fill_diagonal_(-float("inf"))
        kk = min(k, self.n - 1)
        idx = torch.full((self.n, k), -1, dtype=torch.int64, device=S.device)
        val = torch.zeros(self.n, k, dtype=torch.float64, device=S.device)
        if kk > 0:
            # Stable descending sort: among equal scores the smaller index comes first.
            order = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :kk]
            idx[:, :kk] = order
            val[:, :kk] = S.gather(1, order)
        return idx, val

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"n_tokens": torch.tensor(self._n_tokens, dtype=torch.int64), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_state(
            state,
            {"n_tokens": ((), torch.int64), "counts": ((self.n, self.n), torch.int64)},
            "CoActivation.load_state_dict",
        )
        # Refuse counts no update can produce (corrupt or hand-edited files): C is symmetric,
        # non-negative, C_ij <= C_ii (co-firing needs firing) and C_ii <= n_tokens.
        C, nt = state["counts"], int(state["n_tokens"])
        d = C.diagonal()
        if (
            nt < 0
            or bool((C < 0).any())
            or not torch.equal(C, C.T)
            or bool((C > d[None, :]).any())
            or bool((d > nt).any())
        ):
            raise ValueError(
                "CoActivation.load_state_dict: inconsistent counts (need n_tokens >= 0, C symmetric, "
                "0 <= C_ij <= C_jj <= n_tokens)"
            )
        self._n_tokens = int(state["n_tokens"])
        self._counts = state["counts"].to(self._device or "cpu").clone().contiguous()

    def save(self, path: str | os.PathLike) -> None:
        meta = {"kind": self.KIND, "version": FORMAT_VERSION, "n": self.n, "threshold": self.threshold}
        atomic_save(self.state_dict(), meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> CoActivation:
        tensors, meta = load_file_checked(path, cls.KIND)
        n = meta.get("n")
        if not is_int(n) or n < 1:
            raise ValueError(f"{path}: bad CoActivation metadata: n={n!r} is not a positive int")
        threshold = check_threshold(meta.get("threshold"), f"{path}: bad CoActivation metadata")
        # Stored counts must be n x n before allocating them (max_bytes is lifted below).
        check_state(tensors, {"n_tokens": ((), torch.int64), "counts": ((n, n), torch.int64)}, f"{path}")
        obj = cls(n, threshold, device=device, max_bytes=1 << 62)
        try:
            obj.load_state_dict(tensors)
        except ValueError as exc:  # name the file, not just the method
            raise ValueError(f"{path}: {exc}") from exc
        return obj

    def __repr__(self) -> str:
        return f"CoActivation(n={self.n}, threshold={self.threshold}, n_tokens={self._n_tokens})"
