"""Log-normalisation, pseudobulk means and canonical condition keys.

Every metric in :mod:`perturbx.metrics` is computed on pseudobulk means in
log-normalised space: raw counts are scaled so that each cell sums to ``target_sum``
(1e4 by default), then ``log1p`` is applied, and only then are cells averaged per
condition. Data that are not raw counts (already log-normalised expression, L1000
z-scores, ...) are used as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbx.conditions import format_condition, parse_condition_columns

DEFAULT_TARGET_SUM = 1e4
#: Cells processed at a time where a whole matrix is not needed (log-normalisation,
#: centroid means), bounding the memory of each step.
CELLS_PER_BLOCK = 8192
#: :func:`log_normalise`'s note for expression that is not counts.
USED_AS_GIVEN = "used as given (not raw counts; assumed already log-normalised)"

#: Columns of the table returned by :func:`condition_table` besides the covariates.
CONDITION_COLUMNS = ("condition", "perturbation", "dose", "is_control")


def is_count_matrix(matrix: np.ndarray | sp.spmatrix | sp.sparray) -> bool:
    """Whether every stored value of ``matrix`` is a non-negative integer (raw counts)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return False
    if np.issubdtype(values.dtype, np.integer):
        return bool(values.min() >= 0)
    finite = np.isfinite(values)
    if not finite.all():
        return False
    return bool(values.min() >= 0 and np.all(values == np.round(values)))


def get_expression(adata: AnnData, layer: str | None, argument: str = "layer"):
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error if it is missing."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= naming the expression layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"{argument}={layer!r} is not a layer of the AnnData; available layers: "
            f"{', '.join(map(repr, adata.layers.keys())) or 'none'}."
        )
    return adata.layers[layer]


def log_normalise(
    matrix: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
) -> tuple[np.ndarray | sp.csr_matrix, str]:
    """Bring a cells × genes matrix to log-normalised space.

    Parameters
    ----------
    matrix
        ``(n_cells, n_genes)`` expression, dense or sparse.
    counts
        ``True``: ``matrix`` holds (non-negative) counts: scale each cell to ``target_sum``
        then ``log1p``. ``False``: already log-normalised, returned as float.
        ``None``: counts if every value is a non-negative integer.
    target_sum
        Total counts per cell after scaling (1e4 = "counts per 10k").

    Returns
    -------
    matrix
        ``(n_cells, n_genes)`` float32 (float64 if the input was float64); sparse input
        stays sparse (CSR). Cells with zero total counts stay all-zero.
    note
        A sentence describing what was done, for reports.
    """
    if target_sum <= 0 or not np.isfinite(target_sum):
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}.")
    if counts is None:
        counts = is_count_matrix(matrix)
    dtype = np.float64 if matrix.dtype == np.float64 else np.float32
    if not counts:
        out = (
            sp.csr_matrix(matrix, dtype=dtype)
            if sp.issparse(matrix)
            else np.asarray(matrix, dtype=dtype)
        )
        return out, USED_AS_GIVEN
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size and np.nanmin(values) < 0:
        raise ValueError("counts=True but the expression matrix has negative values.")
    totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    # Empty cells stay zero instead of dividing by zero.
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    # One output copy, filled in blocks of rows computed in float64: peak memory is the
    # output plus a block, not several float64 copies of the whole matrix.
    if sp.issparse(matrix):
        out = sp.csr_matrix(matrix, dtype=dtype, copy=True)
        out.sum_duplicates()
        entries_per_row = np.diff(out.indptr)
    else:
        matrix = np.asarray(matrix)
        out = np.empty(matrix.shape, dtype=dtype)
    for start in range(0, matrix.shape[0], CELLS_PER_BLOCK):
        rows = slice(start, start + CELLS_PER_BLOCK)
        if sp.issparse(matrix):
            entries = slice(out.indptr[rows.start], out.indptr[min(rows.stop, out.shape[0])])
            scaled = out.data[entries] * np.repeat(scale[rows], entries_per_row[rows])
            out.data[entries] = np.log1p(scaled)
        else:
            out[rows] = np.log1p(matrix[rows].astype(np.float64) * scale[rows, None])
    note = f"raw counts normalised to {target_sum:g} per cell, then log1p"
    return out, note


