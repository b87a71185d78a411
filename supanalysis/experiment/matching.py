"""Cross-model matching of site pairs: the correlations and their token-shuffled baseline.

Dense mode holds every pair's co-moment and updates it batch by batch. Beyond
``match_max_bytes`` the match tokens' codes are kept instead (:class:`~.state.Kept`) and
each pair is matched in row blocks afterwards (tiled mode), to the same result up to
float rounding.
"""

from __future__ import annotations

import torch

from ..accumulators import CrossCorrelation, TopKCodes
from ..accumulators.tiled import TiledBestMatch, best_match_tiled
from ..config import TestConfig
from .features import Codes, take_rows, to_dense
from .measurements import ModelMeasurement, SitePair
from .plan import PairPlan, run_device
from .state import Kept


def batch_seed(seed: int, batch: int) -> int:
    """The baseline permutation's seed of one global batch."""
    # One generator per global batch: the shuffled baseline does not depend on how the
    # batches are split across ranks or across an interruption.
    return ((seed & 0xFFFFFFFF) << 32) | (batch & 0xFFFFFFFF)


def is_tiled(cfg: TestConfig, a: ModelMeasurement, b: ModelMeasurement, pairs: PairPlan) -> bool:
    """Whether the co-moments of every pair (baselines included) exceed ``match_max_bytes``."""
    need = sum(8 * a.sites[i].stats.n_features * b.sites[j].stats.n_features for i, j in [*pairs.all, *pairs.depth])
    return need > cfg.match_max_bytes and cfg.match_tokens > 0


def dense_correlations(
    cfg: TestConfig, a: ModelMeasurement, b: ModelMeasurement, pairs: list[SitePair], device: torch.device
) -> dict[SitePair, CrossCorrelation]:
    """One empty streaming cross-correlation per site pair."""
    return {
        (i, j): CrossCorrelation(
            a.sites[i].stats.n_features, b.sites[j].stats.n_features, device=device, backend=cfg.backend,
            precision=cfg.match_precision,
        )
        for (i, j) in pairs
    }  # fmt: skip


#: One side's match codes of a batch as the pairs take them: top-k codes checked once
#: (shared by every pair of that site), or a dense [T, n] tensor.
Shared = torch.Tensor | TopKCodes


def shared_codes(codes: Codes, n: int) -> Shared:
    """``codes`` in the form every pair of its site can share."""
    return TopKCodes(codes[0], codes[1], n) if isinstance(codes, tuple) else codes


def _dense(codes: Shared, n: int) -> torch.Tensor:
    return to_dense((codes.indices, codes.values), n) if isinstance(codes, TopKCodes) else codes


def cross_update(cc: CrossCorrelation, ca: Codes | Shared, cb: Codes | Shared) -> None:
    """Add one batch of both sides' codes (same tokens, [T, n_a] and [T, n_b])."""
    ca, cb = shared_codes(ca, cc.n_a), shared_codes(cb, cc.n_b)
    if isinstance(ca, TopKCodes) and isinstance(cb, TopKCodes):
        cc.update_codes(ca, cb)
    else:  # a neuron basis on one side: that side is dense anyway
        cc.update(_dense(ca, cc.n_a), _dense(cb, cc.n_b))


def update_dense(
    cross: dict[SitePair, CrossCorrelation],
    baselines: dict[SitePair, CrossCorrelation],
    codes_a: list[Codes],
    codes_b: list[Codes],
    take: int,
    perm: torch.Tensor,
) -> None:
    """The first ``take`` tokens into every pair, and B's tokens permuted by ``perm`` into the baselines.

    Each site's codes are checked, and their moments computed, once for all the pairs they
    feed (any-layer matching pairs a site with every site of the other model)."""
    first = slice(0, take)
    cache: dict[tuple[str, int], Shared] = {}

    def site(side: str, codes: list[Codes], i: int, n: int) -> Shared:
        if (side, i) not in cache:
            cache[(side, i)] = shared_codes(take_rows(codes[i], first), n)
        return cache[(side, i)]

    def shuffled(j: int, n: int) -> Shared:
        if ("b~", j) not in cache:
            cb = site("b", codes_b, j, n)
            cache[("b~", j)] = cb.permuted(perm) if isinstance(cb, TopKCodes) else cb[perm]
        return cache[("b~", j)]

    for (i, j), cc in cross.items():
        cross_update(cc, site("a", codes_a, i, cc.n_a), site("b", codes_b, j, cc.n_b))
    for (i, j), bl in baselines.items():
        cross_update(bl, site("a", codes_a, i, bl.n_a), shuffled(j, bl.n_b))


def match_tiled(
    cfg: TestConfig,
    a: ModelMeasurement,
    b: ModelMeasurement,
    pairs: PairPlan,
    kept: Kept,
    progress: bool,
    distributed: bool,
) -> tuple[dict[SitePair, TiledBestMatch], dict[SitePair, TiledBestMatch]]:
    """Each pair's best match (and its shuffled baseline) in row blocks over the kept codes
    (every rank's own, each block all-reduced when distributed)."""

    def stream(i: int, j: int, shuffled: bool):
        na, nb = a.sites[i].stats.n_features, b.sites[j].stats.n_features

        def batches():
            for ca, cb, perm in zip(kept.a[i], kept.b[j], kept.perms):
                cb = take_rows(cb, perm) if shuffled else cb
                if isinstance(ca, tuple) and isinstance(cb, tuple):
                    yield (ca[0], ca[1], cb[0], cb[1])
                else:
                    yield (to_dense(ca, na), to_dense(cb, nb))

        return batches

    def match(i: int, j: int, shuffled: bool) -> TiledBestMatch:
        na, nb = a.sites[i].stats.n_features, b.sites[j].stats.n_features
        return best_match_tiled(
            stream(i, j, shuffled),
            na,
            nb,
            max_bytes=cfg.match_max_bytes,
            backend=cfg.backend,
            precision=cfg.match_precision,
            progress=progress,
            device=run_device(cfg),
            distributed=distributed,
        )

    cross = {(i, j): match(i, j, False) for (i, j) in pairs.all}
    baselines = {(i, j): match(i, j, True) for (i, j) in pairs.depth}
    return cross, baselines
