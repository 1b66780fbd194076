"""Write a large count screen to an h5ad file without ever holding it densely."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse


def write_counts_h5ad(
    path: str | Path,
    obs: pd.DataFrame,
    n_genes: int,
    *,
    seed: int = 0,
    chunk_size: int = 10_000,
) -> int:
    """Write random negative-binomial counts for ``obs``'s cells to ``path``, chunk by chunk.

    For out-of-core tests and benchmarks: a block of ``chunk_size`` cells (gene means
    log-normal, ~10% non-zero counts, NB dispersion 2) is drawn once and each chunk written is
    a random row permutation of it, so writing is cheap and no dense matrix of all cells is
    built. ``X`` is stored as CSR (float32) and can be opened with
    ``anndata.read_h5ad(path, backed="r")``.

    Parameters
    ----------
    path
        The h5ad file to create (overwritten).
    obs
        ``(n_cells, ...)`` cell annotations; its index becomes the cell names.
    n_genes
        Number of genes (named ``gene0``, ``gene1``, ...).
    seed
        Seed of the counts and of the permutations.
    chunk_size
        Cells per written chunk (peak memory of writing ~ one dense chunk).

    Returns
    -------
    Bytes of the stored CSR arrays (``data``, ``indices``, ``indptr``).
    """
    if n_genes < 1 or chunk_size < 1:
        raise ValueError(f"n_genes={n_genes} and chunk_size={chunk_size} must be positive.")
    rng = np.random.default_rng(seed)
    n_cells = len(obs)
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    means = rng.lognormal(-2.6, 1.0, n_genes)  # ~10% non-zero counts
    dispersion = 2.0
    block = rng.negative_binomial(
        dispersion, dispersion / (dispersion + means), (chunk_size, n_genes)
    )
    block = sparse.csr_matrix(block.astype(np.float32))
    with h5py.File(path, "a") as store:
        for start in range(0, n_cells, chunk_size):
            chunk = block[rng.permutation(chunk_size)[: min(chunk_size, n_cells - start)]]
            if start == 0:
                ad.io.write_elem(store, "X", chunk)
            else:
                ad.io.sparse_dataset(store["X"]).append(chunk)
        return sum(store["X"][k].nbytes for k in ("data", "indices", "indptr"))
