"""ActivationStats: streaming per-feature statistics over any number of tokens."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..ops._common import check_features, check_float
from ..ops.activation_stats import (
    StatsBatch,
    activation_stats,
    activation_stats_sparse,
    check_sparse_codes,
)
from ._state import (
    Spec,
    chan_merge,
    check_device,
    check_threshold,
    dist_parallel_moments,
    is_int,
    positive_int_field,
    threshold_field,
)
from .base import Accumulator, copied

#: log10-density histogram: SAELens's convention log10(density + 1e-10), so a dead feature
#: sits at -10; fixed edges from -10 to 0 in steps of 0.2 (50 bins, last one closed).
LOG10_EPS = 1e-10
LOG10_BINS = torch.linspace(-10.0, 0.0, 51, dtype=torch.float64)

#: How far (relative to the largest magnitude involved) a mean may sit outside [min, max],
#: and a firing sum outside fire_count x (threshold, max]: the kernels reduce 16/32-bit
#: inputs in float32 over chunks of tokens before merging in float64, so a mean of values
#: near an extreme can round past it by float32 rounding of one chunk (~1e-5 relative; in
#: float64, 3 x 0.1 / 3 > 0.1 by an ulp). The check is for states that are wrong, not rounded.
BOUND_RTOL = 1e-3


def _count_problems(s: Mapping[str, torch.Tensor]) -> list[str]:
    """Counts: 0 <= fire_count <= finite_count <= n_tokens, and l0_hist a histogram of the
    tokens whose firings add up to the features' firing counts."""
    nt, finite, fire, hist = int(s["n_tokens"]), s["finite_count"], s["fire_count"], s["l0_hist"]
    j = torch.arange(hist.numel(), dtype=torch.int64, device=hist.device)
    checks = [
        (nt < 0, f"n_tokens={nt} is negative"),
        (bool((fire < 0).any() | (fire > finite).any()), "fire_count must lie in [0, finite_count]"),
        (bool((finite > nt).any()), "finite_count exceeds n_tokens"),
        (bool((hist < 0).any()), "l0_hist has negative counts"),
        (int(hist.sum()) != nt, f"l0_hist sums to {int(hist.sum())}, not n_tokens={nt}"),
        (int((hist * j).sum()) != int(fire.sum()), "l0_hist's firings differ from the sum of fire_count"),
    ]
    return [msg for bad, msg in checks if bad]


def _value_problems(s: Mapping[str, torch.Tensor], threshold: float) -> list[str]:
    """Moments and extremes: zero/empty where nothing was seen; otherwise finite extremes,
    min <= mean <= max, M2 >= 0, the firing values' sum within (threshold, max] per firing,
    and max above / min at or below the threshold as the firing counts require."""
    finite, fire = s["finite_count"], s["fire_count"]
    mean, m2, mx, mn, act = s["mean"], s["m2"], s["max"], s["min"], s["active_sum"]
    seen, fired = finite > 0, fire > 0
    tol = BOUND_RTOL * torch.maximum(mx.abs(), mn.abs()).where(seen, 0.0)
    nf = fire.double()
    act_tol = BOUND_RTOL * nf * torch.maximum(mx.abs(), torch.full_like(mx, abs(threshold))).where(fired, 0.0)
    inf = float("inf")
    checks = [
        (torch.where(seen, mx.isfinite() & mn.isfinite() & (mx >= mn), (mx == -inf) & (mn == inf)),
         "max/min are inconsistent with finite_count"),
        (m2 >= 0, "m2 (centred second moment) is negative or NaN"),
        (torch.where(seen, mean.isfinite() & (mean >= mn - tol) & (mean <= mx + tol), (mean == 0) & (m2 == 0)),
         "mean must be finite and within [min, max] (0 with m2 0 where no finite value was seen)"),
        (~fired | (mx > threshold), "max must exceed the threshold where a feature fired"),
        ((fire == finite) | (mn <= threshold), "min must be at most the threshold where a finite value did not fire"),
        (torch.where(fired, (act >= nf * threshold - act_tol) & (act <= nf * mx + act_tol), act == 0),
         "active_sum must lie within fire_count x (threshold, max]"),
    ]  # fmt: skip
    return [msg for ok, msg in checks if not bool(ok.all())]


