"""supanalysis: GPU-kernel-backed interpretability analysis.

Tests whether "superposition is a complete theory of features" and "features are
universal" can both hold, on models of equal parameter count and different aspect ratio.
The ops (activation statistics, feature interference, cross-model correlation,
co-activation) run on reference / C++ / Triton / CUDA backends; see :func:`backends`.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import data, dictionary, models, sites
from ._backend import BACKENDS, BackendStatus, BackendUnavailable, backends
from .accumulators import ActivationStats, BestMatch, CoActivation, CrossCorrelation, SparseCoActivation
from .accumulators.tiled import TiledBestMatch, best_match_tiled
from .capture import ActivationSource, capture
from .config import ModelSpec, TestConfig, Thresholds
from .data import TokenSequences
from .dictionary import Dictionary, NeuronBasis, load_dictionary, save_dictionary, train_topk_sae
from .experiment import TestReport, analyse, measure, run_test
from .models import ModelShape, TinyConfig, TinyTransformer, describe
from .ops.activation_stats import activation_stats, activation_stats_sparse
from .ops.interference import InterferenceResult, interference, interference_matrix

__version__ = "0.1.0"


__all__ = [
    "BACKENDS",
    "ActivationSource",
    "ActivationStats",
    "BackendStatus",
    "BackendUnavailable",
    "BestMatch",
    "CoActivation",
    "CrossCorrelation",
    "Dictionary",
    "InterferenceResult",
    "ModelShape",
    "ModelSpec",
    "NeuronBasis",
    "SparseCoActivation",
    "TestConfig",
    "TestReport",
    "Thresholds",
    "TiledBestMatch",
    "TinyConfig",
    "TinyTransformer",
    "TokenSequences",
    "__version__",
    "activation_stats",
    "activation_stats_sparse",
    "analyse",
    "backends",
    "best_match_tiled",
    "capture",
    "data",
    "describe",
    "dictionary",
    "interference",
    "interference_matrix",
    "load_dictionary",
    "measure",
    "models",
    "run_test",
    "save_dictionary",
    "sites",
    "train_topk_sae",
]
