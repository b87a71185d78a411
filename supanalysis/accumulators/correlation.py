"""CrossCorrelation: streaming Pearson correlation between two feature sets over the same tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops._common import check_float, check_rank, flatten_tokens
from ..ops.best_match import best_match
from ..ops.cross_moments import PRECISIONS, check_precision, cross_moments_update
from ..ops.sparse_outer import sparse_outer_update
from ._state import (
    Spec,
    chan_merge,
    check_device,
    dist_parallel_moments,
    is_int,
    positive_int_field,
)
from .base import Accumulator, copied
from .topk_codes import TopKCodes

DEFAULT_MAX_BYTES = 1 << 30

#: A feature counts as constant when its standard deviation is below this fraction of
#: |mean| (or exactly 0): float64 rounding of a mean leaves residues of about 1e-16 |mean|.
CONSTANT_RTOL = 1e-12


def _precision_field(v: object, name: str) -> str:
    """Metadata parser for ``precision``; files from before the option read as "ieee"."""
    if v is None:
        return "ieee"
    if v not in PRECISIONS:
        raise ValueError(f"{name}={v!r} is not one of {PRECISIONS}")
    return v  # type: ignore[return-value]


@dataclass(frozen=True)
class BestMatch:
    """Each feature's best partner on the other side, by signed Pearson correlation.

    max_corr_a [n_a] float64, match_a [n_a] int64 (best feature of B for each feature of A,
    -1 when there is none); max_corr_b, match_b the other way. constant_a / constant_b
    [n] bool flag features with zero variance: their correlation is defined as 0 and
    they are nobody's match (never NaN).
    """

    max_corr_a: torch.Tensor
    match_a: torch.Tensor
    max_corr_b: torch.Tensor
    match_b: torch.Tensor
    constant_a: torch.Tensor
    constant_b: torch.Tensor

    def matched_fraction_a(self, tau: float) -> float:
        """Fraction of A's non-constant features whose best correlation is at least tau."""
        live = ~self.constant_a
        return float((self.max_corr_a[live] >= tau).double().mean()) if bool(live.any()) else 0.0

    def matched_fraction_b(self, tau: float) -> float:
        live = ~self.constant_b
        return float((self.max_corr_b[live] >= tau).double().mean()) if bool(live.any()) else 0.0


