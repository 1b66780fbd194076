"""Differential expression of conditions against their controls, cached per dataset.

Groups of two or more cells are tested with scanpy's ``rank_genes_groups`` (Welch t-test
with overestimated variance by default) against the reference (control) group. A group
with a single sample (bulk screens: one well per drug and dose) has no within-group
variance; its statistic falls back to a z-score against the controls,
``(x - mean_ctrl) / sd_ctrl`` per gene (``sd`` with ``ddof=1``), and it has no p-values.

Statistics are cleaned the same way for both tests: NaN (a gene constant and equal in
both groups) becomes 0, and +/-inf (a gene constant in both groups but with different
values) is capped at the largest finite ``|statistic|`` of the same group, keeping it
first in the ranking without swamping the gene weights.

Results are cached in memory, keyed by a fingerprint of the expression values, the group
labels and the settings, so repeated scoring of the same real data (several methods,
several calls) runs the test once.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from threadpoolctl import ThreadpoolController

from perturbx.metrics._pseudobulk import get_expression, group_means

Z_SCORE = "z-score"
DE_METHODS = ("t-test", "t-test_overestim_var", "wilcoxon")
_CACHE_SIZE = 8
_CACHE: OrderedDict[str, DEResult] = OrderedDict()


@dataclass(frozen=True)
class DEResult:
    """Differential expression of several groups against one reference.

    Attributes
    ----------
    scores
        ``(n_groups, n_genes)`` DataFrame: t statistic (or z-score for single-sample groups),
        positive when higher than the reference.
    pvals_adj
        ``(n_groups, n_genes)`` Benjamini-Hochberg adjusted p-values; NaN rows for
        single-sample groups.
    test
        ``(n_groups,)`` Series: the test used per group (``de_method`` or ``"z-score"``).
    n_cells
        ``(n_groups,)`` Series: cells per group.
    """

    scores: pd.DataFrame
    pvals_adj: pd.DataFrame
    test: pd.Series
    n_cells: pd.Series


def clear_de_cache() -> None:
    """Forget every cached DE result."""
    _CACHE.clear()


def differential_expression(
    adata: AnnData,
    groupby: str,
    reference: str,
    *,
    groups: Sequence[str] | None = None,
    layer: str | None = None,
    method: str = "t-test_overestim_var",
    use_cache: bool = True,
) -> DEResult:
    """Test each group of cells against the reference group.

    Parameters
    ----------
    adata
        Cells × genes, **log-normalised** (see :func:`perturbx.metrics.log_normalise`).
    groupby
        ``obs`` column with the group of each cell.
    reference
        Value of ``groupby`` marking the reference (control) cells; needs >= 2 cells.
    groups
        Groups to test (default: every other value of ``groupby``).
    layer
        Expression layer (default ``X``).
    method
        A scanpy ``rank_genes_groups`` method for groups of >= 2 cells.
    use_cache
        Reuse a result computed earlier for identical data and settings.

    Returns
    -------
    DEResult
    """
    if method not in DE_METHODS:
        raise ValueError(f"de_method={method!r} is not one of {DE_METHODS}.")
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    labels = adata.obs[groupby].astype(str).to_numpy()
    if groups is None:
        groups = [g for g in pd.unique(labels) if g != reference]
    groups = [str(g) for g in groups]
    if reference in groups:
        raise ValueError(f"groups contains the reference {reference!r}.")
    counts = pd.Series(labels).value_counts()
    missing = [g for g in [reference, *groups] if g not in counts.index]
    if missing:
        raise ValueError(f"groups {missing!r} have no cells in obs[{groupby!r}].")
    if counts[reference] < 2:
        raise ValueError(
            f"the reference group {reference!r} has {counts[reference]} cell(s); at least 2 "
            "control cells are needed to test differential expression."
        )
    matrix = get_expression(adata, layer)
    key = _fingerprint(matrix, labels, adata.var_names, reference, groups, method)
    if use_cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    n_cells = counts.reindex(groups).astype(int)
    single = [g for g in groups if n_cells[g] == 1]
    multi = [g for g in groups if n_cells[g] > 1]
    scores = np.zeros((len(groups), adata.n_vars))
    pvals_adj = np.full((len(groups), adata.n_vars), np.nan)
    position = {g: i for i, g in enumerate(groups)}
    if multi:
        rows = [position[g] for g in multi]
        scores[rows], pvals_adj[rows] = _run_rank_genes_groups(
            adata, groupby, reference, multi, method, layer
        )
    if single:
        rows = [position[g] for g in single]
        scores[rows] = _z_scores(matrix, labels, reference, single)
    scores = _clean_statistics(scores)
    result = DEResult(
        scores=pd.DataFrame(scores, index=groups, columns=adata.var_names.copy()),
        pvals_adj=pd.DataFrame(pvals_adj, index=groups, columns=adata.var_names.copy()),
        test=pd.Series([Z_SCORE if g in set(single) else method for g in groups], index=groups),
        n_cells=n_cells,
    )
    if use_cache:
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


@contextmanager
def keep_thread_pools() -> Iterator[None]:
    """Restore the size of every loaded OpenMP / BLAS thread pool on exit.

    scanpy's numba kernels start numba's OpenMP layer with one thread per core, which resizes
    the OpenMP pool that torch shares. A caller that limited torch to one thread (e.g. one
    process per core) would then train the next model with two threads per process, which
    on a busy machine ran ~6x slower. Pools loaded inside the block keep their size.
    """
    before = {lib.filepath: lib.num_threads for lib in ThreadpoolController().lib_controllers}
    try:
        yield
    finally:
        controller = ThreadpoolController()
        for lib in controller.lib_controllers:
            if before.get(lib.filepath, lib.num_threads) != lib.num_threads:
                controller.select(filepath=lib.filepath).limit(limits=before[lib.filepath])


def _run_rank_genes_groups(
    adata: AnnData,
    groupby: str,
    reference: str,
    groups: list[str],
    method: str,
    layer: str | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``sc.tl.rank_genes_groups`` on a private copy; return scores and adjusted p-values.

    Returns ``(len(groups), n_genes)`` arrays in ``adata.var_names`` order.
    """
    import scanpy as sc  # imported lazily: scanpy is slow to import and only needed here

    work = AnnData(
        X=get_expression(adata, layer),
        obs=pd.DataFrame(
            {"group": pd.Categorical(adata.obs[groupby].astype(str).to_numpy())},
            index=np.arange(adata.n_obs).astype(str),
        ),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    work.uns["log1p"] = {"base": None}  # the data are natural-log normalised
    with warnings.catch_warnings(), keep_thread_pools():
        # scanpy builds its result table column by column (pandas PerformanceWarning).
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            work,
            "group",
            groups=groups,
            reference=reference,
            method=method,
            use_raw=False,
            n_genes=None,
            rankby_abs=True,
            pts=False,
        )
    result = work.uns["rank_genes_groups"]
    scores = np.zeros((len(groups), work.n_vars))
    pvals_adj = np.ones((len(groups), work.n_vars))
    for i, group in enumerate(groups):
        genes = work.var_names.get_indexer(np.asarray(result["names"][group]).astype(str))
        scores[i, genes] = np.asarray(result["scores"][group], dtype=np.float64)
        pvals_adj[i, genes] = np.asarray(result["pvals_adj"][group], dtype=np.float64)
    return scores, pvals_adj


