"""Streaming accumulators: exact float64/int64 state, Chan merges, safetensors files, all-reduce."""

from .base import Accumulator
from .coactivation import CoActivation
from .correlation import BestMatch, CrossCorrelation
from .sparse_coactivation import SparseCoActivation
from .stats import ActivationStats
from .topk_codes import TopKCodes

__all__ = [
    "Accumulator",
    "ActivationStats",
    "BestMatch",
    "CoActivation",
    "CrossCorrelation",
    "SparseCoActivation",
    "TopKCodes",
]