class ActivationStats(Accumulator):
    """Streaming statistics of ``n_features`` features over tokens.

    ``update(x)`` takes dense activations ``x [..., n]`` (leading dims are tokens);
    ``update_sparse(indices [T, k], values [T, k])`` takes top-k codes, where unlisted
    features are 0. A feature *fires* on a token when its value is finite and above
    ``threshold`` (finite). Non-finite values are excluded from every moment and counted in
    :attr:`nonfinite_count`. State is float64/int64 and merges exactly (Chan's formulas),
    so any split of the tokens into batches gives the same result as one batch.

    The state lives on ``device`` (default: the device of the first update).
    """

    KIND = "ActivationStats"
    STATE: ClassVar[dict[str, str]] = {
        "n_tokens": "_n_tokens",
        "finite_count": "_finite",
        "fire_count": "_fire",
        "mean": "_mean",
        "m2": "_m2",
        "max": "_max",
        "min": "_min",
        "active_sum": "_active_sum",
        "l0_hist": "_l0_hist",
    }
    CONFIG: ClassVar[dict] = {"n_features": positive_int_field, "threshold": threshold_field}

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
        dev = self._device or torch.device("cpu")
        n = n_features
        f64 = dict(dtype=torch.float64, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        self._n_tokens = 0
        self._finite = torch.zeros(n, **i64)
        self._fire = torch.zeros(n, **i64)
        self._mean = torch.zeros(n, **f64)
        self._m2 = torch.zeros(n, **f64)
        self._max = torch.full((n,), -float("inf"), **f64)
        self._min = torch.full((n,), float("inf"), **f64)
        self._active_sum = torch.zeros(n, **f64)
        self._l0_hist = torch.zeros(n + 1, **i64)

    # ------------------------------------------------------------------ state
    @classmethod
    def _spec(cls, config: Mapping[str, object]) -> Spec:
        n = config["n_features"]
        f, i = torch.float64, torch.int64
        vec = {k: ((n,), f) for k in ("mean", "m2", "max", "min", "active_sum")}
        return {"n_tokens": ((), i), "finite_count": ((n,), i), "fire_count": ((n,), i), **vec,
                "l0_hist": ((n + 1,), i)}  # fmt: skip

    def _problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return _count_problems(state) + _value_problems(state, self.threshold)

    def _merge_batch(self, b: StatsBatch, n_tokens: int) -> None:
        self._mean, self._m2 = chan_merge(self._finite, self._mean, self._m2, b.finite_count, b.mean, b.m2)
        self._finite += b.finite_count
        self._fire += b.fire_count
        self._max = torch.maximum(self._max, b.max)
        self._min = torch.minimum(self._min, b.min)
        self._active_sum += b.active_sum
        self._l0_hist += torch.bincount(b.l0, minlength=self.n_features + 1)
        self._n_tokens += n_tokens

    def _merge_state(self, o: Mapping[str, torch.Tensor]) -> None:
        self._mean, self._m2 = chan_merge(self._finite, self._mean, self._m2, o["finite_count"], o["mean"], o["m2"])
        self._finite += o["finite_count"]
        self._fire += o["fire_count"]
        self._max = torch.maximum(self._max, o["max"])
        self._min = torch.minimum(self._min, o["min"])
        self._active_sum += o["active_sum"]
        self._l0_hist += o["l0_hist"]
        self._n_tokens += int(o["n_tokens"])

    def _all_reduce_tensors(self, group) -> None:
        import torch.distributed as dist

        n_tot, self._mean, self._m2 = dist_parallel_moments(self._finite, self._mean, self._m2, group)
        self._finite = n_tot.round().long()
        for t in (self._fire, self._active_sum, self._l0_hist):
            dist.all_reduce(t, group=group)
        dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(self._min, op=dist.ReduceOp.MIN, group=group)

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

    # ------------------------------------------------------------------ results
    fire_count = copied("_fire", "[n] int64: tokens on which each feature fired.")

    @property
    def density(self) -> torch.Tensor:
        """[n] float64: firing probability fire_count / n_tokens (0 before any token)."""
        return self._fire.double() / max(self._n_tokens, 1)

    mean = copied("_mean", "[n] float64: mean over finite values.")

    @property
    def var(self) -> torch.Tensor:
        """[n] float64: population variance (ddof=0) over finite values; NaN with none."""
        return self._m2 / self._finite.double().where(self._finite > 0, torch.nan)

    max = copied("_max", "[n] float64: largest finite value (-inf with none).")

    min = copied("_min", "[n] float64: smallest finite value (+inf with none).")

    @property
    def mean_active(self) -> torch.Tensor:
        """[n] float64: mean value on tokens where the feature fired; NaN if it never did."""
        return self._active_sum / self._fire.double().where(self._fire > 0, torch.nan)

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """[n] int64: NaN/±Inf values seen per feature (excluded from the moments)."""
        return self._n_tokens - self._finite

    l0_hist = copied("_l0_hist", "[n + 1] int64: l0_hist[j] = tokens on which exactly j features fired.")

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
