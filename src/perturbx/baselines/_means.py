"""Per-condition means of the training cells and the AnnData rows the baselines return."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.conditions import format_condition, parse_condition
from perturbx.metrics._pseudobulk import (
    condition_table,
    get_expression,
    group_means,
    log_normalise,
)


class TrainingMeans:
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


def target_keys(
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


def as_anndata(
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
