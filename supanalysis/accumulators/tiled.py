"""Best match beyond memory: row blocks of the co-moment, recomputed over stored activations.

The full co-moment of n_a × n_b features is 8·n_a·n_b bytes (2 TiB for 524k × 524k). When
that exceeds the budget, :func:`best_match_tiled` keeps only a block of A's features
against all of B's at a time: each block is a :class:`CrossCorrelation` over the *same*
stored tokens (one pass over them per block), which yields the block's rows of the best
match exactly; B's side is the running maximum over blocks (ties: smallest index, as in
one pass). Memory is ``block · n_b · 8`` bytes plus one batch; the price is
``ceil(n_a / block)`` passes over the activations instead of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..ops.cross_moments import check_precision
from .correlation import BestMatch, CrossCorrelation

Batch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TiledBestMatch:
    """The best match and how it was computed: ``mode`` is "dense" (one pass, the whole
    co-moment) or "tiled" (``passes`` passes of ``block`` rows each)."""

    best: BestMatch
    mode: str
    block: int
    passes: int
    n_tokens: int

    def best_match(self) -> BestMatch:
        """The result (so a tiled pair reads like a :class:`CrossCorrelation` in the analysis)."""
        return self.best


def _block_of(batch: Batch, r0: int, r1: int) -> Batch:
    if len(batch) == 2:
        xa, xb = batch
        return xa[..., r0:r1], xb
    ia, va, ib, vb = batch
    inside = (ia >= r0) & (ia < r1)
    # Codes outside the block become padding; each row keeps its other entries distinct.
    return torch.where(inside, ia - r0, torch.full_like(ia, -1)), torch.where(inside, va, 0), ib, vb


def _stream_block(cc: CrossCorrelation, stream: Callable[[], Iterable[Batch]], r0: int, r1: int) -> None:
    """One pass over the stream, accumulating A's features [r0, r1) against all of B's."""
    for batch in stream():
        part = _block_of(batch, r0, r1)
        if len(part) == 2:
            cc.update(*part)
        else:
            cc.update_sparse(*part)


def best_match_tiled(
    stream: Callable[[], Iterable[Batch]],
    n_a: int,
    n_b: int,
    *,
    max_bytes: int = 1 << 30,
    backend: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributed: bool = False,
    group=None,
    precision: str = "ieee",
) -> TiledBestMatch:
    """Best match of A's features against B's over the tokens ``stream()`` yields.

    stream: called once per pass; each call returns a fresh iterable over the same batches,
        either dense ``(xa [T, n_a], xb [T, n_b])`` or top-k codes
        ``(indices_a, values_a, indices_b, values_b)`` (as :meth:`CrossCorrelation.update_sparse`).
    max_bytes: budget for the co-moment block; the whole co-moment when it fits ("dense").
    distributed: every rank of ``group`` streams its own tokens; each block is all-reduced
        (exactly) before its best match, so every rank returns the result over all tokens.
        A collective: every rank must call it with the same n_a, n_b and max_bytes.
    precision: how dense batches are multiplied (see :class:`CrossCorrelation`).
    """
    for name, v in (("n_a", n_a), ("n_b", n_b), ("max_bytes", max_bytes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    check_precision(precision)
    row_bytes = 8 * n_b
    if row_bytes > max_bytes:
        raise MemoryError(
            f"even one row of the co-moment ({row_bytes / 2**20:.1f} MiB for n_b={n_b}) exceeds max_bytes="
            f"{max_bytes / 2**20:.1f} MiB; raise the budget"
        )
    block = min(n_a, max_bytes // row_bytes)
    passes = math.ceil(n_a / block)
    f64 = dict(dtype=torch.float64)
    max_a, match_a, const_a = [], [], []
    max_b = match_b = const_b = None
    n_tokens = -1
    bar = tqdm(total=passes, desc="best match (tiled)", unit="pass", disable=not progress or passes == 1)
    for r0 in range(0, n_a, block):
        r1 = min(n_a, r0 + block)
        cc = CrossCorrelation(r1 - r0, n_b, device=device, backend=backend, max_bytes=max_bytes, precision=precision)
        _stream_block(cc, stream, r0, r1)
        if distributed:
            cc.all_reduce(group)
        if n_tokens >= 0 and cc.n_tokens != n_tokens:
            raise ValueError(
                f"stream() yielded {cc.n_tokens} tokens on pass {r0 // block + 1} but {n_tokens} before; "
                "it must replay the same stored activations every time"
            )
        n_tokens = cc.n_tokens
        bm = cc.best_match()
        max_a.append(bm.max_corr_a)
        match_a.append(bm.match_a)
        const_a.append(bm.constant_a)
        gm = torch.where(bm.match_b >= 0, bm.match_b + r0, bm.match_b)
        if max_b is None:
            max_b, match_b, const_b = bm.max_corr_b, gm, bm.constant_b
        else:
            # Strictly larger wins: on equal values the earlier block has the smaller index.
            better = (gm >= 0) & ((match_b < 0) | (bm.max_corr_b > max_b))
            max_b = torch.where(better, bm.max_corr_b, max_b)
            match_b = torch.where(better, gm, match_b)
        bar.update(1)
    bar.close()
    best = BestMatch(
        torch.cat(max_a).to(**f64),
        torch.cat(match_a),
        max_b,
        match_b,
        torch.cat(const_a),
        const_b,
    )
    return TiledBestMatch(best, "dense" if passes == 1 else "tiled", block, passes, n_tokens)
