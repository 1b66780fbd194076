"""Shared by the dataset loaders: the control label, the ``uns`` record, column checks."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

CONTROL_VALUE = "control"


def _dataset_info(
    name: str, *, dose_key, smiles_key, covariate_keys, likelihood, source_url, **extra
) -> dict:
    return {
        "name": name,
        "control_value": CONTROL_VALUE,
        "perturbation_key": "perturbation",
        "dose_key": dose_key,
        "smiles_key": smiles_key,
        "covariate_keys": list(covariate_keys),
        "likelihood": likelihood,
        "source_url": source_url,
        **extra,
    }


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"Missing column(s) {missing} in {where}; available: {list(frame.columns)}.")
