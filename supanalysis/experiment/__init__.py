"""The superposition-versus-universality test (SCIENCE.md), one module per stage:

    plan        which models, sites, token slices and site pairs
    losses      per-token eval cross-entropy (premise P2)
    features    a dictionary per site (given, trained, or neurons) and its codes
    measuring   the one streaming pass that fills every accumulator  -> Measurements
    matching    cross-model correlations, dense or tiled, and the shuffled baseline
    state       checkpoints of that pass (fingerprint, accumulators, resume)
    analysis    thresholds applied to the measurements               -> rows.Report -> JSON
    rows        the report's schema as typed dataclasses
    run         run_test = measure + analyse, and TestReport

``measure`` does everything that touches activations; ``analyse`` turns the accumulators
into the report with the thresholds of the day, so changing τ, φ, C or a tolerance never
reruns a model.
"""

from __future__ import annotations

from .analysis import analyse, build_report
from .losses import token_losses
from .measurements import Measurements, ModelMeasurement, PairMeasurement, SiteMeasurement
from .measuring import measure
from .plan import pair_by_depth
from .rows import REPORT_SCHEMA, Report, sanitize
from .run import TestReport, run_test
from .state import CheckpointMismatch, MeasureCheckpoint, run_fingerprint

__all__ = [
    "REPORT_SCHEMA",
    "CheckpointMismatch",
    "MeasureCheckpoint",
    "Measurements",
    "ModelMeasurement",
    "PairMeasurement",
    "Report",
    "SiteMeasurement",
    "TestReport",
    "analyse",
    "build_report",
    "measure",
    "pair_by_depth",
    "run_fingerprint",
    "run_test",
    "sanitize",
    "token_losses",
]