def _z_scores(matrix, labels: np.ndarray, reference: str, groups: list[str]) -> np.ndarray:
    """``(x - mean_ctrl) / sd_ctrl`` for single-sample groups; ``(len(groups), n_genes)``."""
    ctrl_rows = np.flatnonzero(labels == reference)
    ctrl = matrix[ctrl_rows]
    ctrl = ctrl.toarray() if sp.issparse(ctrl) else np.asarray(ctrl)
    ctrl = ctrl.astype(np.float64)
    mean, sd = ctrl.mean(axis=0), ctrl.std(axis=0, ddof=1)
    codes = pd.Index(groups).get_indexer(labels)  # -1: not one of the groups
    values, _ = group_means(matrix, codes, len(groups))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values - mean) / sd


def _clean_statistics(scores: np.ndarray) -> np.ndarray:
    scores = np.where(np.isnan(scores), 0.0, scores)
    finite = np.where(np.isfinite(scores), np.abs(scores), 0.0)
    cap = finite.max(axis=1, keepdims=True)
    cap = np.where(cap > 0, cap, 1.0)
    return np.where(np.isinf(scores), np.sign(scores) * cap, scores)


def _fingerprint(matrix, labels, var_names, reference, groups, method) -> str:
    digest = hashlib.blake2b(digest_size=20)
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        csr.sort_indices()
        parts = [csr.data, csr.indices, csr.indptr]
    else:
        parts = [np.ascontiguousarray(matrix)]
    for part in parts:
        digest.update(str(part.dtype).encode())
        digest.update(memoryview(np.ascontiguousarray(part)).cast("B"))
    digest.update(repr((matrix.shape, reference, list(groups), method)).encode())
    digest.update("\x1f".join(labels.tolist()).encode())
    digest.update("\x1f".join(map(str, var_names)).encode())
    return digest.hexdigest()
