"""The ops, one module per op (the dense/sparse pairs that share a result type share one),
each registered once as a ``supanalysis::`` custom op from its :class:`~.registry.OpEntry`.

Each module holds the op's float64 reference, its launchers by name (``<op>_reference``,
``<op>_cpu``, ``<op>_triton``, ``<op>_cuda``), its registry entry (schema, fake, dtypes,
boundary check, example inputs) and the public function. :mod:`.registry` lists them all.
"""

import sys
import types

from . import activation_stats, best_match, coactivation, cross_moments, interference, sparse_outer
from .best_match import MatchResult
from .coactivation import CoactivationCounts
from .cross_moments import CrossMoments
from .registry import REGISTRY, OpEntry, entries

entries()  # registers every op module of the package, listed above or not

# ``supanalysis.ops.correlation`` is a deprecated alias of the three correlation ops
# modules, for importers that have not moved to them yet.
correlation = types.ModuleType(f"{__name__}.correlation", "Deprecated: use cross_moments, sparse_outer, best_match.")
correlation.__dict__.update(
    PRECISIONS=cross_moments.PRECISIONS,
    check_precision=cross_moments.check_precision,
    round_to_bf16=cross_moments.round_to_bf16,
    cross_moments_update=cross_moments.cross_moments_update,
    cross_moments_update_reference=cross_moments.cross_moments_update_reference,
    sparse_outer_update=sparse_outer.sparse_outer_update,
    sparse_outer_update_reference=sparse_outer.sparse_outer_update_reference,
    best_match=best_match.best_match,
    best_match_reference=best_match.best_match_reference,
)
sys.modules[correlation.__name__] = correlation

__all__ = [
    "REGISTRY",
    "CoactivationCounts",
    "CrossMoments",
    "MatchResult",
    "OpEntry",
    "activation_stats",
    "best_match",
    "coactivation",
    "cross_moments",
    "entries",
    "interference",
    "sparse_outer",
]
