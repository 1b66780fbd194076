"""Feature-based reference predictors: a linear (ridge) baseline and the additive baseline.

Both predict the pseudobulk mean of a condition in log-normalised space (as
:func:`perturbx.metrics.pseudobulk`) from the measured means of the *training* cells, and
return one row per target condition, ready for :func:`perturbx.metrics.score` next to a
model's predictions (``method_key``). The baselines without features (control mean,
perturbed centroid, interpolated duplicate) live in :mod:`perturbx.metrics`.

* :func:`linear_baseline` regresses each training condition's delta against its controls
  (same covariates) on the features of its perturbations with ridge regression, then
  predicts ``control + delta`` for new conditions. With fingerprints as features it
  predicts drugs never seen in training; doses enter as ``features × log10(1 + dose)``.
* :func:`kernel_ridge_baseline` does the same with a MinMax (Tanimoto) kernel on
  fingerprints: a new molecule's delta is a similarity-weighted combination of the training
  molecules', falling back to the mean delta for molecules unlike any of them.
* :func:`transferred_response_baseline` predicts a condition in a new group (patient, donor)
  as that group's controls plus the other groups' mean response: the mean baseline of
  covariate transfer.
* :func:`additive_baseline` predicts a combination as the control plus the sum of its
  members' measured single deltas (at the same doses and covariates). It is known to be hard
  to beat on combinatorial genetic screens (Ahlmann-Eltze, Huber & Anders, 2025).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import RidgeCV

from perturbx.conditions import format_condition, parse_condition
from perturbx.metrics._pseudobulk import (
    DEFAULT_TARGET_SUM,
    condition_table,
    get_expression,
    group_means,
    log_normalise,
)

#: Ridge penalties searched by efficient leave-one-out cross-validation.
DEFAULT_ALPHAS = tuple(np.logspace(-2, 5, 15))


class _TrainingMeans:
    """Per-condition means of the training cells, keyed by ``(covariates, names, doses)``."""

    def __init__(
        self,
        train,
        *,
        perturbation_key,
        dose_key,
        covariate_keys,
        control_value,
        layer,
        counts,
        target_sum,
    ):
        table, codes = condition_table(
            train.obs,
            perturbation_key=perturbation_key,
            dose_key=dose_key,
            covariate_keys=covariate_keys,
            control_value=control_value,
            dataset="train",
        )
        matrix, _ = log_normalise(
            get_expression(train, layer), counts=counts, target_sum=target_sum
        )
        means, _ = group_means(matrix, codes, len(table))
        self.means = dict(zip(table["key"], means, strict=True))
        self.controls = {key[0]: self.means[key] for key in table.loc[table["is_control"], "key"]}

    def conditions_with_features(
        self, covariates: tuple, features: Mapping, target: str, baseline: str
    ) -> list[tuple]:
        """Training conditions of ``covariates`` whose members all have ``features`` (>= 2)."""
        found = [
            k
            for k in self.means
            if k[0] == covariates and k[1] and all(n in features for n in k[1])
        ]
        if len(found) < 2:
            raise ValueError(
                f"Fewer than 2 training conditions with features for covariates "
                f"{covariates}; cannot fit the {baseline} baseline for {target!r}."
            )
        return found

    def control(self, covariates: tuple, target: str) -> np.ndarray:
        if covariates not in self.controls:
            raise ValueError(
                f"No training control cells with covariates {covariates} for target {target!r}."
            )
        return self.controls[covariates]


def _target_keys(
    targets: pd.DataFrame, perturbation_key, dose_key, covariate_keys, control_value
) -> list[tuple]:
    missing = [k for k in [perturbation_key, dose_key, *covariate_keys] if k and k not in targets]
    if missing:
        raise KeyError(f"targets lack the column(s) {missing}.")
    keys = []
    for _, row in targets.iterrows():
        names, doses = parse_condition(
            row[perturbation_key],
            row[dose_key] if dose_key else None,
            control_value=control_value,
            where="targets",
        )
        if not names:
            raise ValueError("targets contain a control row; baselines predict perturbations.")
        pairs = sorted(zip(names, doses, strict=True))
        keys.append(
            (
                tuple(str(row[k]) for k in covariate_keys),
                tuple(n for n, _ in pairs),
                tuple(d for _, d in pairs),
            )
        )
    return keys


def _as_anndata(
    rows, keys, var_names, *, perturbation_key, dose_key, covariate_keys, control_value, method
) -> AnnData:
    records = []
    for covariates, names, doses in keys:
        perturbation, dose = format_condition(names, doses, control_value=control_value)
        record = {perturbation_key: perturbation}
        if dose_key:
            record[dose_key] = dose
        record.update(dict(zip(covariate_keys, covariates, strict=True)))
        record["method"] = method
        records.append(record)
    obs = pd.DataFrame(records, index=[f"{method}_{i}" for i in range(len(records))])
    out = AnnData(np.vstack(rows), obs=obs, var=pd.DataFrame(index=var_names.copy()))
    out.uns["normalisation"] = "pseudobulk means, log-normalised"
    return out


def linear_baseline(
    train: AnnData,
    targets: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    *,
    perturbation_key: str,
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    control_value: str = "control",
    layer: str | None = None,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    method: str = "linear",
) -> AnnData:
    """Ridge regression from perturbation features to the delta against the controls.

    A condition's feature vector is the sum over its members ``m`` at doses ``d`` of
    ``[f_m, f_m · log10(1 + d)]`` (without a dose key: ``f_m``). For each covariate group,
    ridge regression (penalty chosen by leave-one-out cross-validation among ``alphas``)
    maps it to ``mean(condition) - mean(controls)`` over the training conditions whose
    members all have features; a target's prediction is its group's control mean plus the
    predicted delta.

    Parameters
    ----------
    train
        Training cells: controls and perturbed conditions (cells × genes).
    targets
        One row per condition to predict, with the perturbation, dose and covariate columns.
    features
        Feature vector ``(n_features,)`` of each perturbation name (e.g. Morgan
        fingerprints of the drugs). Every member of every target needs one.
    perturbation_key, dose_key, covariate_keys, control_value
        ``obs`` columns and control label (also the columns of ``targets``).
    layer, counts, target_sum
        Expression of ``train`` (see :func:`perturbx.metrics.log_normalise`).
    alphas
        Candidate ridge penalties.
    method
        Value of ``obs["method"]`` of the result.

    Returns
    -------
    AnnData ``(n_targets, n_genes)``: predicted log-normalised means, ``obs`` with the
    condition columns and ``method``.
    """
    covariate_keys = list(covariate_keys)
    keys = _target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    lacking = sorted({n for _, names, _ in keys for n in names if n not in features})
    if lacking:
        raise ValueError(f"features has no vector for the target perturbation(s) {lacking}.")
    dims = {np.asarray(v).shape for v in features.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"features must be 1-D vectors of one length; got shapes {dims}.")
    means = _TrainingMeans(
        train,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        layer=layer,
        counts=counts,
        target_sum=target_sum,
    )

    def design(names, doses) -> np.ndarray:
        parts = []
        for name, dose in zip(names, doses, strict=True):
            f = np.asarray(features[name], dtype=np.float64)
            parts.append(np.concatenate([f, f * np.log10(1.0 + dose)]) if dose_key else f)
        return np.sum(parts, axis=0)

    rows = []
    models: dict[tuple, RidgeCV] = {}
    for covariates, names, doses in keys:
        label = "+".join(names)
        control = means.control(covariates, label)
        if covariates not in models:
            train_keys = means.conditions_with_features(covariates, features, label, "linear")
            x = np.stack([design(k[1], k[2]) for k in train_keys])
            y = np.stack([means.means[k] - control for k in train_keys])
            models[covariates] = RidgeCV(alphas=alphas).fit(x, y)
        delta = models[covariates].predict(design(names, doses)[None, :])[0]
        rows.append(control + delta)
    return _as_anndata(
        rows,
        keys,
        train.var_names,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        method=method,
    )


#: Kernel ridge penalties and dose-kernel widths (in log10(1 + dose) units; ``inf``: doses
#: ignored) searched by exact leave-one-out error.
DEFAULT_KERNEL_ALPHAS = tuple(np.logspace(-3, 2, 11))
DEFAULT_DOSE_WIDTHS = (0.25, 0.5, 1.0, 2.0, np.inf)


def kernel_ridge_baseline(
    train: AnnData,
    targets: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    *,
    perturbation_key: str,
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    control_value: str = "control",
    layer: str | None = None,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    alphas: Sequence[float] = DEFAULT_KERNEL_ALPHAS,
    dose_widths: Sequence[float] = DEFAULT_DOSE_WIDTHS,
    method: str = "kernel ridge",
) -> AnnData:
    """Kernel ridge regression with a MinMax (Tanimoto) kernel on molecule fingerprints.

    The strongest simple competitor for unseen molecules: a new molecule's delta against
    the controls is a similarity-weighted combination of the training molecules' deltas,
    and a molecule unlike every training molecule falls back to the mean training delta
    (the perturbed centroid). The kernel between two conditions is the sum over their
    members of ``minmax(f_m, f_m') · exp(-(u - u')² / (2 w²))`` with ``u = log10(1 + dose)``,
    so combinations add their members' similarities. Per covariate group, the penalty
    ``alpha`` and the dose width ``w`` are chosen by exact leave-one-out error (summed over
    genes) among ``alphas`` × ``dose_widths``; the deltas are centred on their training mean.

    Parameters
    ----------
    train, targets
        As in :func:`linear_baseline`.
    perturbation_key, dose_key, covariate_keys, control_value, layer, counts, target_sum
        As in :func:`linear_baseline`.
    features
        Non-negative feature vector of each perturbation name: Morgan count or bit
        fingerprints (``MorganFeaturizer(counts=True)``) for the MinMax / Tanimoto kernel.
    alphas, dose_widths
        Candidate penalties and dose-kernel widths (``inf`` ignores doses).
    method
        Value of ``obs["method"]`` of the result.

    Returns
    -------
    AnnData ``(n_targets, n_genes)``: predicted log-normalised means, ``obs`` with the
    condition columns and ``method``.
    """
    from perturbx.chem import minmax_similarity

    covariate_keys = list(covariate_keys)
    keys = _target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    lacking = sorted({n for _, names, _ in keys for n in names if n not in features})
    if lacking:
        raise ValueError(f"features has no vector for the target perturbation(s) {lacking}.")
    names_with_features = sorted(features)
    matrix = np.stack([np.asarray(features[n], dtype=np.float64) for n in names_with_features])
    if matrix.ndim != 2:
        raise ValueError("features must be 1-D vectors of one length.")
    similarity = minmax_similarity(matrix, matrix)
    position = {n: i for i, n in enumerate(names_with_features)}
    means = _TrainingMeans(
        train,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        layer=layer,
        counts=counts,
        target_sum=target_sum,
    )

    def gram(left, right, width: float) -> np.ndarray:
        out = np.zeros((len(left), len(right)))
        for i, (names_a, doses_a) in enumerate(left):
            for j, (names_b, doses_b) in enumerate(right):
                total = 0.0
                for name_a, dose_a in zip(names_a, doses_a, strict=True):
                    for name_b, dose_b in zip(names_b, doses_b, strict=True):
                        k = similarity[position[name_a], position[name_b]]
                        if dose_key and np.isfinite(width):
                            gap = np.log10(1.0 + dose_a) - np.log10(1.0 + dose_b)
                            k *= np.exp(-(gap**2) / (2.0 * width**2))
                        total += k
                out[i, j] = total
        return out

    fitted: dict[tuple, tuple] = {}
    rows = []
    for covariates, names, doses in keys:
        label = "+".join(names)
        control = means.control(covariates, label)
        if covariates not in fitted:
            train_keys = means.conditions_with_features(covariates, features, label, "kernel ridge")
            conditions = [(k[1], k[2]) for k in train_keys]
            y = np.stack([means.means[k] - control for k in train_keys])
            offset = y.mean(axis=0)
            fitted[covariates] = (
                conditions,
                offset,
                *_kernel_ridge_fit(
                    gram, conditions, y - offset, alphas, dose_widths if dose_key else (np.inf,)
                ),
            )
        conditions, offset, width, coefficients = fitted[covariates]
        k_new = gram([(names, doses)], conditions, width)
        rows.append(control + offset + (k_new @ coefficients)[0])
    return _as_anndata(
        rows,
        keys,
        train.var_names,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        method=method,
    )


def _kernel_ridge_fit(gram, conditions, y, alphas, widths):
    """``(width, coefficients (n, G))`` of the kernel ridge with the least leave-one-out error.

    With ``K = Q diag(λ) Qᵀ`` the hat matrix is ``H = Q diag(λ / (λ + α)) Qᵀ`` and the
    leave-one-out residuals are ``(y - H y) / (1 - diag(H))`` (exact for kernel ridge).
    """
    best = (np.inf, None, None)
    for width in widths:
        kernel = gram(conditions, conditions, width)
        eigenvalues, q = np.linalg.eigh((kernel + kernel.T) / 2.0)
        eigenvalues = np.clip(eigenvalues, 0.0, None)
        qty = q.T @ y
        for alpha in alphas:
            shrink = eigenvalues / (eigenvalues + alpha)
            fitted = q @ (shrink[:, None] * qty)
            leverage = (q**2) @ shrink
            residual = (y - fitted) / np.clip(1.0 - leverage, 1e-12, None)[:, None]
            error = float((residual**2).sum())
            if error < best[0]:
                coefficients = q @ (qty / (eigenvalues + alpha)[:, None])
                best = (error, width, coefficients)
    return best[1], best[2]


def transferred_response_baseline(
    train: AnnData,
    targets: pd.DataFrame,
    *,
    perturbation_key: str,
    transfer_key: str,
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    control_value: str = "control",
    layer: str | None = None,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    method: str = "transferred mean response",
) -> AnnData:
    """The mean response of the other groups, added to the target group's own controls.

    The natural mean baseline for covariate transfer (a new patient, donor or cell type): a
    condition in group ``g`` (the value of ``transfer_key``) is predicted as
    ``control_g + mean over groups h != g measuring it of (mean(condition, h) - control_h)``,
    everything in log-normalised space and the other covariates matched.

    Parameters
    ----------
    train
        Training cells: every group's controls and the condition in the other groups.
    targets
        One row per condition to predict (perturbation, dose and covariate columns).
    perturbation_key, dose_key, covariate_keys, control_value
        ``obs`` columns and control label (also the columns of ``targets``);
        ``transfer_key`` must be one of ``covariate_keys``.
    transfer_key
        The covariate across which the response is transferred (e.g. ``"patient"``).
    layer, counts, target_sum
        Expression of ``train`` (see :func:`perturbx.metrics.log_normalise`).
    method
        Value of ``obs["method"]`` of the result.

    Returns
    -------
    AnnData ``(n_targets, n_genes)`` of predicted log-normalised means.

    Raises
    ------
    ValueError
        If ``transfer_key`` is not a covariate, or no other group measures a target condition.
    """
    covariate_keys = list(covariate_keys)
    if transfer_key not in covariate_keys:
        raise ValueError(
            f"transfer_key={transfer_key!r} must be one of covariate_keys {covariate_keys}."
        )
    position = covariate_keys.index(transfer_key)
    keys = _target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    means = _TrainingMeans(
        train,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        layer=layer,
        counts=counts,
        target_sum=target_sum,
    )

    def others(covariates):
        return [
            c
            for c in {k[0] for k in means.means}
            if c[position] != covariates[position]
            and all(
                a == b for i, (a, b) in enumerate(zip(c, covariates, strict=True)) if i != position
            )
        ]

    rows = []
    for covariates, names, doses in keys:
        label = "+".join(names)
        control = means.control(covariates, label)
        responses = [
            means.means[(other, names, doses)] - means.control(other, label)
            for other in others(covariates)
            if (other, names, doses) in means.means
        ]
        if not responses:
            raise ValueError(
                f"No other {transfer_key!r} group than {covariates[position]!r} measures "
                f"{label!r} at these doses in train; nothing to transfer."
            )
        rows.append(control + np.mean(responses, axis=0))
    return _as_anndata(
        rows,
        keys,
        train.var_names,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        method=method,
    )


def additive_baseline(
    train: AnnData,
    targets: pd.DataFrame,
    *,
    perturbation_key: str,
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    control_value: str = "control",
    layer: str | None = None,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    method: str = "additive",
) -> AnnData:
    """Control plus the sum of the members' measured single deltas.

    ``A+B`` at doses ``(a, b)`` with covariates ``c`` is predicted as
    ``control_c + (mean(A at a, c) - control_c) + (mean(B at b, c) - control_c)``, all
    measured on the training cells in log-normalised space.

    Parameters
    ----------
    train
        Training cells with the controls and every member measured alone.
    targets
        One row per combination to predict (perturbation, dose and covariate columns).
    perturbation_key, dose_key, covariate_keys, control_value
        ``obs`` columns and control label (also the columns of ``targets``).
    layer, counts, target_sum
        Expression of ``train`` (see :func:`perturbx.metrics.log_normalise`).
    method
        Value of ``obs["method"]`` of the result.

    Returns
    -------
    AnnData ``(n_targets, n_genes)`` of predicted log-normalised means.

    Raises
    ------
    ValueError
        If a member was not measured alone at the target's dose and covariates.
    """
    covariate_keys = list(covariate_keys)
    keys = _target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    means = _TrainingMeans(
        train,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        layer=layer,
        counts=counts,
        target_sum=target_sum,
    )
    rows = []
    for covariates, names, doses in keys:
        label = "+".join(names)
        control = means.control(covariates, label)
        delta = np.zeros_like(control)
        for name, dose in zip(names, doses, strict=True):
            single = (covariates, (name,), (dose,))
            if single not in means.means:
                raise ValueError(
                    f"{name!r} at dose {dose:g} with covariates {covariates} is not measured "
                    f"alone in train; the additive baseline cannot predict {label!r}."
                )
            delta += means.means[single] - control
        rows.append(control + delta)
    return _as_anndata(
        rows,
        keys,
        train.var_names,
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        control_value=control_value,
        method=method,
    )
