"""The stages of :func:`perturbx.metrics.score`, each a function with a typed result.

1. :func:`match_conditions`: which conditions of ``pred`` are scored, their rows of the real
   condition table, the controls and training conditions that go with them.
2. :func:`real_means`: log-normalised real means of the controls, the truth (first halves
   when the positive control is used), the second halves and the perturbed centroid.
3. :func:`de_statistics`: DE of each evaluated condition against its controls (top-k genes,
   gene weights, the positive control's p-values) — or given by the caller.
4. :func:`method_predictions`: each method's per-condition predicted means, the baselines
   included.
5. :func:`per_condition_tables`: the metrics of every method, as the tidy table.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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
from perturbx.metrics._cells import RealCells
from perturbx.metrics._de import differential_expression
from perturbx.metrics._inputs import training_rows
from perturbx.metrics._pseudobulk import (
    condition_table,
    get_expression,
    group_means,
    is_count_matrix,
    log_normalise,
)
from perturbx.metrics._registry import metric_arrays, metric_info

_CONTROL_GROUP = "control"


# ----------------------------------------------------------------- 1. the conditions
@dataclass
class ConditionMatch:
    """Stage 1: the evaluated conditions and what they are compared with.

    ``real_table`` / ``pred_table`` and their per-cell ``*_codes`` come from
    :func:`perturbx.metrics.condition_table`; ``eval_rows`` are the real rows scored (in key
    order), ``eval_table`` those rows; ``cov_groups`` the distinct covariate keys of the
    evaluated conditions and ``eval_group`` each evaluated condition's index in it;
    ``control_rows`` the real control row of each of those groups, then of the other groups
    with training conditions; ``train_rows`` the real rows forming the centroid.
    """

    real_table: pd.DataFrame
    real_codes: np.ndarray
    pred_table: pd.DataFrame
    pred_codes: np.ndarray
    pred_perturbed: np.ndarray
    eval_rows: list[int]
    eval_table: pd.DataFrame
    cov_groups: list
    eval_group: np.ndarray
    control_rows: dict
    train_rows: np.ndarray

    @property
    def n_eval(self) -> int:
        """Number of evaluated conditions."""
        return len(self.eval_rows)


def match_conditions(
    real_obs: pd.DataFrame,
    pred_obs: pd.DataFrame,
    *,
    perturbation_key: str,
    dose_key: str | None,
    covariate_keys: Sequence[str],
    control_value: str,
    train_perturbations: Sequence[str] | None,
) -> ConditionMatch:
    """Stage 1 of :func:`perturbx.metrics.score` (arguments as there)."""
    table_args = dict(
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
    )
    real_table, real_codes = condition_table(real_obs, dataset="real", **table_args)
    pred_table, pred_codes = condition_table(pred_obs, dataset="pred", **table_args)
    real_row_of = {key: i for i, key in enumerate(real_table["key"])}
    pred_perturbed = ~pred_table["is_control"].to_numpy()
    if not pred_perturbed.all():
        warnings.warn("pred contains control rows; they are not scored.", stacklevel=3)
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
    # Training conditions of groups without evaluated conditions (other patients) count too,
    # when their controls are measured: their deltas form the centroid of an evaluated group
    # that has no training conditions of its own (see real_means).
    for r in train_rows:
        cov = real_table["covariate_key"].iat[r]
        if cov not in control_rows and (cov, (), ()) in real_row_of:
            control_rows[cov] = real_row_of[(cov, (), ())]
    train_rows = np.asarray(
        [r for r in train_rows if real_table["covariate_key"].iat[r] in control_rows], dtype=int
    )
    return ConditionMatch(
        real_table,
        real_codes,
        pred_table,
        pred_codes,
        pred_perturbed,
        eval_rows,
        eval_table,
        cov_groups,
        eval_group,
        control_rows,
        train_rows,
    )


# ------------------------------------------------------------------- 2. real means
@dataclass
class RealMeans:
    """Stage 2: the real means, ``(n_eval, G)`` each unless said otherwise.

    ``matrix``: log-normalised expression of the controls' and evaluated conditions' cells;
    ``mean_codes``: each of those cells' group (controls ``0..n_controls-1``, then training
    conditions, truth, second halves); ``true_means`` / ``n_cells_true``: the truth;
    ``half2_means``: second halves (where ``eligible`` for a positive control);
    ``control`` / ``centroid``: each condition's references (``transferred_centroid``: where
    the condition's group has no training conditions, so that its centroid is its controls
    plus the other groups' mean delta); ``counts``: whether the real expression was counts;
    ``note``: what was done to it.
    """

    matrix: np.ndarray
    mean_codes: np.ndarray
    true_means: np.ndarray
    n_cells_true: np.ndarray
    half2_means: np.ndarray
    control: np.ndarray
    centroid: np.ndarray
    eligible: np.ndarray
    counts: bool
    note: str
    n_controls: int
    n_training: int
    transferred_centroid: np.ndarray


def real_means(
    cells: RealCells,
    cell_names: np.ndarray,
    match: ConditionMatch,
    genes: pd.Index,
    *,
    counts: bool | None,
    target_sum: float,
    use_duplicate: bool,
    seed: int,
) -> RealMeans:
    """Stage 2 of :func:`perturbx.metrics.score` (``cell_names``: the real cells' names)."""
    real_table, real_codes, eval_rows = match.real_table, match.real_codes, match.eval_rows
    n_eval = match.n_eval
    n_cells_real = np.bincount(real_codes, minlength=len(real_table))
    eligible = np.asarray(
        [use_duplicate and n_cells_real[r] >= MIN_CELLS_FOR_DUPLICATE for r in eval_rows],
        dtype=bool,
    )
    # Controls and evaluated conditions are held for the DE tests; the training conditions
    # only enter the centroid, whose means are computed a block of cells at a time below.
    used_rows = np.asarray([*match.control_rows.values(), *eval_rows])
    used_cells = np.flatnonzero(np.isin(real_codes, used_rows))
    cell_codes = real_codes[used_cells]
    matrix = cells.take(used_cells, genes)
    # Resolved here for the training cells' means too, which are read in blocks.
    real_counts = is_count_matrix(matrix) if counts is None else counts
    matrix, note = log_normalise(matrix, counts=real_counts, target_sum=target_sum)
    half = split_halves(
        cell_codes,
        cell_names[used_cells],
        {eval_rows[e]: match.eval_table["condition"].iat[e] for e in np.flatnonzero(eligible)},
        seed,
    )
    # One code space for every mean: controls | training conditions | truth | second halves.
    n_ctrl, n_train = len(match.control_rows), len(match.train_rows)
    code_map = np.full(len(real_table), -1)
    code_map[list(match.control_rows.values())] = np.arange(n_ctrl)
    code_map[match.train_rows] = n_ctrl + np.arange(n_train)
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
    control = means[:n_ctrl][match.eval_group]  # control_rows starts in cov_groups order
    groups = list(match.control_rows)
    train_group = np.asarray(
        [groups.index(c) for c in real_table["covariate_key"].iloc[match.train_rows]], dtype=int
    )
    train_means = means[n_ctrl : n_ctrl + n_train]
    centroid = perturbed_centroid(train_means, train_group, match.eval_group)
    # A group without training conditions (a held-out patient): its controls plus the mean
    # delta of the training conditions of the other groups, each against its own controls.
    missing = ~np.isfinite(centroid).all(axis=1)
    transferred = missing & (n_train > 0)
    if transferred.any():
        mean_delta = (train_means - means[:n_ctrl][train_group]).mean(axis=0)
        centroid[transferred] = control[transferred] + mean_delta
    return RealMeans(
        matrix=matrix,
        mean_codes=mean_codes,
        true_means=means[truth_slice],
        n_cells_true=n_in_group[truth_slice],
        half2_means=means[n_ctrl + n_train + n_eval :],
        control=control,
        centroid=centroid,
        eligible=eligible,
        counts=bool(real_counts),
        note=note,
        n_controls=n_ctrl,
        n_training=n_train,
        transferred_centroid=transferred,
    )


# ---------------------------------------------------------------- 3. DE statistics
@dataclass
class DEStatistics:
    """Stage 3: DE of each evaluated condition's truth cells against its controls.

    Attributes
    ----------
    conditions
        The evaluated conditions' labels, in the order of the rows below.
    genes
        The genes of the columns (sorted by name, as :func:`perturbx.metrics.score` uses).
    eligible
        ``(n_eval,)`` whether the condition has a positive control (second half).
    scores
        ``(n_eval, G)`` DE statistics (they define the top-k genes and the gene weights).
    second_half_pvals_adj
        ``(n_eval, G)`` adjusted p-values of the second halves (NaN where not eligible).
    test
        ``(n_eval,)`` the test used per condition (``"t-test..."`` or ``"z-score"``).
    method
        The scanpy DE method.
    truth
        ``(n_eval, G)`` the tested truth cells' log-normalised means (what identifies the
        real cells and their half split).

    Pass ``result.de_statistics`` of an earlier :func:`perturbx.metrics.score` call to
    ``score(..., de_statistics=...)`` to score other predictions of the same real cells
    without testing again.
    """

    conditions: list[str]
    genes: pd.Index
    eligible: np.ndarray
    scores: np.ndarray
    second_half_pvals_adj: np.ndarray
    test: np.ndarray
    method: str
    truth: np.ndarray


def de_statistics(
    means: RealMeans, match: ConditionMatch, genes: pd.Index, de_method: str
) -> DEStatistics:
    """Stage 3 of :func:`perturbx.metrics.score`: one DE test per covariate group."""
    n_eval, eligible, mean_codes = match.n_eval, means.eligible, means.mean_codes
    offset = means.n_controls + means.n_training
    scores = np.zeros((n_eval, len(genes)))
    half2_pvals = np.full((n_eval, len(genes)), np.nan)
    test = np.empty(n_eval, dtype=object)
    for g in range(len(match.cov_groups)):
        members = np.flatnonzero(match.eval_group == g)
        cells = np.flatnonzero(
            (mean_codes == g)
            | np.isin(mean_codes, offset + members)
            | np.isin(mean_codes, offset + n_eval + members)
        )
        labels = np.full(cells.size, _CONTROL_GROUP, dtype=object)
        local = mean_codes[cells] - offset
        is_truth = (local >= 0) & (local < n_eval)
        labels[is_truth] = [f"t{e}" for e in local[is_truth]]
        labels[local >= n_eval] = [f"h{e - n_eval}" for e in local[local >= n_eval]]
        de_data = AnnData(
            X=means.matrix[cells],
            obs=pd.DataFrame({"group": labels}, index=cells.astype(str)),
            var=pd.DataFrame(index=genes),
        )
        tested = [f"t{e}" for e in members] + [f"h{e}" for e in members if eligible[e]]
        result = differential_expression(
            de_data, "group", _CONTROL_GROUP, groups=tested, method=de_method
        )
        scores[members] = result.scores.loc[[f"t{e}" for e in members]].to_numpy()
        test[members] = result.test.loc[[f"t{e}" for e in members]].to_numpy()
        dup = [e for e in members if eligible[e]]
        half2_pvals[dup] = result.pvals_adj.loc[[f"h{e}" for e in dup]].to_numpy()
    return DEStatistics(
        conditions=match.eval_table["condition"].tolist(),
        genes=genes,
        eligible=eligible.copy(),
        scores=scores,
        second_half_pvals_adj=half2_pvals,
        test=test,
        method=de_method,
        truth=means.true_means.copy(),
    )


def check_de_statistics(
    given: DEStatistics, match: ConditionMatch, means: RealMeans, genes: pd.Index, method: str
) -> None:
    """Raise ``ValueError`` if ``given`` was not computed for these cells, conditions and genes."""
    conditions = match.eval_table["condition"].tolist()
    if given.conditions != conditions:
        raise ValueError(
            "de_statistics were computed for other conditions "
            f"({given.conditions[:5]}...) than the ones scored here ({conditions[:5]}...)."
        )
    if not given.genes.equals(genes):
        raise ValueError("de_statistics were computed on other genes than the ones scored here.")
    if given.method != method:
        raise ValueError(f"de_statistics were computed with de_method={given.method!r}.")
    if not np.array_equal(given.eligible, means.eligible) or not np.array_equal(
        given.truth, means.true_means, equal_nan=True
    ):
        raise ValueError(
            "de_statistics were computed on other real cells, or with another positive-control "
            "split (baselines or seed differ)."
        )


# ---------------------------------------------------------- 4. methods' predictions
def method_predictions(
    pred: AnnData,
    match: ConditionMatch,
    means: RealMeans,
    de: DEStatistics,
    *,
    layer: str | None,
    pred_columns: np.ndarray,
    counts: bool | None,
    target_sum: float,
    method_key: str | None,
    baselines: Sequence[str],
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], str]:
    """Stage 4: ``({method: ((n_eval, G) means, (n_eval,) rows)}, user methods, pred note)``.

    User methods come first (their predicted cells averaged per condition after the same
    normalisation as the real cells), then the requested baselines.
    """
    pred_matrix = get_expression(pred, layer)
    pred_keep = np.flatnonzero(match.pred_perturbed[match.pred_codes])
    pred_matrix, pred_note = log_normalise(
        pred_matrix[pred_keep][:, pred_columns], counts=counts, target_sum=target_sum
    )
    real_table, n_eval = match.real_table, match.n_eval
    eval_index = {real_table["key"].iat[r]: e for e, r in enumerate(match.eval_rows)}
    eval_of_pred_row = np.asarray([eval_index.get(k, -1) for k in match.pred_table["key"]])
    pred_eval = eval_of_pred_row[match.pred_codes[pred_keep]]
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
        predictions[method] = group_means(
            pred_matrix[np.flatnonzero(rows)], pred_eval[rows], n_eval
        )
    all_rows = np.ones(n_eval, dtype=int)
    if "control_mean" in baselines:
        predictions["control_mean"] = means.control, all_rows
    if NEGATIVE_CONTROL in baselines:
        predictions[NEGATIVE_CONTROL] = means.centroid, all_rows
    if POSITIVE_CONTROL in baselines:
        eligible = means.eligible
        dup_pred = np.full_like(means.true_means, np.nan)
        dup_pred[eligible] = interpolated_duplicate(
            means.half2_means[eligible],
            de.second_half_pvals_adj[eligible],
            means.centroid[eligible],
        )
        predictions[POSITIVE_CONTROL] = dup_pred, all_rows
    return predictions, user_methods, pred_note


