"""Validation and matching of the inputs of :func:`perturbx.metrics.score`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from perturbx.conditions import parse_condition
from perturbx.metrics._baselines import BASELINES
from perturbx.metrics._pseudobulk import get_expression

#: Column names of the result tables that covariate keys may not reuse.
RESERVED_COLUMNS = (
    "method",
    "condition",
    "perturbation",
    "dose",
    "n_cells_true",
    "truth",
    "de_test",
    "n_de_genes",
    "n_obs_pred",
    "note",
)


def check_arguments(
    pred: AnnData,
    real: AnnData,
    *,
    perturbation_key: str,
    dose_key: str | None,
    covariate_keys: Sequence[str],
    method_key: str | None,
    baselines: Sequence[str],
    seed: int,
) -> None:
    """Raise a clear error for a missing column or an invalid argument."""
    for name, adata in (("pred", pred), ("real", real)):
        if not isinstance(adata, AnnData):
            raise TypeError(f"{name} must be an AnnData, got {type(adata).__name__}.")
        for argument, key in (
            ("perturbation_key", perturbation_key),
            ("dose_key", dose_key),
            *(("covariate_keys", k) for k in covariate_keys),
        ):
            if key is not None and key not in adata.obs.columns:
                raise KeyError(
                    f"{argument}={key!r} is not a column of {name}.obs; available columns: "
                    f"{', '.join(map(repr, adata.obs.columns))}."
                )
    if method_key is not None and method_key not in pred.obs.columns:
        raise KeyError(f"method_key={method_key!r} is not a column of pred.obs.")
    clash = set(covariate_keys) & set(RESERVED_COLUMNS)
    if clash:
        raise ValueError(f"covariate_keys {sorted(clash)} clash with result column names.")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown!r}; choose from {BASELINES}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def match_genes(pred: AnnData, real: AnnData) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Align genes by name, in sorted-name order.

    Sorting makes results independent of the gene order of either input (ties in gene
    rankings are broken by name).

    Returns
    -------
    real_columns, pred_columns
        Column indices into ``real`` and ``pred`` giving the common sorted order.
    genes
        The sorted gene names (all of ``real``'s genes).
    """
    for name, adata in (("real", real), ("pred", pred)):
        duplicated = adata.var_names[adata.var_names.duplicated()]
        if len(duplicated):
            raise ValueError(
                f"{name}.var_names has duplicated genes, e.g. {list(duplicated[:5])!r}."
            )
    real_columns = np.argsort(real.var_names.to_numpy().astype(str), kind="stable")
    genes = real.var_names[real_columns]
    pred_columns = pred.var_names.get_indexer(genes)
    if (pred_columns < 0).any():
        missing = list(genes[pred_columns < 0][:10])
        raise ValueError(
            f"{int((pred_columns < 0).sum())} gene(s) of real are missing from pred.var_names, "
            f"e.g. {missing!r}; predictions must cover every gene of real."
        )
    return real_columns, pred_columns, genes


def training_rows(
    real_table: pd.DataFrame,
    evaluated: set[int],
    train_perturbations: Sequence[str] | None,
    control_value: str,
) -> np.ndarray:
    """Rows of the real condition table that form the perturbed centroid.

    ``train_perturbations`` are perturbation labels (any dose); default: every non-control
    condition that is not evaluated.
    """
    perturbed = ~real_table["is_control"].to_numpy()
    if train_perturbations is None:
        rows = [i for i in np.flatnonzero(perturbed) if i not in evaluated]
        return np.asarray(rows, dtype=int)
    if isinstance(train_perturbations, str):
        raise TypeError("train_perturbations must be a sequence of labels, not a string.")
    wanted = {}
    for label in train_perturbations:
        names, _ = parse_condition(
            str(label), None, control_value=control_value, where="train_perturbations"
        )
        if not names:
            raise ValueError(f"train_perturbations contains the control label {label!r}.")
        wanted[tuple(sorted(names))] = label
    members = real_table["members"].to_numpy()
    rows = np.asarray([i for i in np.flatnonzero(perturbed) if members[i] in wanted], dtype=int)
    found = {members[i] for i in rows}
    absent = [label for names, label in wanted.items() if names not in found]
    if absent:
        raise ValueError(f"train_perturbations not found in real: {absent[:10]!r}.")
    return rows


def check_finite(
    adata: AnnData,
    layer: str | None,
    name: str,
    condition_keys: Sequence[str],
    block_rows: int = 4096,
) -> None:
    """Raise ``ValueError`` naming the first non-finite value of ``adata``'s expression.

    NaN or infinite values would otherwise change how the whole object is normalised (the
    counts detection fails on them) or silently drop a condition from the medians. The
    matrix is read ``block_rows`` rows at a time (sparse: only its stored values), so a
    large or backed object is never densified.
    """
    matrix = get_expression(adata, layer)
    for start in range(0, adata.n_obs, block_rows):
        block = matrix[start : start + block_rows]
        if sparse.issparse(block):
            block = block.tocoo()
            bad = np.flatnonzero(~np.isfinite(block.data))
            if not len(bad):
                continue
            row, column, value = block.row[bad[0]], block.col[bad[0]], block.data[bad[0]]
        else:
            block = np.asarray(block)
            bad = np.argwhere(~np.isfinite(block))
            if not len(bad):
                continue
            row, column = bad[0]
            value = block[row, column]
        cell = start + int(row)
        condition = ", ".join(
            f"{k}={adata.obs[k].iat[cell]!r}"
            for k in condition_keys
            if k is not None and k in adata.obs.columns
        )
        where = f"{name}.layers[{layer!r}]" if layer else f"{name}.X"
        raise ValueError(
            f"{where} has a non-finite value ({value}) at row {adata.obs_names[cell]!r} "
            f"({condition}), gene {adata.var_names[int(column)]!r}; "
            f"{int(len(bad))} non-finite value(s) in rows {start}-"
            f"{min(start + block_rows, adata.n_obs) - 1} alone. Scores need finite expression."
        )
