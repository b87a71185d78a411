"""SparseCoActivation: exact co-firing counts of top-k codes for dictionaries too big for n².

:class:`CoActivation` holds int64 [n, n] counts (8 GiB at n = 32k, 32 GiB at 65k). Top-k
codes light up at most k² pairs per token, and a dictionary's pairs that ever co-fire are
far fewer than n², so this accumulator keeps only those: the sorted keys a·n + b (a < b) of
the pairs seen and their counts, plus each feature's firing count (the diagonal). A batch
is counted by sort-and-segment (``torch.unique`` over its pair keys, in chunks of bounded
size; no atomics, any device), then merged into the state the same way. Memory is
proportional to the distinct pairs seen, which the caller can watch (:attr:`n_pairs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from ..ops._common import check_index, check_indices_range, check_rank
from ._state import Spec, check_device, check_threshold, check_top_k, is_int, positive_int_field, threshold_field
from .base import Accumulator, copied
from .coactivation import METRICS

#: pair keys formed per sort (bounds the temporary memory of one step: ~24 bytes a pair)
CHUNK_PAIRS = 1 << 24


class SparseCoActivation(Accumulator):
    """Co-firing counts of ``n`` features from top-k codes, stored sparsely (see module doc).

    A feature fires on a token when it is listed in that token's codes (index ≥ 0) with a
    value above ``threshold``, or, without values, whenever it is listed.
    """

    KIND = "SparseCoActivation"
    STATE: ClassVar[dict[str, str]] = {
        "keys": "_keys",
        "counts": "_counts",
        "fire_count": "_fire",
        "n_tokens": "_n_tokens",
    }
    CONFIG: ClassVar[dict] = {"n": positive_int_field, "threshold": threshold_field}

    def __init__(self, n: int, threshold: float = 0.0, *, device: torch.device | str | None = None) -> None:
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if n > 3_037_000_499:  # n * n must fit in int64 pair keys
            raise ValueError(f"n={n} is too large for int64 pair keys")
        self.n = n
        self.threshold = check_threshold(threshold, "SparseCoActivation")
        self._device = check_device(device, "device") if device is not None else None
        dev = self._device or torch.device("cpu")
        self._keys = torch.zeros(0, dtype=torch.int64, device=dev)
        self._counts = torch.zeros(0, dtype=torch.int64, device=dev)
        self._fire = torch.zeros(n, dtype=torch.int64, device=dev)
        self._n_tokens = 0
        # Counted chunks not yet merged into the state: merging only once they outweigh it
        # keeps the total merge work O(P log P) instead of re-sorting the state every chunk.
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_size = 0

    # ------------------------------------------------------------------ updates
    def update_sparse(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> SparseCoActivation:
        """Add top-k codes: indices (T, k), -1 = padding; values (T, k) optional."""
        check_index("indices", indices)
        check_rank("indices", indices, 2, "[tokens, k]")
        check_device(indices.device, "indices")
        check_indices_range("indices", indices, self.n)
        if values is not None:
            if not isinstance(values, torch.Tensor) or values.shape != indices.shape:
                raise ValueError(f"values must be a tensor of the shape of indices {tuple(indices.shape)}")
            if not values.is_floating_point():
                raise TypeError(f"values must be floating point, got {values.dtype}")
        self._adopt(indices, *(() if values is None else (values,)))
        idx = indices.long()
        if values is not None:
            fires = torch.isfinite(values) & (values.double() > self.threshold)
            idx = torch.where(fires, idx, torch.full_like(idx, -1))
        T, k = idx.shape
        live = idx >= 0
        self._fire += torch.bincount(idx[live], minlength=self.n)
        # Pairs a < b of each token, a bounded number of tokens at a time.
        per_token = max(1, k * (k - 1) // 2)
        step = max(1, CHUNK_PAIRS // per_token)
        for t0 in range(0, T, step):
            part = idx[t0 : t0 + step]
            a, b = part[:, :, None], part[:, None, :]
            ok = (a >= 0) & (b >= 0) & (a < b)
            keys = (a * self.n + b).expand(-1, k, k)[ok]
            if keys.numel():
                uk, uc = torch.unique(keys, return_counts=True)
                self._pending.append((uk, uc))
                self._pending_size += uk.numel()
                if self._pending_size >= max(self._keys.numel(), CHUNK_PAIRS):
                    self._flush()
        self._n_tokens += T
        return self

    def _sync(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            keys = torch.cat([k for k, _ in self._pending])
            counts = torch.cat([c for _, c in self._pending])
            self._pending, self._pending_size = [], 0
            self._merge_pairs(keys, counts)

    def _merge_pairs(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Add (sorted unique keys, counts) into the state: sort-and-segment of the union."""
        allk = torch.cat([self._keys, keys.to(self._keys.device)])
        allc = torch.cat([self._counts, counts.to(self._counts.device)])
        uk, inv = torch.unique(allk, return_inverse=True)
        self._keys = uk
        self._counts = torch.zeros_like(uk).index_add_(0, inv, allc)

    def _merge_state(self, o: Mapping[str, torch.Tensor]) -> None:
        self._merge_pairs(o["keys"], o["counts"])
        self._fire += o["fire_count"]
        self._n_tokens += int(o["n_tokens"])

    def _all_reduce_tensors(self, group) -> None:
        """Every rank's pairs, gathered and merged, and the firing counts summed."""
        import torch.distributed as dist

        from ..distributed import all_gather_cat

        keys = all_gather_cat(self._keys, group)
        counts = all_gather_cat(self._counts, group)
        self._keys = torch.zeros(0, dtype=torch.int64, device=self._keys.device)
        self._counts = torch.zeros_like(self._keys)
        self._merge_pairs(keys, counts)
        dist.all_reduce(self._fire, group=group)

    # ------------------------------------------------------------------ results
    @property
    def n_pairs(self) -> int:
        """Distinct co-firing pairs held (the state's size: 16 bytes each)."""
        self._flush()
        return self._keys.numel()

    fire_count = copied("_fire", "[n] int64 firing counts (the diagonal of the count matrix).")

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, count) of every pair a < b that co-fired at least once."""
        self._flush()
        return self._keys // self.n, self._keys % self.n, self._counts.clone()

    def to_dense(self, max_bytes: int = 1 << 30) -> torch.Tensor:
        """The [n, n] int64 count matrix (symmetric, diagonal = firing counts), small n only."""
        if self.n * self.n * 8 > max_bytes:
            raise MemoryError(
                f"to_dense would hold {self.n * self.n * 8 / 2**30:.1f} GiB; use pairs() or top_partners()"
            )
        C = torch.zeros(self.n, self.n, dtype=torch.int64, device=self._keys.device)
        a, b, c = self.pairs()
        C[a, b] = c
        C[b, a] = c
        C.diagonal().copy_(self._fire)
        return C

    def _scores(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
        C = c.double()
        if metric == "count":
            return C
        fa, fb = self._fire[a].double(), self._fire[b].double()
        den = fa + fb - C if metric == "jaccard" else fa * fb / max(self._n_tokens, 1)
        return torch.where(den > 0, C / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(C))

    def top_partners(self, k: int, metric: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
        """(index [n, k] int64, score [n, k] float64): each feature's top co-firing partners.

        Same contract as :meth:`CoActivation.top_partners` (k clamped to n - 1) over the
        partners that co-fired (a feature never seen with i scores 0 with it; such slots are
        -1 / 0 here). Ties go to the smaller index.
        """
        k = check_top_k(k, self.n)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        a, b, c = self.pairs()
        rows, cols = torch.cat([a, b]), torch.cat([b, a])
        score = self._scores(rows, cols, torch.cat([c, c]), metric)
        # Order by (row, score descending, column): three stable sorts, last key first.
        order = torch.sort(cols, stable=True).indices
        order = order[torch.sort(score[order], descending=True, stable=True).indices]
        order = order[torch.sort(rows[order], stable=True).indices]
        rows, cols, score = rows[order], cols[order], score[order]
        start = torch.searchsorted(rows, torch.arange(self.n, device=rows.device))
        rank = torch.arange(rows.numel(), device=rows.device) - start[rows]
        keep = (rank < k) & (score > 0)
        idx = torch.full((self.n, k), -1, dtype=torch.int64, device=rows.device)
        val = torch.zeros(self.n, k, dtype=torch.float64, device=rows.device)
        idx[rows[keep], rank[keep]] = cols[keep]
        val[rows[keep], rank[keep]] = score[keep]
        return idx, val

    # ------------------------------------------------------------------ state
    @classmethod
    def _spec(cls, config: Mapping[str, object]) -> Spec:
        i = torch.int64
        return {"keys": ((None,), i), "counts": ((None,), i), "fire_count": ((config["n"],), i), "n_tokens": ((), i)}

    def _problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Sorted distinct keys of pairs a < b, counts in [max(1, f_a + f_b - N), min(f_a, f_b)],
        firing counts in [0, N]."""
        keys, counts, fire, nt = (state[k] for k in ("keys", "counts", "fire_count", "n_tokens"))
        if counts.shape != keys.shape:
            return [f"counts {tuple(counts.shape)} and keys {tuple(keys.shape)} differ in shape"]
        nt = int(nt)
        ok = nt >= 0 and not bool((fire < 0).any() or (fire > nt).any())
        bad = [] if ok else ["fire_count outside [0, n_tokens]"]
        if keys.numel():
            if bool((keys[1:] <= keys[:-1]).any() or keys[0] < 0 or keys[-1] >= self.n * self.n):
                return [*bad, "keys unsorted, repeated or out of range"]
            a, b = keys // self.n, keys % self.n
            fa, fb = fire[a], fire[b]
            if bool((a >= b).any()):
                bad.append("a pair key with a >= b")
            if bool((counts < 1).any() | (counts > torch.minimum(fa, fb)).any() | (counts < fa + fb - nt).any()):
                bad.append("pair counts outside [max(1, f_a + f_b - n_tokens), min(f_a, f_b)]")
        return bad

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._pending, self._pending_size = [], 0

    def _repr_extra(self) -> str:
        return f", n_pairs={self.n_pairs}"
