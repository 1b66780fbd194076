"""Model-free scoring of predicted perturbation responses: :func:`score` and :func:`score_means`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.metrics._baselines import (
    BASELINES,
    MIN_CELLS_FOR_DUPLICATE,
    NEGATIVE_CONTROL,
    POSITIVE_CONTROL,
    interpolated_duplicate,
    perturbed_centroid,
    split_halves,
)
from perturbx.metrics._calibration import DEFAULT_DRF_THRESHOLD, calibrate
from perturbx.metrics._cells import real_cells, with_centroid_reference
from perturbx.metrics._de import differential_expression
from perturbx.metrics._functions import _check_top_k
from perturbx.metrics._inputs import check_arguments, check_finite, match_genes, training_rows
from perturbx.metrics._pseudobulk import (
    DEFAULT_TARGET_SUM,
    condition_table,
    get_expression,
    group_means,
    is_count_matrix,
    log_normalise,
)
from perturbx.metrics._registry import metric_arrays, metric_info

_CONTROL_GROUP = "control"


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
    table_args = dict(
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
    )
    real_table, real_codes = condition_table(real.obs, dataset="real", **table_args)
    pred_table, pred_codes = condition_table(pred.obs, dataset="pred", **table_args)

    # --- which conditions are evaluated, and the matching rows of the real table ---
    real_row_of = {key: i for i, key in enumerate(real_table["key"])}
    pred_perturbed = ~pred_table["is_control"].to_numpy()
    if not pred_perturbed.all():
        warnings.warn("pred contains control rows; they are not scored.", stacklevel=2)
    if not pred_perturbed.any():
        raise ValueError("pred has no perturbed conditions to score.")
    absent = [
        lab
        for lab, key, pert in zip(
            pred_table["condition"], pred_table["key"], pred_perturbed, strict=True
        )
        if pert and key not in real_row_of
    ]
    if absent:
        raise ValueError(f"conditions of pred absent from real: {absent[:10]!r}.")
    eval_rows = sorted(
        {real_row_of[k] for k, p in zip(pred_table["key"], pred_perturbed, strict=True) if p},
        key=lambda i: real_table["key"].iat[i],
    )
    eval_table = real_table.iloc[eval_rows].reset_index(drop=True)
    n_eval = len(eval_rows)
    cov_of_eval = eval_table["covariate_key"].tolist()
    cov_groups = list(dict.fromkeys(cov_of_eval))
    eval_group = np.asarray([cov_groups.index(c) for c in cov_of_eval])

    control_rows = {}
    for cov in cov_groups:
        row = real_row_of.get((cov, (), ()))
        if row is None:
            raise ValueError(
                f"real has no control cells ({control_value!r}) with covariates "
                f"{dict(zip(covariate_keys, cov, strict=True))}."
            )
        control_rows[cov] = row
    train_rows = training_rows(real_table, set(eval_rows), train_perturbations, control_value)
    train_rows = np.asarray(
        [r for r in train_rows if real_table["covariate_key"].iat[r] in control_rows], dtype=int
    )

    # --- real cells: log-normalise the used ones, split evaluated conditions in halves ---
    n_cells_real = np.bincount(real_codes, minlength=len(real_table))
    use_duplicate = POSITIVE_CONTROL in baselines
    eligible = np.asarray(
        [use_duplicate and n_cells_real[r] >= MIN_CELLS_FOR_DUPLICATE for r in eval_rows],
        dtype=bool,
    )
    # Controls and evaluated conditions are held for the DE tests; the training conditions
    # only enter the centroid, whose means are computed a block of cells at a time below.
    used_rows = np.asarray([*control_rows.values(), *eval_rows])
    used_cells = np.flatnonzero(np.isin(real_codes, used_rows))
    cell_codes = real_codes[used_cells]
    matrix = cells.take(used_cells, genes)
    # Resolved here for the training cells' means too, which are read in blocks.
    real_counts = is_count_matrix(matrix) if counts is None else counts
    matrix, real_note = log_normalise(matrix, counts=real_counts, target_sum=target_sum)
    half = split_halves(
        cell_codes,
        real.obs_names.to_numpy()[used_cells],
        {eval_rows[e]: eval_table["condition"].iat[e] for e in np.flatnonzero(eligible)},
        seed,
    )
    # One code space for every mean: controls | training conditions | truth | second halves.
    n_ctrl, n_train = len(control_rows), len(train_rows)
    code_map = np.full(len(real_table), -1)
    code_map[list(control_rows.values())] = np.arange(n_ctrl)
    code_map[train_rows] = n_ctrl + np.arange(n_train)
    code_map[eval_rows] = n_ctrl + n_train + np.arange(n_eval)
    mean_codes = code_map[cell_codes]
    mean_codes = np.where(half == 2, mean_codes + n_eval, mean_codes)
    means, n_in_group = group_means(matrix, mean_codes, n_ctrl + n_train + 2 * n_eval)
    all_codes = code_map[real_codes]
    train_cells = np.flatnonzero((all_codes >= n_ctrl) & (all_codes < n_ctrl + n_train))
    train_slice = slice(n_ctrl, n_ctrl + n_train)
    means[train_slice], n_in_group[train_slice] = cells.log_normalised_means(
        train_cells,
        all_codes[train_cells] - n_ctrl,
        n_train,
        genes,
        counts=real_counts,
        target_sum=target_sum,
    )
    truth_slice = slice(n_ctrl + n_train, n_ctrl + n_train + n_eval)
    true_means, n_cells_true = means[truth_slice], n_in_group[truth_slice]
    half2_means = means[n_ctrl + n_train + n_eval :]
    control = means[:n_ctrl][eval_group]  # control_rows follows cov_groups order
    train_cov = real_table["covariate_key"].iloc[train_rows].tolist()
    centroid = perturbed_centroid(
        means[n_ctrl : n_ctrl + n_train],
        np.asarray([cov_groups.index(c) for c in train_cov]),
        eval_group,
    )

    # --- DE of the truth cells (and second halves) against the controls, per covariates ---
    de_scores = np.zeros((n_eval, len(genes)))
    half2_pvals = np.full((n_eval, len(genes)), np.nan)
    de_test = np.empty(n_eval, dtype=object)
    for g in range(len(cov_groups)):
        members = np.flatnonzero(eval_group == g)
        cells = np.flatnonzero(
            (mean_codes == g)
            | np.isin(mean_codes, n_ctrl + n_train + members)
            | np.isin(mean_codes, n_ctrl + n_train + n_eval + members)
        )
        labels = np.full(cells.size, _CONTROL_GROUP, dtype=object)
        local = mean_codes[cells] - n_ctrl - n_train
        is_truth = (local >= 0) & (local < n_eval)
        labels[is_truth] = [f"t{e}" for e in local[is_truth]]
        labels[local >= n_eval] = [f"h{e - n_eval}" for e in local[local >= n_eval]]
        de_data = AnnData(
            X=matrix[cells],
            obs=pd.DataFrame({"group": labels}, index=cells.astype(str)),
            var=pd.DataFrame(index=genes),
        )
        tested = [f"t{e}" for e in members] + [f"h{e}" for e in members if eligible[e]]
        result = differential_expression(
            de_data, "group", _CONTROL_GROUP, groups=tested, method=de_method
        )
        de_scores[members] = result.scores.loc[[f"t{e}" for e in members]].to_numpy()
        de_test[members] = result.test.loc[[f"t{e}" for e in members]].to_numpy()
        dup = [e for e in members if eligible[e]]
        half2_pvals[dup] = result.pvals_adj.loc[[f"h{e}" for e in dup]].to_numpy()

    # --- predictions: user methods, then baselines ---
    pred_matrix = get_expression(pred, layer)
    pred_keep = np.flatnonzero(pred_perturbed[pred_codes])
    pred_matrix, pred_note = log_normalise(
        pred_matrix[pred_keep][:, pred_columns],
        counts=counts if pred_counts is None else pred_counts,
        target_sum=target_sum,
    )
    eval_index = {real_table["key"].iat[r]: e for e, r in enumerate(eval_rows)}
    eval_of_pred_row = np.asarray([eval_index.get(k, -1) for k in pred_table["key"]])
    pred_eval = eval_of_pred_row[pred_codes[pred_keep]]
    method_labels = (
        np.full(pred_keep.size, "model", dtype=object)
        if method_key is None
        else pred.obs[method_key].astype(str).to_numpy()[pred_keep]
    )
    user_methods = list(pd.unique(method_labels))
    clash = set(user_methods) & set(BASELINES)
    if clash:
        raise ValueError(
            f"method names {sorted(clash)} in pred.obs[{method_key!r}] are reserved for baselines."
        )
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for method in user_methods:
        rows = method_labels == method
        pm, n_obs = group_means(pred_matrix[np.flatnonzero(rows)], pred_eval[rows], n_eval)
        predictions[method] = pm, n_obs
    all_rows = np.ones(n_eval, dtype=int)
    if "control_mean" in baselines:
        predictions["control_mean"] = control, all_rows
    if NEGATIVE_CONTROL in baselines:
        predictions[NEGATIVE_CONTROL] = centroid, all_rows
    if use_duplicate:
        dup_pred = np.full_like(true_means, np.nan)
        dup_pred[eligible] = interpolated_duplicate(
            half2_means[eligible], half2_pvals[eligible], centroid[eligible]
        )
        predictions[POSITIVE_CONTROL] = dup_pred, all_rows

    # --- metrics per method ---
    info = metric_info(top_k)
    metrics = list(info.index)
    has_centroid = np.isfinite(centroid).all(axis=1)
    ids = eval_table[["condition", "perturbation", "dose", *covariate_keys]]
    frames, filled_frames = [], []
    for method, (pm, n_obs) in predictions.items():
        values, constant = metric_arrays(
            pm, true_means, control, centroid, de_scores, groups=eval_group, top_k=top_k
        )
        keep = n_obs > 0
        frame = ids.copy()
        frame.insert(0, "method", method)
        frame["n_cells_true"] = n_cells_true
        frame["truth"] = np.where(eligible, "first_half", "all_cells")
        frame["de_test"] = de_test
        frame["n_de_genes"] = values.pop("n_de_genes").astype(int)
        frame["n_obs_pred"] = n_obs if method in user_methods else 0
        metric_frame = pd.DataFrame(values, columns=metrics)
        frame = pd.concat([frame, metric_frame], axis=1)
        frame["note"] = _notes(method, eligible, n_cells_true, de_test, has_centroid)
        filled = metric_frame.copy()
        for name, mask in constant.items():
            filled.loc[mask, name] = 0.0
        frames.append(frame[keep])
        filled_frames.append(filled[keep])
    per_condition = pd.concat(frames, ignore_index=True)
    filled = pd.concat(filled_frames, ignore_index=True)

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
        X=true_means,
        obs=eval_table[["condition", "perturbation", "dose", *covariate_keys]]
        .assign(
            n_cells_true=n_cells_true,
            de_test=de_test.astype(str),
            has_positive_control=eligible,
        )
        .set_index("condition", drop=False)
        .rename_axis(None),
        var=pd.DataFrame(index=genes),
        layers={
            "control": control,
            "centroid": centroid,
            "de_scores": de_scores,
            "second_half": half2_means,
            "second_half_pvals_adj": half2_pvals,
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
            n_training_conditions=int(n_train),
        ),
    )


def _notes(method, eligible, n_cells, de_test, has_centroid) -> list[str]:
    notes = []
    for e in range(len(eligible)):
        parts = []
        if de_test[e] == "z-score":
            parts.append("single sample: DE statistics are z-scores against the controls")
        if method == POSITIVE_CONTROL and not eligible[e]:
            parts.append(
                "positive control unavailable: "
                + (
                    "single sample"
                    if n_cells[e] == 1
                    else f"{n_cells[e]} cells (needs >= {MIN_CELLS_FOR_DUPLICATE})"
                )
            )
        if not has_centroid[e]:
            parts.append("no training conditions with these covariates: centroid undefined")
        notes.append("; ".join(parts))
    return notes


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