# ------------------------------------------------------------- 5. the tidy tables
def per_condition_tables(
    predictions: dict[str, tuple[np.ndarray, np.ndarray]],
    user_methods: Sequence[str],
    match: ConditionMatch,
    means: RealMeans,
    de: DEStatistics,
    *,
    covariate_keys: Sequence[str],
    top_k: Sequence[int],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stage 5: ``(per_condition, filled)``.

    ``per_condition`` is the tidy table of :class:`perturbx.metrics.EvaluationResult`;
    ``filled`` its metric columns with the undefined Pearson of a constant prediction scored
    as 0, for calibration.
    """
    metrics = list(metric_info(top_k).index)
    has_centroid = np.isfinite(means.centroid).all(axis=1)
    ids = match.eval_table[["condition", "perturbation", "dose", *covariate_keys]]
    frames, filled_frames = [], []
    for method, (method_means, n_obs) in predictions.items():
        values, constant = metric_arrays(
            method_means,
            means.true_means,
            means.control,
            means.centroid,
            de.scores,
            groups=match.eval_group,
            top_k=top_k,
        )
        keep = n_obs > 0
        frame = ids.copy()
        frame.insert(0, "method", method)
        frame["n_cells_true"] = means.n_cells_true
        frame["truth"] = np.where(means.eligible, "first_half", "all_cells")
        frame["de_test"] = de.test
        frame["n_de_genes"] = values.pop("n_de_genes").astype(int)
        frame["n_obs_pred"] = n_obs if method in user_methods else 0
        metric_frame = pd.DataFrame(values, columns=metrics)
        frame = pd.concat([frame, metric_frame], axis=1)
        frame["note"] = _notes(
            method,
            means.eligible,
            means.n_cells_true,
            de.test,
            has_centroid,
            means.transferred_centroid,
        )
        filled = metric_frame.copy()
        for name, mask in constant.items():
            filled.loc[mask, name] = 0.0
        frames.append(frame[keep])
        filled_frames.append(filled[keep])
    return pd.concat(frames, ignore_index=True), pd.concat(filled_frames, ignore_index=True)


def _notes(method, eligible, n_cells, de_test, has_centroid, transferred) -> list[str]:
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
        elif transferred[e]:
            parts.append(
                "no training conditions with these covariates: centroid = their controls + "
                "the other groups' mean delta"
            )
        notes.append("; ".join(parts))
    return notes
