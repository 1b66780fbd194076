"""Model-free scoring of predicted perturbation responses: :func:`score` and :func:`score_means`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.metrics._baselines import BASELINES, NEGATIVE_CONTROL, POSITIVE_CONTROL
from perturbx.metrics._calibration import DEFAULT_DRF_THRESHOLD, calibrate
from perturbx.metrics._cells import real_cells, with_centroid_reference
from perturbx.metrics._functions import _check_top_k
from perturbx.metrics._inputs import check_arguments, check_finite, match_genes
from perturbx.metrics._pseudobulk import DEFAULT_TARGET_SUM
from perturbx.metrics._registry import metric_arrays, metric_info
from perturbx.metrics._stages import (
    DEStatistics,
    check_de_statistics,
    match_conditions,
    method_predictions,
    per_condition_tables,
    real_means,
)
from perturbx.metrics._stages import de_statistics as de_statistics_of


@dataclass
class EvaluationResult:
    """Output of :func:`score`.

    Attributes
    ----------
    per_condition
        Tidy table, one row per condition × method: ``method``, ``condition`` (label),
        ``perturbation``, ``dose``, the covariates, ``n_cells_true``, ``truth``
        (``"first_half"`` when scored against half of the cells, else ``"all_cells"``),
        ``de_test``, ``n_de_genes``, ``n_obs_pred``, one column per metric, and ``note``
        (why values are NaN, e.g. no positive control for a single-sample condition).
    summary
        One row per method × metric: ``median``, ``mean``, ``n`` (finite values),
        ``normalised_median``, ``normalised_mean``.
    calibration
        One row per metric: ``higher_is_better``, ``perfect_value``, ``median_drf``,
        ``mean_drf``, ``n_conditions``, ``well_calibrated`` (median DRF >= threshold).
    normalised
        Like ``per_condition`` with normalised scores ``(m - m_neg) / (m_pos - m_neg)``
        (0 = perturbed centroid, 1 = interpolated duplicate).
    normalisation
        What was done to the expression before scoring.
    references
        ``(n_conditions, n_genes)`` AnnData of the evaluated conditions (genes sorted by
        name): ``X`` = true means (the ground truth the methods were scored against);
        layers ``control``, ``centroid``, ``de_scores`` (DE statistics of the truth cells),
        ``second_half`` and ``second_half_pvals_adj`` (NaN where no positive control).
        With these, :func:`score_means` reproduces the metrics.
    de_statistics
        The DE statistics of the evaluated conditions (:class:`DEStatistics`); pass them to
        another :func:`score` call on the same real cells to skip the DE tests.
    metrics
        Metric column names, in order.
    settings
        The arguments that shaped the result.
    """

    per_condition: pd.DataFrame
    summary: pd.DataFrame
    calibration: pd.DataFrame
    normalised: pd.DataFrame
    normalisation: str
    metrics: list[str]
    references: AnnData | None = None
    de_statistics: DEStatistics | None = None
    settings: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """Method names in report order (user methods first, then baselines)."""
        return list(pd.unique(self.per_condition["method"]))

    def __repr__(self) -> str:
        n_cond = self.per_condition["condition"].nunique()
        if not (self.calibration["n_conditions"] > 0).any():
            calibrated = "calibration unavailable (no positive control)"
        else:
            poor = [m for m, ok in self.calibration["well_calibrated"].items() if not ok]
            calibrated = f"poorly calibrated metrics: {poor or 'none'}"
        return (
            f"EvaluationResult: {n_cond} conditions x methods {self.methods}; "
            f"{len(self.metrics)} metrics; normalisation: {self.normalisation}; {calibrated}"
        )


def score_means(
    pred: np.ndarray,
    true: np.ndarray,
    control: np.ndarray,
    centroid: np.ndarray,
    de_scores: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    top_k: Sequence[int] = (20, 50),
    index: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score precomputed pseudobulk means (fast path, vectorised over conditions).

    Parameters
    ----------
    pred, true
        ``(n_conditions, n_genes)`` predicted and real means, log-normalised; row ``i`` of
        both is condition ``i``.
    control, centroid
        ``(n_conditions, n_genes)`` or ``(n_genes,)`` control mean ``c`` and perturbed
        centroid ``mu`` matching each condition's covariates.
    de_scores
        ``(n_conditions, n_genes)`` DE statistics of each real condition against its
        controls (they define the top-k genes and the gene weights).
    groups
        ``(n_conditions,)`` covariate group labels; centroid accuracy compares conditions
        within a group. Default: one group.
    top_k
        Sizes of the top-DE gene sets.
    index
        Optional row labels.

    Returns
    -------
    DataFrame ``(n_conditions, n_metrics + 1)``: the metrics of :func:`metric_info` and
    ``n_de_genes``.
    """
    values, _ = metric_arrays(pred, true, control, centroid, de_scores, groups=groups, top_k=top_k)
    return pd.DataFrame(values, index=index)