class CrossCorrelation(Accumulator):
    """Streaming centred co-moments of ``xa [T, n_a]`` against ``xb [T, n_b]``.

    State (float64): token count, per-feature means and M2 of both sides, and the
    [n_a, n_b] co-moment, merged batch by batch with Chan's formulas (never E[xy]−E[x]E[y]).
    Tokens where either side has a non-finite value are dropped and counted in
    :attr:`n_skipped`. The state lives on ``device`` (default: the first update's device).

    precision: how :meth:`update` multiplies the centred batch. "ieee" (default): float32
    (float64 for float64 batches), exact products. "bf16": each centred value rounded to
    bfloat16 (relative error <= 2^-9), exact products summed in float32: the tensor-core GEMM
    on a GPU (Triton on an H200, bf16 batches: 0.79 s against 3.8 s); every backend forms
    the same products, the sums agree to float32 summation (~5e-8 relative). A correlation
    moves by at most (1 + 2^-9)^2 - 1 ≈ 3.9e-3 (times Σ|ca||cb| / (|ca| |cb|) <= 1), far
    less in practice as the roundings average out: enough for best-match at the usual
    thresholds, not for telling 0.999 from 0.998. Only the co-moment carries it (means and
    variances are exact), and only dense updates: :meth:`update_sparse` multiplies its codes
    exactly in float64. The precision belongs to the updates, not to the state: accumulators
    of either precision merge and all-reduce (the result mixes both roundings).
    """

    KIND = "CrossCorrelation"
    STATE: ClassVar[dict[str, str]] = {
        "n_tokens": "_n",
        "n_skipped": "_skipped",
        "mean_a": "_mean_a",
        "m2_a": "_m2_a",
        "mean_b": "_mean_b",
        "m2_b": "_m2_b",
        "comoment": "_com",
    }
    CONFIG: ClassVar[dict] = {"n_a": positive_int_field, "n_b": positive_int_field, "precision": _precision_field}
    OPTIONS = ("precision",)
    LOAD_KWARGS: ClassVar[dict] = {"max_bytes": 1 << 62}  # the file's co-moment was already read at its full size

    def __init__(
        self,
        n_a: int,
        n_b: int,
        *,
        device: torch.device | str | None = None,
        backend: str | None = None,
        max_bytes: int = 8 << 30,
        precision: str = "ieee",
    ) -> None:
        for name, v in (("n_a", n_a), ("n_b", n_b)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        check_precision(precision)
        need = n_a * n_b * 8
        if need > max_bytes:
            raise MemoryError(
                f"CrossCorrelation({n_a}, {n_b}) needs a {need / 2**30:.1f} GiB float64 co-moment, over "
                f"max_bytes={max_bytes / 2**30:.1f} GiB; raise max_bytes or correlate fewer features"
            )
        self.n_a, self.n_b = n_a, n_b
        self.backend = backend
        self.precision = precision
        self._device = check_device(device, "device", allow_meta=True) if device is not None else None
        f64 = dict(dtype=torch.float64, device=self._device or torch.device("cpu"))
        self._n = 0
        self._skipped = 0
        self._mean_a = torch.zeros(n_a, **f64)
        self._m2_a = torch.zeros(n_a, **f64)
        self._mean_b = torch.zeros(n_b, **f64)
        self._m2_b = torch.zeros(n_b, **f64)
        self._com = torch.zeros(n_a, n_b, **f64)

    # ------------------------------------------------------------------ updates
    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> CrossCorrelation:
        """Add the same tokens seen by both sides. xa: (..., n_a), xb: (..., n_b)."""
        check_float("xa", xa)
        check_float("xb", xb)
        check_precision(self.precision, xa.dtype, xb.dtype)  # before any state changes
        # Before flatten_tokens, which indexes shape[-1]: a 0-d input raised IndexError there.
        for name, x, field, n in (("xa", xa, "n_a", self.n_a), ("xb", xb, "n_b", self.n_b)):
            if x.dim() == 0:
                raise ValueError(f"{name} must have {field}={n} features, got shape ()")
        check_device(xa.device, "xa")
        check_device(xb.device, "xb")
        xa2, xb2 = flatten_tokens(xa), flatten_tokens(xb)
        check_rank("xa", xa2, 2, "[tokens, n_a]")
        if xa2.shape[1] != self.n_a:
            raise ValueError(f"xa must have n_a={self.n_a} features, got shape {tuple(xa.shape)}")
        if xb2.shape[1] != self.n_b:
            raise ValueError(f"xb must have n_b={self.n_b} features, got shape {tuple(xb.shape)}")
        if xa2.shape[0] != xb2.shape[0]:
            raise ValueError(f"xa and xb must cover the same tokens, got {xa2.shape[0]} and {xb2.shape[0]}")
        self._adopt(xa2, xb2)
        ok = torch.isfinite(xa2).all(1) & torch.isfinite(xb2).all(1)
        skipped = int((~ok).sum())
        if skipped:
            xa2, xb2 = xa2[ok], xb2[ok]
        T = xa2.shape[0]
        if T:
            ma, m2a, mb, m2b = cross_moments_update(
                self._com, self._n, self._mean_a, self._mean_b, xa2, xb2, backend=self.backend, precision=self.precision
            )
            self._mean_a, self._m2_a = chan_merge(self._n, self._mean_a, self._m2_a, T, ma, m2a)
            self._mean_b, self._m2_b = chan_merge(self._n, self._mean_b, self._m2_b, T, mb, m2b)
            self._n += T
        self._skipped += skipped
        return self

    def update_sparse(
        self,
        indices_a: torch.Tensor,
        values_a: torch.Tensor,
        indices_b: torch.Tensor,
        values_b: torch.Tensor,
    ) -> CrossCorrelation:
        """Add the same tokens as top-k codes of both sides (unlisted features are 0).

        indices_a, values_a: (T, k_a); indices_b, values_b: (T, k_b); -1 in indices = padding.
        Costs T·k_a·k_b float64 products plus one pass over the state instead of an n_a·n_b
        GEMM over dense codes. The batch's centred co-moment is formed in float64 as
        Σ xa xbᵀ − T μa μbᵀ (exact products; cancellation bounded by one batch's sums) and
        merged with Chan's formula; per-feature moments are centred (zeros included).
        Equals :meth:`update` on the densified codes to float64 rounding.
        """
        a = TopKCodes(indices_a, values_a, self.n_a, names=("indices_a", "values_a"))
        b = TopKCodes(indices_b, values_b, self.n_b, names=("indices_b", "values_b"))
        return self.update_codes(a, b)

    def update_codes(self, codes_a: TopKCodes, codes_b: TopKCodes) -> CrossCorrelation:
        """:meth:`update_sparse` on codes checked once (:class:`TopKCodes`): codes that feed
        several cross-correlations share their validation, finite mask and moments."""
        if codes_a.n != self.n_a or codes_b.n != self.n_b:
            raise ValueError(
                f"codes must have n_a={self.n_a} and n_b={self.n_b} features, got {codes_a.n} and {codes_b.n}"
            )
        if codes_a.n_tokens != codes_b.n_tokens:
            raise ValueError(
                f"indices_a and indices_b must cover the same tokens, got {codes_a.n_tokens} and {codes_b.n_tokens}"
            )
        if codes_a.values.dtype != codes_b.values.dtype:
            raise TypeError(
                f"values_a and values_b must share a dtype, got {codes_a.values.dtype} and {codes_b.values.dtype}"
            )
        self._adopt(codes_a.indices, codes_a.values, codes_b.indices, codes_b.values)
        skipped = 0
        if not (codes_a.all_finite and codes_b.all_finite):
            ok = codes_a.finite() & codes_b.finite()
            skipped = int((~ok).sum())
            codes_a, codes_b = codes_a.rows(ok), codes_b.rows(ok)
        T = codes_a.n_tokens
        if T:
            sa, sb = codes_a.moments(self.backend), codes_b.moments(self.backend)
            ia, va, ib, vb = codes_a.indices, codes_a.values, codes_b.indices, codes_b.values
            sparse_outer_update(self._com, ia, va, ib, vb, backend=self.backend)
            coef = self._n * T / (self._n + T)
            # C += raw − T μa μbᵀ + coef δa δbᵀ in one rank-2 update.
            U = torch.stack([-float(T) * sa.mean, coef * (sa.mean - self._mean_a)], 1)
            V = torch.stack([sb.mean, sb.mean - self._mean_b], 0)
            self._com.addmm_(U, V)
            self._mean_a, self._m2_a = chan_merge(self._n, self._mean_a, self._m2_a, T, sa.mean, sa.m2)
            self._mean_b, self._m2_b = chan_merge(self._n, self._mean_b, self._m2_b, T, sb.mean, sb.m2)
            self._n += T
        self._skipped += skipped
        return self

    def _merge_state(self, o: Mapping[str, torch.Tensor]) -> None:
        na, nb = self._n, int(o["n_tokens"])
        n = na + nb
        if nb:
            da = o["mean_a"] - self._mean_a
            db = o["mean_b"] - self._mean_b
            self._com += o["comoment"]
            self._com += (na * nb / n) * torch.outer(da, db)
            self._mean_a, self._m2_a = chan_merge(na, self._mean_a, self._m2_a, nb, o["mean_a"], o["m2_a"])
            self._mean_b, self._m2_b = chan_merge(na, self._mean_b, self._m2_b, nb, o["mean_b"], o["m2_b"])
            self._n = n
        self._skipped += int(o["n_skipped"])

    def _all_reduce_tensors(self, group) -> None:
        import torch.distributed as dist

        dev = self._com.device
        n_local = torch.tensor(float(self._n), dtype=torch.float64, device=dev)
        _, mu_a, m2_a = dist_parallel_moments(n_local.expand(self.n_a).contiguous(), self._mean_a, self._m2_a, group)
        _, mu_b, m2_b = dist_parallel_moments(n_local.expand(self.n_b).contiguous(), self._mean_b, self._m2_b, group)
        # Shift each rank's co-moment to the global means before summing.
        self._com += n_local * torch.outer(self._mean_a - mu_a, self._mean_b - mu_b)
        dist.all_reduce(self._com, group=group)
        self._mean_a, self._m2_a, self._mean_b, self._m2_b = mu_a, m2_a, mu_b, m2_b

    # ------------------------------------------------------------------ results
    @property
    def n_skipped(self) -> int:
        """Tokens dropped because xa or xb had a non-finite value there."""
        return self._skipped

    mean_a = copied("_mean_a", "[n_a] float64: mean of each feature of A.")

    mean_b = copied("_mean_b", "[n_b] float64: mean of each feature of B.")

    comoment = copied("_com", "[n_a, n_b] float64: Σ_t (xa - μa)(xb - μb)ᵀ.")

    def _inv_std(self, mean: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = torch.sqrt(m2.clamp_min(0.0))
        const = (m2 <= 0) | (sd <= CONSTANT_RTOL * mean.abs() * (self._n**0.5))
        inv = torch.where(const, torch.zeros_like(sd), 1.0 / torch.where(const, torch.ones_like(sd), sd))
        return inv, const

    def best_match(self) -> BestMatch:
        """Best partner per feature, both ways, in one read of the co-moment."""
        ia, ca = self._inv_std(self._mean_a, self._m2_a)
        ib, cb = self._inv_std(self._mean_b, self._m2_b)
        ma, aa, mb, ab = best_match(self._com, ia, ib, backend=self.backend)
        return BestMatch(ma, aa, mb, ab, ca, cb)

    def correlation(self, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        """The dense [n_a, n_b] float64 correlation matrix (constant features: 0), small sizes only."""
        need = self.n_a * self.n_b * 8
        if need > max_bytes:
            raise MemoryError(f"correlation() would hold {need / 2**30:.2f} GiB, over max_bytes; use best_match()")
        ia, _ = self._inv_std(self._mean_a, self._m2_a)
        ib, _ = self._inv_std(self._mean_b, self._m2_b)
        return (self._com * ia[:, None] * ib[None, :]).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ state
    @classmethod
    def _spec(cls, config: Mapping[str, object]) -> Spec:
        na, nb = config["n_a"], config["n_b"]
        f, i = torch.float64, torch.int64
        return {"n_tokens": ((), i), "n_skipped": ((), i), "mean_a": ((na,), f), "m2_a": ((na,), f),
                "mean_b": ((nb,), f), "m2_b": ((nb,), f), "comoment": ((na, nb), f)}  # fmt: skip

    def _problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Counts >= 0, finite means, M2 >= 0, no NaN, and an untouched (zero) state before any token."""
        bad = [f"{k} is negative" for k in ("n_tokens", "n_skipped") if int(state[k]) < 0]
        bad += [f"{k} is negative or NaN" for k in ("m2_a", "m2_b") if not bool((state[k] >= 0).all())]
        bad += [f"{k} is not finite" for k in ("mean_a", "mean_b") if not bool(state[k].isfinite().all())]
        # Huge float64 inputs may overflow a co-moment to inf, as they may M2; NaN only a corrupt file holds.
        bad += ["comoment has NaN"] if bool(state["comoment"].isnan().any()) else []
        if int(state["n_tokens"]) == 0 and any(
            bool(state[k].any()) for k in ("mean_a", "m2_a", "mean_b", "m2_b", "comoment")
        ):
            bad.append("moments are nonzero with n_tokens=0")
        return bad
