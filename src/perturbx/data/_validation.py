"""Checks of an AnnData before it is registered or modelled (nothing here modifies it)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset
from scipy import sparse

# Values scanned at a time (4 MB of float32): bounds the memory of checking a dense, sparse or
# backed (on-disk) matrix, whatever its size.
_CHUNK_VALUES = 1_000_000


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
    """The stored values of ``matrix`` in bounded chunks, never densifying a sparse matrix.

    In-memory sparse matrices and backed (on-disk) CSR/CSC datasets are scanned through their
    stored non-zero values (for a backed one, read from disk chunk by chunk); dense and
    backed dense (``h5py.Dataset``) matrices in blocks of rows.
    """
    if sparse.issparse(matrix) or isinstance(matrix, CSRDataset | CSCDataset):
        data = matrix.data if sparse.issparse(matrix) else matrix.group["data"]
        for start in range(0, data.shape[0], _CHUNK_VALUES):
            yield np.asarray(data[start : start + _CHUNK_VALUES])
        return
    n_rows = max(1, _CHUNK_VALUES // max(1, matrix.shape[1]))
    for start in range(0, matrix.shape[0], n_rows):
        block = matrix[start : start + n_rows]
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


@contextmanager
def unchanged_on_error(adata: AnnData) -> Iterator[None]:
    """Undo additions to ``adata.obs``, ``.obsm`` and ``.uns`` if the block raises.

    scvi-tools registration writes its arrays field by field, so a field that fails after
    an earlier one succeeded would leave the user's AnnData half-registered. Only references
    are kept, so this costs no copy of the data.
    """
    obs_columns = list(adata.obs.columns)
    obsm = dict(adata.obsm.items())
    uns = dict(adata.uns.items())
    try:
        yield
    except BaseException:
        added = [c for c in adata.obs.columns if c not in obs_columns]
        if added:
            adata.obs.drop(columns=added, inplace=True)
        for key in [k for k in adata.obsm.keys() if k not in obsm]:
            del adata.obsm[key]
        for key, value in obsm.items():
            if adata.obsm.get(key) is not value:
                adata.obsm[key] = value
        for key in [k for k in adata.uns.keys() if k not in uns]:
            del adata.uns[key]
        adata.uns.update(uns)
        raise


def keeps_adata_on_error(argument: str) -> Callable:
    """Decorate a method so that its AnnData argument ``argument`` is unchanged if it raises.

    Registration of a new AnnData (scvi's keys in ``obsm`` and ``uns``, perturbx's arrays)
    happens early in prediction, evaluation and latent extraction; an error after it (a bad
    ``source``, no matching control cells) must not leave the user's object half-registered.
    Successful calls keep the registration, as in scvi-tools.
    """

    def decorator(method: Callable) -> Callable:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            adata = signature.bind_partial(*args, **kwargs).arguments.get(argument)
            if not isinstance(adata, AnnData) or adata.is_view:  # a view is copied, not changed
                return method(*args, **kwargs)
            with unchanged_on_error(adata):
                return method(*args, **kwargs)

        return wrapper

    return decorator


def check_obs(adata: AnnData, covariate_keys: Sequence[str]) -> None:
    """Non-empty data, unique obs names and present, complete covariate columns."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes).")
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


def check_var_names(adata: AnnData) -> None:
    """Unique gene names: genes are matched to models and predictions by name."""
    if not adata.var_names.is_unique:
        duplicated = adata.var_names[adata.var_names.duplicated()].unique()
        raise ValueError(
            f"adata.var_names has {len(duplicated)} duplicated gene name(s), e.g. "
            f"{duplicated[:5].tolist()}; genes are matched by name, so make them unique "
            "(adata.var_names_make_unique()) or drop the duplicates."
        )


def _gene_differences(adata: AnnData, genes: pd.Index) -> str:
    missing = genes.difference(adata.var_names, sort=False)
    extra = adata.var_names.difference(genes, sort=False)
    parts = []
    if len(missing):
        parts.append(f"lacks {len(missing)} of the model's genes (e.g. {missing[:5].tolist()})")
    if len(extra):
        parts.append(f"has {len(extra)} genes the model does not know (e.g. {extra[:5].tolist()})")
    return " and ".join(parts) or "has the model's genes in a different order"


def align_genes(adata: AnnData, genes: Sequence[str]) -> AnnData:
    """``adata`` with its genes matched by name to the model's ``genes``, in their order.

    Returns ``adata`` itself when the genes already match, else a gene-subset copy (genes
    the model does not know are dropped). Raises ``ValueError`` naming the missing genes if
    any of ``genes`` is absent.
    """
    genes = pd.Index(genes)
    if adata.var_names.equals(genes):
        return adata
    if len(genes.difference(adata.var_names)):
        raise ValueError(
            f"adata {_gene_differences(adata, genes)}; the model needs all {len(genes)} genes "
            "it was trained on (matched by adata.var_names)."
        )
    if not adata.var_names.is_unique:
        raise ValueError(
            "adata.var_names are not unique, so genes cannot be matched to the model's by name; "
            "call adata.var_names_make_unique()."
        )
    if adata.isbacked:  # a reordered copy would be read into memory
        raise ValueError(
            f"adata is backed (on disk) and {_gene_differences(adata, genes)}; its genes cannot "
            "be reordered without reading it into memory. Write a file with exactly the "
            "model's genes in the model's order, or pass adata[:, genes].to_memory()."
        )
    return adata[:, genes].copy()


def check_same_genes(adata: AnnData, genes: Sequence[str]) -> None:
    """Require ``adata.var_names`` to equal the model's ``genes`` exactly (same order)."""
    genes = pd.Index(genes)
    if not adata.var_names.equals(genes):
        raise ValueError(
            f"adata {_gene_differences(adata, genes)}. A model can only be loaded with an "
            "AnnData of exactly its training genes, in the same order: pass "
            "adata[:, genes].copy() with genes from the saved model (PerturbX.load_registry"
            "(path)['field_registries']['X']['state_registry']['column_names'])."
        )
