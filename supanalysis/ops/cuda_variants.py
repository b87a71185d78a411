"""Alternative CUDA launchers of registered ops, by op and variant name.

``VARIANTS[op][name]`` takes the arguments of that op's ``<op>_cuda`` launcher
(supanalysis/ops/<op>.py) and returns the same outputs, computed by other kernels
(csrc/cuda/; each is bound in ``supanalysis._C`` only in a CUDA build). The registry
(supanalysis/ops/registry.py) makes them reachable as ``backend="cuda", variant=name``;
``auto`` picks one only where the dispatch table measured it faster. A variant is held to
the tests of its op's CUDA launcher (tests/ops/test_cuda_variants.py); each docstring says
what it changes and what it is expected to gain.

Importing this module needs neither CUDA nor the extension: the launchers look the bound
function up when called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._backend import native
from .cross_moments import check_precision

#: Bound function in ``supanalysis._C`` behind each variant: ``{op: {variant: name}}``.
NATIVE_NAMES: dict[str, dict[str, str]] = {
    "activation_stats": {"thread_features": "activation_stats_cuda_thread_features"},
    "cross_moments_update": {"sum_means": "cross_moments_update_cuda_sum_means"},
    "interference": {"sliced_columns": "interference_cuda_sliced_columns"},
}


def _bound(op: str, variant: str) -> Callable:
    """The extension's function for ``op``'s ``variant``; RuntimeError without a CUDA build."""
    mod = native()
    name = NATIVE_NAMES[op][variant]
    fn = getattr(mod, name, None) if mod is not None else None
    if fn is None:
        raise RuntimeError(f"supanalysis._C has no {name} (the extension was built without CUDA)")
    return fn


def activation_stats_thread_features(x: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    """Dense stats with each thread owning 4 adjacent features over its whole token range.

    x [T, n] (CUDA; rows may be strided) -> the 8 outputs of ``activation_stats_cuda``.
    One pass of float32 deviations from a running shift (the feature's first value, then
    its running mean) per 32-row chunk, merged in float64 with Chan's formula; no
    finiteness test per entry on the fast path (a chunk whose sums come out non-finite is
    redone with every entry tested); per-token L0 per warp and block, with no global
    atomics; the next 8 rows loaded while the current ones are reduced. Expected: the
    default's results to float32 rounding (deviations are taken from the running mean,
    as the C++ and Triton kernels do), with about a third of its instructions per
    element, so close to one ``x.sum()``'s bandwidth in bfloat16.
    """
    return _bound("activation_stats", "thread_features")(x, float(threshold))


def cross_moments_update_sum_means(
    comoment: torch.Tensor,
    n_prev: int,
    mean_a_prev: torch.Tensor,
    mean_b_prev: torch.Tensor,
    xa: torch.Tensor,
    xb: torch.Tensor,
    precision: str = "ieee",
) -> list[torch.Tensor]:
    """Cross update centred about float64 column-sum means.

    comoment [n_a, n_b] float64 (updated in place), xa [T, n_a], xb [T, n_b] -> batch
    mean_a, m2_a [n_a], mean_b, m2_b [n_b], as ``cross_moments_update_cuda``. The batch
    means are float64 sums over token chunks of at most 2^25 elements rather than the
    stats kernel's merged means; M2 still comes from the stats kernel. Expected: with
    precision "bf16", each centred value rounds to bfloat16 exactly as on the other
    backends (an inexact mean flips about one rounding in 10^6), so the co-moment agrees
    with theirs to float32 summation; "ieee" results as the default's.
    """
    check_precision(precision, xa.dtype, xb.dtype)
    fn = _bound("cross_moments_update", "sum_means")
    return fn(comoment, int(n_prev), mean_a_prev, mean_b_prev, xa, xb, precision == "bf16")


def interference_sliced_columns(
    W: torch.Tensor,
    V: torch.Tensor | None,
    topk: int,
    block: int,
    precision: str = "ieee",
    symmetric: bool | None = None,
) -> list[torch.Tensor]:
    """Interference tiles with a row-sliced column kernel, taller tiles and chunked row preparation.

    W [n, m], V [k, m] or None -> the 8 outputs of ``interference_cuda``. In symmetric
    mode the column side gives each column 8 row slices (a warp each, 32 columns per
    block, partials merged in warp order, ties to the smallest row) instead of one
    thread per column; the default row block grows to 2^27 workspace elements (1,024
    rows at n = 65,536); rows are normalised in chunks of 2^24 float64 elements instead
    of whole-matrix float64 copies. Expected: the default's results (column sums in
    another fixed order: equal to float64 rounding), at most 0.8x the time of one
    ``W @ W.T`` in bfloat16 at n = 65,536, and bounded extra memory, so that n = 2^20 fits.
    """
    sym = -1 if symmetric is None else int(bool(symmetric))
    return _bound("interference", "sliced_columns")(W, V, int(topk), int(block), sym)


VARIANTS: dict[str, dict[str, Callable]] = {
    "activation_stats": {"thread_features": activation_stats_thread_features},
    "cross_moments_update": {"sum_means": cross_moments_update_sum_means},
    "interference": {"sliced_columns": interference_sliced_columns},
}
