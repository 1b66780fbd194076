"""Checks of an AnnData before it is registered or modelled (nothing here modifies it)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from anndata import AnnData
from scipy import sparse

_CHUNK_ROWS = 10_000  # bounds memory when scanning dense or backed matrices


def expression_matrix(adata: AnnData, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer= to use a layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers ({list(adata.layers)}).")
    return adata.layers[layer]


def _value_chunks(matrix) -> Iterator[np.ndarray]:
    """The stored values of ``matrix`` in bounded chunks, never densifying a sparse matrix."""
    if sparse.issparse(matrix):
        data = matrix.data
        for start in range(0, data.shape[0], _CHUNK_ROWS * 1000):
            yield data[start : start + _CHUNK_ROWS * 1000]
        return
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        block = matrix[start : start + _CHUNK_ROWS]
        yield block.toarray() if sparse.issparse(block) else np.asarray(block)


def check_expression(adata: AnnData, layer: str | None, counts: bool) -> None:
    """Reject NaN/Inf, and negative or non-integer values when ``counts`` is True."""
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    matrix = expression_matrix(adata, layer)
    for values in _value_chunks(matrix):
        if not np.isfinite(values).all():
            raise ValueError(f"{where} contains NaN or infinite values.")
        if counts:
            if (values < 0).any():
                raise ValueError(
                    f"{where} has negative values, but a counts likelihood ('nb'/'zinb') needs "
                    "raw counts. Use likelihood='gaussian' for log-normalised data, or pass the "
                    "layer that holds the counts."
                )
            if (values != np.round(values)).any():
                raise ValueError(
                    f"{where} has non-integer values, but a counts likelihood ('nb'/'zinb') needs "
                    "raw counts. Use likelihood='gaussian' for log-normalised data, or pass the "
                    "layer that holds the counts."
                )


def check_obs(adata: AnnData, covariate_keys: Sequence[str]) -> None:
    """Unique obs names and present, complete covariate columns."""
    if not adata.obs_names.is_unique:
        duplicated = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"adata.obs_names are not unique (e.g. {duplicated}); "
            "call adata.obs_names_make_unique()."
        )
    for key in covariate_keys:
        if key not in adata.obs.columns:
            raise KeyError(
                f"covariate_keys entry {key!r} is not a column of adata.obs; available columns: "
                f"{', '.join(map(repr, adata.obs.columns))}."
            )
        if adata.obs[key].isna().any():
            n = int(adata.obs[key].isna().sum())
            raise ValueError(f"obs[{key!r}] (a covariate) has {n} missing value(s).")
