"""Baselines from perturbation features: ridge and kernel ridge on fingerprints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import RidgeCV

from perturbx.baselines._means import TrainingMeans, as_anndata, target_keys
from perturbx.metrics._pseudobulk import DEFAULT_TARGET_SUM

#: Ridge penalties searched by efficient leave-one-out cross-validation.
DEFAULT_ALPHAS = tuple(np.logspace(-2, 5, 15))


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
    keys = target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    lacking = sorted({n for _, names, _ in keys for n in names if n not in features})
    if lacking:
        raise ValueError(f"features has no vector for the target perturbation(s) {lacking}.")
    dims = {np.asarray(v).shape for v in features.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"features must be 1-D vectors of one length; got shapes {dims}.")
    means = TrainingMeans(
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
    return as_anndata(
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
    keys = target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
    lacking = sorted({n for _, names, _ in keys for n in names if n not in features})
    if lacking:
        raise ValueError(f"features has no vector for the target perturbation(s) {lacking}.")
    names_with_features = sorted(features)
    matrix = np.stack([np.asarray(features[n], dtype=np.float64) for n in names_with_features])
    if matrix.ndim != 2:
        raise ValueError("features must be 1-D vectors of one length.")
    similarity = minmax_similarity(matrix, matrix)
    position = {n: i for i, n in enumerate(names_with_features)}
    means = TrainingMeans(
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
    return as_anndata(
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
