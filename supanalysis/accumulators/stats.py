"""ActivationStats: streaming per-feature statistics over any number of tokens."""

from __future__ import annotations

import os

import torch

from ..ops._common import check_features, check_float
from ..ops.activation_stats import (
    StatsBatch,
    activation_stats,
    activation_stats_sparse,
    check_sparse_codes,
)
from ._state import (
    FORMAT_VERSION,
    atomic_save,
    chan_merge,
    check_device,
    check_state,
    check_threshold,
    dist_parallel_moments,
    is_int,
    load_file_checked,
    resolve_device,
)

#: log10-density histogram: SAELens's convention log10(density + 1e-10), so a dead feature
#: sits at -10; fixed edges from -10 to 0 in steps of 0.2 (50 bins, last one closed).
LOG10_EPS = 1e-10
LOG10_BINS = torch.linspace(-10.0, 0.0, 51, dtype=torch.float64)


def _expected_state(n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    f, i = torch.float64, torch.int64
    return {
        "n_tokens": ((), i),
        "finite_count": ((n,), i),
        "fire_count": ((n,), i),
        "mean": ((n,), f),
        "m2": ((n,), f),
        "max": ((n,), f),
        "min": ((n,), f),
        "active_sum": ((n,), f),
        "l0_hist": ((n + 1,), i),
    }


def _check_invariants(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a state no sequence of updates can produce (a corrupt or hand-edited file), so it
    never passes for valid statistics."""
    nt = int(state["n_tokens"])
    finite, fire = state["finite_count"], state["fire_count"]
    seen = finite > 0
    mx, mn = state["max"], state["min"]
    ext_ok = torch.where(
        seen, torch.isfinite(mx) & torch.isfinite(mn) & (mx >= mn), (mx == -float("inf")) & (mn == float("inf"))
    )
    problems = [
        (nt < 0, f"n_tokens={nt} is negative"),
        (bool((fire < 0).any() | (fire > finite).any()), "fire_count must lie in [0, finite_count]"),
        (bool((finite > nt).any()), "finite_count exceeds n_tokens"),
        (bool((state["l0_hist"] < 0).any()), "l0_hist has negative counts"),
        (int(state["l0_hist"].sum()) != nt, f"l0_hist sums to {int(state['l0_hist'].sum())}, not n_tokens={nt}"),
        (not bool((state["m2"] >= 0).all()), "m2 (centred second moment) is negative or NaN"),
        (not bool(ext_ok.all()), "max/min are inconsistent with finite_count"),
    ]
    bad = [msg for cond, msg in problems if cond]
    if bad:
        raise ValueError(f"{where}: inconsistent state ({'; '.join(bad)})")


class ActivationStats:
    """Streaming statistics of ``n_features`` features over tokens.

    ``update(x)`` takes dense activations ``x [..., n]`` (leading dims are tokens);
    ``update_sparse(indices [T, k], values [T, k])`` takes top-k codes, where unlisted
    features are 0. A feature *fires* on a token when its value is finite and above
    ``threshold``. Non-finite values are excluded from every moment and counted in
    :attr:`nonfinite_count`. State is float64/int64 and merges exactly (Chan's formulas),
    so any split of the tokens into batches gives the same result as one batch.

    The state lives on ``device`` (default: the device of the first update).
    """

    KIND = "ActivationStats"

    def __init__(
        self,
        n_features: int,
        threshold: float = 0.0,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        if not is_int(n_features) or n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        self.n_features = n_features
        self.threshold = check_threshold(threshold, "ActivationStats")
        self.backend = backend
        self._device = check_device(device, "device", allow_meta=True) if device is not None else None
        self._init_state(self._device or torch.device("cpu"))

    # ------------------------------------------------------------------ state
    def _init_state(self, device: torch.device) -> None:
        n = self.n_features
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self._n_tokens = 0
        self._finite = torch.zeros(n, **i64)
        self._fire = torch.zeros(n, **i64)
        self._mean = torch.zeros(n, **f64)
        self._m2 = torch.zeros(n, **f64)
        self._max = torch.full((n,), -float("inf"), **f64)
        self._min = torch.full((n,), float("inf"), **f64)
        self._active_sum = torch.zeros(n, **f64)
        self._l0_hist = torch.zeros(n + 1, **i64)

    def _adopt(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            check_device(t.device, "input")
        dev = resolve_device(self._device, *tensors)
        if self._device is None:
            self._device = dev
            if self._n_tokens == 0:
                self._init_state(dev)
            else:  # pragma: no cover - state was loaded on CPU before any update
                self.to(dev)

    def _merge_batch(self, b: StatsBatch, n_tokens: int) -> None:
        self._mean, self._m2 = chan_merge(self._finite, self._mean, self._m2, b.finite_count, b.mean, b.m2)
        self._finite += b.finite_count
        self._fire += b.fire_count
        self._max = torch.maximum(self._max, b.max)
        self._min = torch.minimum(self._min, b.min)
        self._active_sum += b.active_sum
        self._l0_hist += torch.bincount(b.l0, minlength=self.n_features + 1)
        self._n_tokens += n_tokens

    # ------------------------------------------------------------------ updates
    def update(self, x: torch.Tensor) -> ActivationStats:
        """Add a batch of dense activations. x: (..., n_features)."""
        check_float("x", x)
        check_features("x", x, self.n_features)
        self._adopt(x)
        b = activation_stats(x, self.threshold, backend=self.backend)
        self._merge_batch(b, b.l0.numel())
        return self

    def update_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> ActivationStats:
        """Add a batch of top-k codes. indices, values: (T, k); -1 in indices = padding."""
        for name, t in (("indices", indices), ("values", values)):
            if isinstance(t, torch.Tensor):  # before the range check reads values (fails on meta)
                check_device(t.device, name)
        check_sparse_codes(indices, values, self.n_features)
        self._adopt(indices, values)
        b = activation_stats_sparse(
            indices, values, self.n_features, self.threshold, backend=self.backend, validated=True
        )
        self._merge_batch(b, indices.shape[0])
        return self

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Fold another accumulator (same features and threshold) into this one."""
        if not isinstance(other, ActivationStats):
            raise TypeError(f"other must be an ActivationStats, got {type(other).__name__}")
        if other.n_features != self.n_features or other.threshold != self.threshold:
            raise ValueError(
                f"cannot merge ActivationStats(n={other.n_features}, threshold={other.threshold}) into "
                f"ActivationStats(n={self.n_features}, threshold={self.threshold})"
            )
        o = other.state_dict()
        dev = self._mean.device
        o = {k: v.to(dev) for k, v in o.items()}
        self._mean, self._m2 = chan_merge(self._finite, self._mean, self._m2, o["finite_count"], o["mean"], o["m2"])
        self._finite += o["finite_count"]
        self._fire += o["fire_count"]
        self._max = torch.maximum(self._max, o["max"])
        self._min = torch.minimum(self._min, o["min"])
        self._active_sum += o["active_sum"]
        self._l0_hist += o["l0_hist"]
        self._n_tokens += int(o["n_tokens"])
        return self

    def all_reduce(self, group=None) -> ActivationStats:
        """Combine the accumulators of every rank of ``group`` (torch.distributed) in place."""
        import torch.distributed as dist

        n_tot, self._mean, self._m2 = dist_parallel_moments(self._finite, self._mean, self._m2, group)
        self._finite = n_tot.round().long()
        for t in (self._fire, self._active_sum, self._l0_hist):
            dist.all_reduce(t, group=group)
        dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(self._min, op=dist.ReduceOp.MIN, group=group)
        nt = torch.tensor([self._n_tokens], dtype=torch.int64, device=self._mean.device)
        dist.all_reduce(nt, group=group)
        self._n_tokens = int(nt)
        return self

    # ------------------------------------------------------------------ results
    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    @property
    def fire_count(self) -> torch.Tensor:
        """[n] int64: tokens on which each feature fired."""
        return self._fire.clone()

    @property
    def density(self) -> torch.Tensor:
        """[n] float64: firing probability fire_count / n_tokens (0 before any token)."""
        return self._fire.double() / max(self._n_tokens, 1)

    @property
    def mean(self) -> torch.Tensor:
        """[n] float64: mean over finite values."""
        return self._mean.clone()

    @property
    def var(self) -> torch.Tensor:
        """[n] float64: population variance (ddof=0) over finite values; NaN with none."""
        return self._m2 / self._finite.double().where(self._finite > 0, torch.nan)

    @property
    def max(self) -> torch.Tensor:
        return self._max.clone()

    @property
    def min(self) -> torch.Tensor:
        return self._min.clone()

    @property
    def mean_active(self) -> torch.Tensor:
        """[n] float64: mean value on tokens where the feature fired; NaN if it never did."""
        return self._active_sum / self._fire.double().where(self._fire > 0, torch.nan)

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """[n] int64: NaN/±Inf values seen per feature (excluded from the moments)."""
        return self._n_tokens - self._finite

    @property
    def l0_hist(self) -> torch.Tensor:
        """[n + 1] int64: l0_hist[j] = tokens on which exactly j features fired."""
        return self._l0_hist.clone()

    @property
    def mean_l0(self) -> float:
        j = torch.arange(self.n_features + 1, dtype=torch.float64, device=self._l0_hist.device)
        return float((self._l0_hist.double() * j).sum() / max(self._n_tokens, 1))

    def log10_density(self) -> torch.Tensor:
        """[n] float64: log10(density + 1e-10), SAELens's convention (dead -> -10)."""
        return torch.log10(self.density + LOG10_EPS)

    def log10_density_hist(self, bins: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [len(bins) - 1] int64, edges) of :meth:`log10_density`.

        Default edges: -10 to 0 in steps of 0.2 (:data:`LOG10_BINS`); values outside the
        edges are clamped into the end bins, so the counts always sum to n_features.
        """
        edges = (LOG10_BINS if bins is None else torch.as_tensor(bins, dtype=torch.float64)).cpu()
        if edges.dim() != 1 or edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError("bins must be a 1-D increasing sequence of at least two edges")
        v = self.log10_density().cpu().clamp(float(edges[0]), float(edges[-1]))
        idx = (torch.bucketize(v, edges, right=True) - 1).clamp(0, edges.numel() - 2)
        return torch.bincount(idx, minlength=edges.numel() - 1), edges

    def save_saelens_sparsity(self, path: str | os.PathLike) -> None:
        """Write SAELens's ``sparsity.safetensors``: key ``sparsity`` = log10 density (float32)."""
        from safetensors.torch import save_file

        save_file({"sparsity": self.log10_density().float().cpu().contiguous()}, os.fspath(path))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "n_tokens": torch.tensor(self._n_tokens, dtype=torch.int64),
            "finite_count": self._finite.clone(),
            "fire_count": self._fire.clone(),
            "mean": self._mean.clone(),
            "m2": self._m2.clone(),
            "max": self._max.clone(),
            "min": self._min.clone(),
            "active_sum": self._active_sum.clone(),
            "l0_hist": self._l0_hist.clone(),
        }

    def _expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return _expected_state(self.n_features)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_state(state, self._expected(), "ActivationStats.load_state_dict")
        _check_invariants(state, "ActivationStats.load_state_dict")
        dev = self._device or torch.device("cpu")
        s = {k: v.to(dev).clone() for k, v in state.items()}
        self._n_tokens = int(s["n_tokens"])
        self._finite, self._fire = s["finite_count"], s["fire_count"]
        self._mean, self._m2 = s["mean"], s["m2"]
        self._max, self._min = s["max"], s["min"]
        self._active_sum, self._l0_hist = s["active_sum"], s["l0_hist"]

    def to(self, device: torch.device | str) -> ActivationStats:
        self._device = torch.device(device)
        self.load_state_dict(self.state_dict())
        return self

    def save(self, path: str | os.PathLike) -> None:
        meta = {
            "kind": self.KIND,
            "version": FORMAT_VERSION,
            "n_features": self.n_features,
            "threshold": self.threshold,
        }
        atomic_save(self.state_dict(), meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> ActivationStats:
        tensors, meta = load_file_checked(path, cls.KIND)
        n, threshold = meta.get("n_features"), meta.get("threshold")
        # Strict types: int(4.7) or int(inf) used to truncate or raise OverflowError.
        if not is_int(n) or n < 1:
            raise ValueError(f"{path}: bad ActivationStats metadata: n_features={n!r} is not a positive int")
        threshold = check_threshold(threshold, f"{path}: bad ActivationStats metadata")
        # Check the stored tensors against n *before* allocating state of that size: a corrupt
        # n_features must not make us allocate (or OOM on) a huge state.
        check_state(tensors, _expected_state(n), f"{path}")
        obj = cls(n, threshold, device=device)
        try:
            obj.load_state_dict(tensors)
        except ValueError as exc:  # name the file, not just the method
            raise ValueError(f"{path}: {exc}") from exc
        return obj

    def __repr__(self) -> str:
        return (
            f"ActivationStats(n_features={self.n_features}, threshold={self.threshold}, "
            f"n_tokens={self._n_tokens}, device={self._mean.device})"
        )
