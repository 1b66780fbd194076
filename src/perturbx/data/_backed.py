"""Support for AnnData whose expression stays on disk (backed mode, ``anndata.io.sparse_dataset``).

scvi-tools and anndata already read minibatches from disk: ``anndata.read_h5ad(path,
backed="r")`` keeps ``X`` in the file (a :class:`anndata.abc.CSRDataset` for sparse data), and
an on-disk sparse group opened with :func:`anndata.io.sparse_dataset` (HDF5 or zarr) can be
put in ``layers`` of an in-memory AnnData. The data loaders read only the cells of each
minibatch. This module holds the few guards perturbx adds on top: keep the requested cell
order, and fail clearly where an operation would need the whole matrix in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np
import torch
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset

from perturbx.data._validation import expression_matrix


def is_on_disk(adata: AnnData, layer: str | None) -> bool:
    """Whether the registered expression of ``adata`` is read from disk, not held in memory."""
    if adata.isbacked:
        return True
    matrix = expression_matrix(adata, layer)
    return isinstance(matrix, CSRDataset | CSCDataset | h5py.Dataset)


def check_minibatch_access(adata: AnnData, layer: str | None) -> None:
    """Raise ``ValueError`` if the data loader could not read shuffled minibatches.

    A dense HDF5 dataset (``h5py.Dataset``) can only be read at increasing row indices;
    scvi-tools sorts each minibatch's rows for backed AnnData only, so a dense on-disk
    layer of an AnnData that is not backed fails during training.
    """
    matrix = expression_matrix(adata, layer)
    if isinstance(matrix, h5py.Dataset) and not adata.isbacked:
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        raise ValueError(
            f"{where} is a dense HDF5 dataset in an AnnData that is not backed; shuffled "
            "minibatches cannot be read from it. Store the counts as a sparse matrix and open "
            "them with anndata.io.sparse_dataset, or put them in X and open the file with "
            "anndata.read_h5ad(path, backed='r')."
        )


def check_not_backed_view(adata: AnnData, operation: str) -> None:
    """Raise ``ValueError`` if ``adata`` is a view (a subset) of a backed AnnData.

    scvi-tools copies views into new AnnData objects, which anndata refuses for backed ones
    (and which would read the subset into memory).
    """
    if adata.is_view and adata.isbacked:
        raise ValueError(
            f"{operation}: adata is a view (a subset of cells or genes) of a backed AnnData "
            "opened with backed='r', which would have to be copied into memory. Pass the whole "
            "backed AnnData and choose cells with `indices=` (or `source=` in predict), or, if "
            "the subset fits in memory, pass `adata[...].to_memory()`."
        )


class InRequestedOrder:
    """A data loader over a backed AnnData whose minibatches keep the requested cell order.

    For a backed AnnData, scvi-tools sorts the cell indices of each minibatch (HDF5 reads need
    increasing indices), so cells requested in another order would come back sorted and be
    matched to the wrong rows. Iterating this wrapper yields each minibatch's tensors with
    their rows put back in the requested order. Only used when the order would change.

    Parameters
    ----------
    loader
        A :class:`scvi.dataloaders.AnnDataLoader` with its default batch sampler (no shuffle).
    """

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        indices = np.asarray(self.loader.indices)
        # The batch sampler is sequential, so iterating it again gives the loader's batches.
        for positions, tensors in zip(self.loader.sampler, self.loader, strict=True):
            requested = indices[np.asarray(positions)]
            # Row of the sorted minibatch holding each requested cell (ties keep their order).
            rows = np.argsort(np.argsort(requested, kind="stable"), kind="stable")
            rows = torch.from_numpy(rows)
            yield {
                key: value[rows] if isinstance(value, torch.Tensor) else value
                for key, value in tensors.items()
            }


def keep_requested_order(loader, adata: AnnData, indices) -> object:
    """``loader``, wrapped in :class:`InRequestedOrder` if scvi would reorder its cells."""
    if indices is None or not adata.isbacked:
        return loader
    requested = np.asarray(loader.indices)
    if requested.size < 2 or bool(np.all(requested[1:] >= requested[:-1])):
        return loader
    return InRequestedOrder(loader)
