"""The report schema as the renderers read it: the field order of each table, the schema id and
how site names become array keys.

The id and the array-key names are the producer's (:mod:`supanalysis.experiment.rows`). The
``*_FIELDS`` tuples order the report's tables; fields a report carries beyond them are shown after.
"""

from __future__ import annotations

from ..experiment.rows import REPORT_SCHEMA
from ..experiment.rows import pair_key as pair_key
from ..experiment.rows import sanitize as sanitize

SCHEMA = REPORT_SCHEMA


MODEL_FIELDS = (
    "name",
    "source",
    "architecture",
    "n_layers",
    "d_model",
    "d_ff",
    "n_heads",
    "vocab_size",
    "non_embedding_params",
    "kaplan_params",
    "aspect_ratio",
    "eval_loss",
)
PER_MODEL_FIELDS = ("neurons_total", "features_total", "sigma_model", "sigma_mean_site")
SITE_SPARSITY_FIELDS = (
    "site",
    "layer",
    "depth",
    "m",
    "dictionary",
    "n_latents",
    "n_alive",
    "sigma",
    "median_density",
    "g_median",
    "C_star",
    "p_star",
    "pressure",
    "tokens",
    "mean_l0",
    "fvu",
)
SITE_GEOMETRY_FIELDS = ("site", "dims_sum", "d_star", "mean_max_abs_cos", "welch_bound", "total_sq_cos")
PAIR_MATCH_FIELDS = (
    "site_a",
    "site_b",
    "depth_a",
    "depth_b",
    "tokens",
    "mean_max_corr_a",
    "baseline_mean_max_corr_a",
    "mean_max_corr_b",
    "baseline_mean_max_corr_b",
    "matched_fraction_a",
    "baseline_fraction_a",
    "matched_fraction_b",
    "baseline_fraction_b",
)
PAIR_SPARSITY_FIELDS = (
    "site_a",
    "site_b",
    "n_matched",
    "median_log_ratio",
    "predicted_ratio",
    "log_predicted_ratio",
    "verdict",
)
