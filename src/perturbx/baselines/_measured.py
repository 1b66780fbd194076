"""Baselines from measured responses: the additive model and the transferred mean response."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.baselines._means import TrainingMeans, as_anndata, target_keys
from perturbx.metrics._pseudobulk import DEFAULT_TARGET_SUM


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
    keys = target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
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
    keys = target_keys(targets, perturbation_key, dose_key, covariate_keys, control_value)
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
