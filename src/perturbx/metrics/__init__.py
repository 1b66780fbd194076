"""Model-free evaluation of predicted perturbation responses.

Works on anyone's predictions (AnnData), needs no torch. Expression is compared as
per-condition means in log-normalised space (raw counts are normalised to 1e4 per cell and
``log1p``-transformed first). The entry point is :func:`score`; :func:`score_means` is the
vectorised fast path on precomputed means, and the metric functions are public so that
they can be checked by hand and reused.
"""

from perturbx.metrics._baselines import (
    BASELINES,
    MIN_CELLS_FOR_DUPLICATE,
    interpolated_duplicate,
    perturbed_centroid,
    split_halves,
)
from perturbx.metrics._calibration import (
    DEFAULT_DRF_THRESHOLD,
    dynamic_range_fraction,
    normalised_score,
)
from perturbx.metrics._de import DEResult, clear_de_cache, differential_expression
from perturbx.metrics._functions import (
    CONSTANT_RTOL,
    centroid_accuracy,
    de_gene_weights,
    direction_agreement,
    mse,
    overlap_at_k,
    pearson_delta,
    r2,
    top_de_genes,
    weighted_mse,
    weighted_r2_delta,
)
from perturbx.metrics._pseudobulk import (
    DEFAULT_TARGET_SUM,
    condition_table,
    is_count_matrix,
    log_normalise,
    pseudobulk,
)
from perturbx.metrics._registry import Metric, MetricInputs, metric_info, metric_registry
from perturbx.metrics._score import EvaluationResult, score, score_means

__all__ = [
    "BASELINES",
    "CONSTANT_RTOL",
    "DEFAULT_DRF_THRESHOLD",
    "DEFAULT_TARGET_SUM",
    "DEResult",
    "EvaluationResult",
    "MIN_CELLS_FOR_DUPLICATE",
    "Metric",
    "MetricInputs",
    "centroid_accuracy",
    "clear_de_cache",
    "condition_table",
    "de_gene_weights",
    "differential_expression",
    "direction_agreement",
    "dynamic_range_fraction",
    "interpolated_duplicate",
    "is_count_matrix",
    "log_normalise",
    "metric_info",
    "metric_registry",
    "mse",
    "normalised_score",
    "overlap_at_k",
    "pearson_delta",
    "perturbed_centroid",
    "pseudobulk",
    "r2",
    "score",
    "score_means",
    "split_halves",
    "top_de_genes",
    "weighted_mse",
    "weighted_r2_delta",
]