def group_sums(
    matrix: np.ndarray | sp.spmatrix | sp.sparray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the rows of ``matrix`` per group: ``(n_groups, n_genes)`` float64 sums and
    ``(n_groups,)`` row counts (arguments as in :func:`group_means`).
    """
    codes = np.asarray(codes)
    keep = np.flatnonzero(codes >= 0)
    indicator = sp.csr_matrix(
        (np.ones(keep.size), (codes[keep], keep)), shape=(n_groups, matrix.shape[0])
    )
    sums = indicator @ matrix
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return sums.astype(np.float64), np.bincount(codes[keep], minlength=n_groups)


def group_means(
    matrix: np.ndarray | sp.spmatrix | sp.sparray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``matrix`` per group.

    Parameters
    ----------
    matrix
        ``(n_cells, n_genes)`` dense or sparse.
    codes
        ``(n_cells,)`` int group of each row; negative codes are ignored.
    n_groups
        Number of groups (codes run from 0 to ``n_groups - 1``).

    Returns
    -------
    means
        ``(n_groups, n_genes)`` float64; rows of empty groups are NaN.
    n_cells
        ``(n_groups,)`` number of rows per group.
    """
    sums, n_cells = group_sums(matrix, codes, n_groups)
    return means_of_sums(sums, n_cells), n_cells


def means_of_sums(sums: np.ndarray, n_cells: np.ndarray) -> np.ndarray:
    """``sums / n_cells`` per row; rows of empty groups are NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / n_cells[:, None]
    means[n_cells == 0] = np.nan
    return means


def pseudobulk(
    adata: AnnData,
    keys: str | Sequence[str],
    *,
    layer: str | None = None,
    counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
) -> AnnData:
    """Average cells per group in log-normalised space.

    Parameters
    ----------
    adata
        Cells × genes.
    keys
        ``obs`` column(s) defining the groups (e.g. ``["perturbation", "dose", "cell_type"]``);
        values are used as they are (see :func:`condition_table` for canonical conditions).
    layer
        Expression layer (default ``adata.X``).
    counts, target_sum
        See :func:`log_normalise`.

    Returns
    -------
    AnnData
        ``(n_groups, n_genes)`` float64 means of log-normalised expression; ``obs`` holds the
        key columns and ``n_cells``; ``uns["normalisation"]`` says what was done.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("keys must name at least one obs column.")
    for key in keys:
        if key not in adata.obs.columns:
            raise KeyError(f"keys: {key!r} is not a column of adata.obs.")
    matrix, note = log_normalise(get_expression(adata, layer), counts=counts, target_sum=target_sum)
    index = pd.MultiIndex.from_frame(adata.obs[keys].astype(object))
    codes, uniques = pd.factorize(index, use_na_sentinel=False)
    means, n_cells = group_means(matrix, codes, len(uniques))
    obs = pd.DataFrame(list(uniques), columns=keys)
    obs["n_cells"] = n_cells
    obs.index = obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
    out = AnnData(X=means, obs=obs, var=pd.DataFrame(index=adata.var_names.copy()))
    out.uns["normalisation"] = note
    return out


def condition_table(
    obs: pd.DataFrame,
    *,
    perturbation_key: str,
    dose_key: str | None,
    covariate_keys: Sequence[str],
    control_value: str,
    dataset: str = "adata",
) -> tuple[pd.DataFrame, np.ndarray]:
    """Canonical conditions (perturbation × dose × covariates) of each cell.

    Perturbations are parsed with :func:`perturbx.conditions.parse_condition`, members
    of a combination are sorted by name (``"B+A"`` with doses ``"3+1"`` is ``"A+B"`` at
    ``"1.0+3.0"``) and doses are written as floats, so ``"1"`` and ``"1.0"`` match.
    Covariate values are compared as strings.

    Returns
    -------
    table
        One row per distinct condition: ``condition`` (display label), ``perturbation``,
        ``dose`` (canonical strings), the covariate columns, ``is_control`` and ``key``
        (hashable tuple ``(covariates, names, doses)`` used for matching).
    codes
        ``(n_obs,)`` int: the row of ``table`` of each cell.
    """
    for key in covariate_keys:
        if key not in obs.columns:
            raise KeyError(
                f"covariate_keys: {key!r} is not a column of {dataset}.obs; available: "
                f"{', '.join(map(repr, obs.columns))}."
            )
        if obs[key].isna().any():
            raise ValueError(f"{dataset}.obs[{key!r}] has missing values.")
    conditions, cond_codes = parse_condition_columns(obs, perturbation_key, dose_key, control_value)
    canonical = []
    for names, doses in conditions:
        pairs = sorted(zip(names, doses, strict=True))
        canonical.append((tuple(n for n, _ in pairs), tuple(d for _, d in pairs)))
    if covariate_keys:
        cov_index = pd.MultiIndex.from_frame(obs[list(covariate_keys)].astype(str))
        cov_codes, cov_uniques = pd.factorize(cov_index, use_na_sentinel=False)
        cov_values = [tuple(u) for u in cov_uniques]
    else:
        cov_codes, cov_values = np.zeros(len(obs), dtype=np.int64), [()]
    keys = [
        (cov_values[c], *canonical[k])
        for c, k in zip(cov_codes.tolist(), np.asarray(cond_codes).tolist(), strict=True)
    ]
    codes, unique_keys = pd.factorize(pd.Series(keys, dtype=object), use_na_sentinel=False)
    rows = []
    for cov, names, doses in unique_keys:
        perturbation, dose = format_condition(names, doses, control_value=control_value)
        label = perturbation if dose_key is None or not names else f"{perturbation} @ {dose}"
        if covariate_keys:
            label += " | " + ", ".join(f"{k}={v}" for k, v in zip(covariate_keys, cov, strict=True))
        rows.append(
            {
                "condition": label,
                "perturbation": perturbation,
                "dose": dose if names else "",
                **dict(zip(covariate_keys, cov, strict=True)),
                "is_control": not names,
                "key": (cov, names, doses),
                "covariate_key": cov,
                "members": names,
            }
        )
    columns = [
        *CONDITION_COLUMNS[:3],
        *covariate_keys,
        "is_control",
        "key",
        "covariate_key",
        "members",
    ]
    return pd.DataFrame(rows, columns=columns), np.asarray(codes)