def score(
    pred: AnnData,
    real: AnnData,
    *,
    perturbation_key: str,
    control_value: str = "control",
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    train_perturbations: Sequence[str] | None = None,
    method_key: str | None = None,
    layer: str | None = None,
    counts: bool | None = None,
    pred_counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    top_k: Sequence[int] = (20, 50),
    baselines: Sequence[str] = BASELINES,
    de_method: str = "t-test_overestim_var",
    seed: int = 0,
    drf_threshold: float = DEFAULT_DRF_THRESHOLD,
    centroid_reference: AnnData | None = None,
    de_statistics: DEStatistics | None = None,
) -> EvaluationResult:
    """Score predictions of any model against real cells, with baselines and calibration.

    Expression is brought to log-normalised space (raw counts: normalised to ``target_sum``
    per cell then ``log1p``) and averaged per condition (perturbation × dose ×
    covariates). Conditions are matched between ``pred`` and ``real`` after canonical
    parsing (``"1"`` == ``"1.0"``, ``"B+A"`` == ``"A+B"``), genes by name.

    Parameters
    ----------
    pred
        Predicted cells or pseudobulk rows, with the same condition columns as ``real``
        and at least ``real``'s genes (extra genes are ignored). Control rows are ignored
        (with a warning).
    real
        Real cells: controls, the evaluated conditions and the training conditions.
    perturbation_key, control_value, dose_key, covariate_keys
        ``obs`` columns describing conditions, present in both objects.
    train_perturbations
        Perturbation labels whose conditions (any dose) form the perturbed centroid ``mu``.
        Default: every non-control condition of ``real`` that is not evaluated.
    method_key
        ``pred.obs`` column naming the method of each row; default: one method ``"model"``.
    layer
        Expression layer of both objects (default ``X``).
    counts
        Whether the expression is raw counts; ``None``: detected per object (non-negative
        integers).
    pred_counts
        Whether ``pred``'s expression is raw counts, when it differs from ``real``'s (e.g.
        ``False`` for per-condition means of log-normalised predictions scored against raw
        counts); ``None``: as ``counts``.
    target_sum
        Counts per cell after normalisation.
    top_k
        Sizes of the top-DE gene sets (metrics ``*_top{k}``, ``overlap_at_{k}``, ...).
    baselines
        Reference methods to add: ``"control_mean"``, ``"perturbed_centroid"`` (negative
        control) and ``"interpolated_duplicate"`` (positive control; when present, every
        method is scored against a random half of each condition's cells).
    de_method
        scanpy ``rank_genes_groups`` method for the DE genes and weights.
    seed
        Seed of the half split.
    drf_threshold
        Median DRF below which a metric is flagged as poorly calibrated.
    centroid_reference
        Real cells that form ``mu`` instead of ``real`` (e.g. the training cells, when the
        evaluated conditions were also trained on: their held-out cells in ``real`` are the
        truth, their training cells in ``centroid_reference`` enter ``mu``). Controls in it
        are ignored; ``train_perturbations`` then selects among its perturbations. Genes
        missing from it are not scored. Its cells are read and averaged a block at a time,
        never copied as a whole, so it may be large (a model's whole training set).

    de_statistics
        DE statistics of an earlier call on the same real cells, conditions, genes, seed and
        baselines (``result.de_statistics``): the DE tests are skipped. Without it they are
        run, and cached in memory for the process (:func:`clear_de_cache`).

    Returns
    -------
    EvaluationResult

    Notes
    -----
    DE genes and gene weights come from the cells each method is scored against (the
    first half of each condition when the positive control is used, else all its cells)
    tested against all controls with the same covariates. They are cached, so scoring
    several methods or calling again on the same data runs the test once. Conditions
    with fewer than :data:`MIN_CELLS_FOR_DUPLICATE` cells (e.g. single wells of a bulk
    screen) have no positive control: its metrics are NaN, and ``note`` says why.
    """
    top_k = _check_top_k(top_k)
    covariate_keys = [covariate_keys] if isinstance(covariate_keys, str) else list(covariate_keys)
    baselines = list(baselines)
    condition_keys = [perturbation_key, dose_key, *covariate_keys]
    for name, adata in (("pred", pred), ("real", real), ("centroid_reference", centroid_reference)):
        if isinstance(adata, AnnData):
            check_finite(adata, layer, name, condition_keys)
    if centroid_reference is not None:
        cells, train_perturbations = with_centroid_reference(
            real,
            centroid_reference,
            train_perturbations,
            perturbation_key=perturbation_key,
            dose_key=dose_key,
            covariate_keys=covariate_keys,
            control_value=control_value,
            layer=layer,
        )
    else:
        cells = real_cells(real, layer)
    real = cells.as_anndata()
    check_arguments(
        pred,
        real,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        method_key=method_key,
        baselines=baselines,
        seed=seed,
    )
    _, pred_columns, genes = match_genes(pred, real)
    match = match_conditions(
        real.obs,
        pred.obs,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        train_perturbations=train_perturbations,
    )
    means = real_means(
        cells,
        real.obs_names.to_numpy(),
        match,
        genes,
        counts=counts,
        target_sum=target_sum,
        use_duplicate=POSITIVE_CONTROL in baselines,
        seed=seed,
    )
    if de_statistics is None:
        de = de_statistics_of(means, match, genes, de_method)
    else:
        check_de_statistics(de_statistics, match, means, genes, de_method)
        de = de_statistics
    predictions, user_methods, pred_note = method_predictions(
        pred,
        match,
        means,
        de,
        layer=layer,
        pred_columns=pred_columns,
        counts=counts if pred_counts is None else pred_counts,
        target_sum=target_sum,
        method_key=method_key,
        baselines=baselines,
    )
    per_condition, filled = per_condition_tables(
        predictions, user_methods, match, means, de, covariate_keys=covariate_keys, top_k=top_k
    )
    info = metric_info(top_k)
    metrics = list(info.index)
    real_note = means.note
    calibration, normalised_values = calibrate(
        filled,
        per_condition["method"],
        per_condition["condition"],
        info,
        negative=NEGATIVE_CONTROL,
        positive=POSITIVE_CONTROL,
        threshold=drf_threshold,
    )
    id_columns = ["method", "condition", "perturbation", "dose", *covariate_keys]
    normalised = pd.concat([per_condition[id_columns], normalised_values], axis=1)
    note = (
        f"real: {real_note}; pred: {pred_note}; metrics on per-condition means of "
        "log-normalised expression"
    )
    per_condition.attrs["normalisation"] = note
    references = AnnData(
        X=means.true_means,
        obs=match.eval_table[["condition", "perturbation", "dose", *covariate_keys]]
        .assign(
            n_cells_true=means.n_cells_true,
            de_test=de.test.astype(str),
            has_positive_control=means.eligible,
        )
        .set_index("condition", drop=False)
        .rename_axis(None),
        var=pd.DataFrame(index=genes),
        layers={
            "control": means.control,
            "centroid": means.centroid,
            "de_scores": de.scores,
            "second_half": means.half2_means,
            "second_half_pvals_adj": de.second_half_pvals_adj,
        },
    )
    return EvaluationResult(
        per_condition=per_condition,
        summary=_summary(per_condition, normalised, metrics),
        calibration=calibration,
        normalised=normalised,
        normalisation=note,
        metrics=metrics,
        references=references,
        de_statistics=de,
        settings=dict(
            perturbation_key=perturbation_key,
            control_value=control_value,
            dose_key=dose_key,
            covariate_keys=tuple(covariate_keys),
            target_sum=target_sum,
            top_k=top_k,
            baselines=tuple(baselines),
            de_method=de_method,
            seed=seed,
            drf_threshold=drf_threshold,
            n_training_conditions=int(means.n_training),
        ),
    )


def _summary(per_condition: pd.DataFrame, normalised: pd.DataFrame, metrics) -> pd.DataFrame:
    long = per_condition.melt(id_vars="method", value_vars=metrics, var_name="metric")
    # both tables have the same rows in the same order, so the melted rows align
    long["normalised"] = normalised.melt(id_vars="method", value_vars=metrics)["value"].to_numpy()
    out = (
        long.groupby(["method", "metric"], sort=False)
        .agg(
            median=("value", "median"),
            mean=("value", "mean"),
            n=("value", "count"),
            normalised_median=("normalised", "median"),
            normalised_mean=("normalised", "mean"),
        )
        .reset_index()
    )
    method_order = list(pd.unique(per_condition["method"]))
    out["method"] = pd.Categorical(out["method"], categories=method_order, ordered=True)
    out["metric"] = pd.Categorical(out["metric"], categories=list(metrics), ordered=True)
    out = out.sort_values(["method", "metric"], ignore_index=True)
    out["method"], out["metric"] = out["method"].astype(str), out["metric"].astype(str)
    return out
