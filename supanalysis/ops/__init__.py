"""The ops, one module per op (the dense/sparse pairs that share a result type share one),
each registered once as a ``supanalysis::`` custom op from its :class:`~.registry.OpEntry`.

Each module holds the op's float64 reference, its launchers by name (``<op>_reference``,
``<op>_cpu``, ``<op>_triton``, ``<op>_cuda``), its registry entry (schema, fake, dtypes,
boundary check, example inputs) and the public function. :mod:`.registry` lists them all.
"""

from . import activation_stats, best_match, coactivation, cross_moments, interference, sparse_outer
from .best_match import MatchResult
from .coactivation import CoactivationCounts
from .cross_moments import CrossMoments
from .registry import REGISTRY, OpEntry, entries

entries()  # registers every op module of the package, listed above or not

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
