"""CrossCorrelation: streaming Pearson correlation between two feature sets over the same tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..ops._common import check_float, check_rank, flatten_tokens
from ..ops.activation_stats import activation_stats_sparse, check_sparse_codes
from ..ops.correlation import PRECISIONS, best_match, check_precision, cross_moments_update, sparse_outer_update
from ._state import (
    FORMAT_VERSION,
    atomic_save,
    chan_merge,
    check_device,
    check_state,
    dist_parallel_moments,
    is_int,
    load_file_checked,
    resolve_device,
)

DEFAULT_MAX_BYTES = 1 << 30

#: A feature counts as constant when its standard deviation is below this fraction of
#: |mean| (or exactly 0): float64 rounding of a mean leaves residues of about 1e-16 |mean|.
CONSTANT_RTOL = 1e-12


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


class CrossCorrelation:
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
        self._init_state(self._device or torch.device("cpu"))

    def _init_state(self, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self._n = 0
        self._skipped = 0
        self._mean_a = torch.zeros(self.n_a, **f64)
        self._m2_a = torch.zeros(self.n_a, **f64)
        self._mean_b = torch.zeros(self.n_b, **f64)
        self._m2_b = torch.zeros(self.n_b, **f64)
        self._com = torch.zeros(self.n_a, self.n_b, **f64)

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
        dev = resolve_device(self._device, xa2, xb2)
        if self._device is None:
            self._device = dev
            self._init_state(dev)
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
        for name, t in (
            ("indices_a", indices_a),
            ("values_a", values_a),
            ("indices_b", indices_b),
            ("values_b", values_b),
        ):
            if isinstance(t, torch.Tensor):
                check_device(t.device, name)  # before the range check reads a meta tensor
        check_sparse_codes(indices_a, values_a, self.n_a, "indices_a", "values_a")
        check_sparse_codes(indices_b, values_b, self.n_b, "indices_b", "values_b")
        if indices_a.shape[0] != indices_b.shape[0]:
            raise ValueError(
                f"indices_a and indices_b must cover the same tokens, got {indices_a.shape[0]} and {indices_b.shape[0]}"
            )
        if values_a.dtype != values_b.dtype:
            raise TypeError(f"values_a and values_b must share a dtype, got {values_a.dtype} and {values_b.dtype}")
        dev = resolve_device(self._device, indices_a, values_a, indices_b, values_b)
        if self._device is None:
            self._device = dev
            self._init_state(dev)
        ia, ib = indices_a.long(), indices_b.long()
        ok = torch.isfinite(values_a).all(1) & torch.isfinite(values_b).all(1)
        skipped = int((~ok).sum())
        if skipped:
            ia, ib, va, vb = ia[ok], ib[ok], values_a[ok], values_b[ok]
        else:
            va, vb = values_a, values_b
        T = ia.shape[0]
        if T:
            sa = activation_stats_sparse(ia, va, self.n_a, 0.0, backend=self.backend, validated=True)
            sb = activation_stats_sparse(ib, vb, self.n_b, 0.0, backend=self.backend, validated=True)
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

    def merge(self, other: CrossCorrelation) -> CrossCorrelation:
        """Fold another accumulator over disjoint tokens into this one."""
        if not isinstance(other, CrossCorrelation):
            raise TypeError(f"other must be a CrossCorrelation, got {type(other).__name__}")
        if (other.n_a, other.n_b) != (self.n_a, self.n_b):
            raise ValueError(f"cannot merge CrossCorrelation{(other.n_a, other.n_b)} into {(self.n_a, self.n_b)}")
        dev = self._com.device
        na, nb = self._n, other._n
        n = na + nb
        if nb:
            da = other._mean_a.to(dev) - self._mean_a
            db = other._mean_b.to(dev) - self._mean_b
            self._com += other._com.to(dev)
            self._com += (na * nb / n) * torch.outer(da, db)
            self._mean_a, self._m2_a = chan_merge(
                na, self._mean_a, self._m2_a, nb, other._mean_a.to(dev), other._m2_a.to(dev)
            )
            self._mean_b, self._m2_b = chan_merge(
                na, self._mean_b, self._m2_b, nb, other._mean_b.to(dev), other._m2_b.to(dev)
            )
            self._n = n
        self._skipped += other._skipped
        return self

    def all_reduce(self, group=None) -> CrossCorrelation:
        """Combine every rank's accumulator in place (exact parallel formula, float64)."""
        import torch.distributed as dist

        dev = self._com.device
        n_local = torch.tensor(float(self._n), dtype=torch.float64, device=dev)
        _, mu_a, m2_a = dist_parallel_moments(n_local.expand(self.n_a).contiguous(), self._mean_a, self._m2_a, group)
        _, mu_b, m2_b = dist_parallel_moments(n_local.expand(self.n_b).contiguous(), self._mean_b, self._m2_b, group)
        # Shift each rank's co-moment to the global means before summing.
        self._com += n_local * torch.outer(self._mean_a - mu_a, self._mean_b - mu_b)
        dist.all_reduce(self._com, group=group)
        self._mean_a, self._m2_a, self._mean_b, self._m2_b = mu_a, m2_a, mu_b, m2_b
        counts = torch.tensor([self._n, self._skipped], dtype=torch.int64, device=dev)
        dist.all_reduce(counts, group=group)
        self._n, self._skipped = int(counts[0]), int(counts[1])
        return self

    # ------------------------------------------------------------------ results
    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def n_skipped(self) -> int:
        """Tokens dropped because xa or xb had a non-finite value there."""
        return self._skipped

    @property
    def mean_a(self) -> torch.Tensor:
        return self._mean_a.clone()

    @property
    def mean_b(self) -> torch.Tensor:
        return self._mean_b.clone()

    @property
    def comoment(self) -> torch.Tensor:
        """[n_a, n_b] float64: Σ_t (xa - μa)(xb - μb)ᵀ."""
        return self._com.clone()

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

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "n_tokens": torch.tensor(self._n, dtype=torch.int64),
            "n_skipped": torch.tensor(self._skipped, dtype=torch.int64),
            "mean_a": self._mean_a.clone(),
            "m2_a": self._m2_a.clone(),
            "mean_b": self._mean_b.clone(),
            "m2_b": self._m2_b.clone(),
            "comoment": self._com.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        f, i = torch.float64, torch.int64
        expected = {
            "n_tokens": ((), i),
            "n_skipped": ((), i),
            "mean_a": ((self.n_a,), f),
            "m2_a": ((self.n_a,), f),
            "mean_b": ((self.n_b,), f),
            "m2_b": ((self.n_b,), f),
            "comoment": ((self.n_a, self.n_b), f),
        }
        check_state(state, expected, "CrossCorrelation.load_state_dict")
        # Refuse states no update can produce (corrupt or hand-edited files).
        bad = [k for k in ("n_tokens", "n_skipped") if int(state[k]) < 0]
        bad += [k for k in ("m2_a", "m2_b") if not bool((state[k] >= 0).all())]
        if bad:
            raise ValueError(f"CrossCorrelation.load_state_dict: inconsistent state ({bad} negative or NaN)")
        dev = self._device or torch.device("cpu")
        s = {k: v.to(dev).clone() for k, v in state.items()}
        self._n, self._skipped = int(s["n_tokens"]), int(s["n_skipped"])
        self._mean_a, self._m2_a, self._mean_b, self._m2_b = s["mean_a"], s["m2_a"], s["mean_b"], s["m2_b"]
        self._com = s["comoment"].contiguous()

    def save(self, path: str | os.PathLike) -> None:
        meta = {
            "kind": self.KIND, "version": FORMAT_VERSION, "n_a": self.n_a, "n_b": self.n_b, "precision": self.precision
        }  # fmt: skip
        atomic_save(self.state_dict(), meta, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> CrossCorrelation:
        tensors, meta = load_file_checked(path, cls.KIND)
        n_a, n_b = meta.get("n_a"), meta.get("n_b")
        if not (is_int(n_a) and is_int(n_b) and n_a >= 1 and n_b >= 1):
            raise ValueError(f"{path}: bad CrossCorrelation metadata: n_a={n_a!r}, n_b={n_b!r} must be positive ints")
        precision = meta.get("precision", "ieee")  # files from before the option: "ieee"
        if precision not in PRECISIONS:
            raise ValueError(
                f"{path}: bad CrossCorrelation metadata: precision={precision!r} is not one of {PRECISIONS}"
            )
        # The stored co-moment must have the metadata's shape before we allocate n_a x n_b
        # (max_bytes is lifted below): a corrupt n_a must not allocate terabytes.
        com = tensors.get("comoment")
        if com is None or tuple(com.shape) != (n_a, n_b):
            shape = None if com is None else tuple(com.shape)
            raise ValueError(f"{path}: comoment has shape {shape}, metadata says ({n_a}, {n_b})")
        obj = cls(n_a, n_b, device=device, max_bytes=1 << 62, precision=precision)
        try:
            obj.load_state_dict(tensors)
        except ValueError as exc:  # name the file, not just the method
            raise ValueError(f"{path}: {exc}") from exc
        return obj

    def __repr__(self) -> str:
        return (
            f"CrossCorrelation(n_a={self.n_a}, n_b={self.n_b}, n_tokens={self._n}, device={self._com.device}, "
            f"precision={self.precision!r})"
        )
