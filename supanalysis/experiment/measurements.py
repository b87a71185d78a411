"""What :func:`~supanalysis.experiment.measure` returns: everything threshold-independent."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..accumulators import ActivationStats, CrossCorrelation
from ..accumulators.tiled import TiledBestMatch
from ..config import TestConfig
from ..models import ModelShape

Matcher = CrossCorrelation | TiledBestMatch  # TiledBestMatch: the "tiled" mode (see matching.py)
SitePair = tuple[int, int]  # (index into A's sites, index into B's)


@dataclass
class SiteMeasurement:
    """Everything measured at one site of one model (threshold-independent)."""

    site: str
    layer: int
    m: int
    dictionary: str
    stats: ActivationStats  # of the dictionary's codes
    x_stats: ActivationStats  # of the raw activations (total variance for the FVU)
    sse: float  # Σ ‖x − decode(encode(x))‖² (0 for the neuron basis)
    dims: torch.Tensor
    max_abs_cos: torch.Tensor
    sum_dims: float
    d_star: float
    welch_bound: float
    total_sq_cos: float
    capture_convention: dict | None = None  # the dictionary's, when it declares one
    # Per latent, its best correlation in a second SAE trained with another seed on the same
    # activations (the dictionary-seed ceiling); None when not measured.
    seed_best: torch.Tensor | None = None


@dataclass
class PairMeasurement:
    """Cross-model correlations of one site pair, with the token-shuffled baseline."""

    i: int
    j: int
    corr: Matcher
    baseline: Matcher | None


@dataclass
class ModelMeasurement:
    name: str
    source: str
    shape: ModelShape
    losses: torch.Tensor  # per-token eval cross-entropy (N,)
    sites: list[SiteMeasurement] = field(default_factory=list)


FamilyPair = tuple[int, int]  # (x, y) with x < y: indices into the family's models


@dataclass
class FamilyMeasurement:
    """Every model of the run and the cross-correlations of every model pair.

    models: in config order (the primary pair's are the same objects as ``Measurements.a``/``.b``);
    shapes / seeds / labels: per model; primary: (index of A, index of B);
    cross: per model pair (x < y), per depth-paired site pair (index into x's sites, into y's),
    x's codes against y's on the match tokens (the primary pair's are its depth pairs).
    """

    models: list[ModelMeasurement]
    shapes: list[str]
    seeds: list[str]
    labels: list[str]
    primary: tuple[int, int]
    cross: dict[FamilyPair, dict[SitePair, Matcher]]


@dataclass
class Measurements:
    """The threshold-independent result of :func:`~supanalysis.experiment.measure`."""

    config: TestConfig
    a: ModelMeasurement
    b: ModelMeasurement
    pairs: list[PairMeasurement]
    cross: dict[SitePair, Matcher]  # all site pairs (any-layer matching)
    device: str
    backend: str | None
    family: FamilyMeasurement | None = None  # None: measured without one (no ceilings: uncalibrated)
