"""The real cells :func:`perturbx.metrics.score` reads: ``real`` and a centroid reference.

The reference (e.g. a model's training cells) is not concatenated to ``real``: its cells
are numbered after ``real``'s and their rows are read from it when needed, and the
conditions that only enter the perturbed centroid are averaged a block of cells at a time,
so that a large reference costs neither a copy nor a log-normalised copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from perturbx.metrics._pseudobulk import (
    CELLS_PER_BLOCK,
    get_expression,
    group_sums,
    log_normalise,
    means_of_sums,
)

_REFERENCE_PREFIX = "reference::"


@dataclass
class CellSubset:
    """The cells ``rows`` of ``adata``, given to :func:`~perturbx.metrics.score` as
    ``centroid_reference`` without making a view (anndata copies a view's expression when it
    is read, and would read a view of a backed AnnData whole).
    """

    adata: AnnData
    rows: np.ndarray


class RealCells:
    """Expression rows of ``real``'s cells, then of a reference's, as one numbering.

    Parameters
    ----------
    parts
        ``(adata, rows)`` pairs: the cells ``rows`` of ``adata`` (``None``: all of them),
        numbered consecutively in this order.
    obs
        ``.obs`` of those cells, in the same order.
    layer
        Expression layer of every part (``None``: ``X``).

    Attributes
    ----------
    obs
        As given.
    genes
        Names of the genes every part has, in the first part's order.
    """

    def __init__(
        self,
        parts: Sequence[tuple[AnnData, np.ndarray | None]],
        obs: pd.DataFrame,
        layer: str | None,
    ):
        self.obs = obs
        var_names = [adata.var_names for adata, _ in parts]
        common = var_names[0]
        for names in var_names[1:]:
            common = common[common.isin(names)]
        self.genes = common
        self._parts = []
        for adata, rows in parts:
            rows = np.arange(adata.n_obs) if rows is None else np.asarray(rows)
            self._parts.append(
                (get_expression(adata, layer), rows, adata.var_names.get_indexer(common))
            )
        self._starts = np.cumsum([0] + [len(rows) for _, rows, _ in self._parts])

    def as_anndata(self) -> AnnData:
        """An AnnData with the cells' ``.obs`` and the genes, without expression (for the
        argument checks and gene matching).
        """
        return AnnData(obs=self.obs, var=pd.DataFrame(index=self.genes))

    def take(self, cells: np.ndarray, genes: pd.Index):
        """Expression ``(len(cells), len(genes))`` of sorted cell numbers, genes by name."""
        blocks = []
        for (matrix, rows, columns), start, stop in zip(
            self._parts, self._starts[:-1], self._starts[1:], strict=True
        ):
            mine = cells[(cells >= start) & (cells < stop)] - start
            if mine.size:
                selected = columns[self.genes.get_indexer(genes)]
                blocks.append(matrix[rows[mine]][:, selected])
        if not blocks:
            return np.zeros((0, len(genes)), dtype=np.float32)
        if len(blocks) == 1:
            return blocks[0]
        if any(sp.issparse(b) for b in blocks):
            return sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr")
        return np.vstack([np.asarray(b) for b in blocks])

    def log_normalised_means(
        self,
        cells: np.ndarray,
        codes: np.ndarray,
        n_groups: int,
        genes: pd.Index,
        *,
        counts: bool,
        target_sum: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-group means ``(n_groups, n_genes)`` of the log-normalised expression of
        sorted ``cells`` (group ``codes``), read a block of cells at a time; and the number
        of cells per group.
        """
        sums = np.zeros((n_groups, len(genes)))
        n_cells = np.zeros(n_groups, dtype=np.int64)
        for start in range(0, len(cells), CELLS_PER_BLOCK):
            block = slice(start, start + CELLS_PER_BLOCK)
            values, _ = log_normalise(
                self.take(cells[block], genes), counts=counts, target_sum=target_sum
            )
            block_sums, block_cells = group_sums(values, codes[block], n_groups)
            sums += block_sums
            n_cells += block_cells
        return means_of_sums(sums, n_cells), n_cells


def real_cells(real: AnnData, layer: str | None) -> RealCells:
    """The cells of ``real`` alone."""
    return RealCells([(real, None)], real.obs, layer)


def with_centroid_reference(
    real,
    reference,
    train_perturbations,
    *,
    perturbation_key,
    dose_key,
    covariate_keys,
    control_value,
    layer,
):
    """``real``'s cells followed by the reference's perturbed cells, relabelled.

    ``reference`` is an AnnData or a :class:`CellSubset`. Every member of a reference
    perturbation is prefixed (``"A+B"`` → ``"reference::A+reference::B"``) so that reference
    conditions can never be mistaken for evaluated ones; they are then the only conditions
    that form the centroid. Returns the
    :class:`RealCells` and the (prefixed) training perturbations.
    """
    rows = None
    if isinstance(reference, CellSubset):
        # Sorted: rows are then read in file order from a backed AnnData.
        reference, rows = reference.adata, np.sort(np.asarray(reference.rows))
    columns = [perturbation_key] + ([dose_key] if dose_key else []) + list(covariate_keys)
    missing = [c for c in columns if c not in reference.obs.columns]
    if missing:
        raise KeyError(f"centroid_reference.obs lacks the column(s) {missing}.")
    candidates = np.arange(reference.n_obs) if rows is None else rows
    labels = reference.obs[perturbation_key].iloc[candidates].astype(str)
    keep = (labels != control_value).to_numpy()
    if train_perturbations is not None:
        keep &= labels.isin([str(t) for t in train_perturbations]).to_numpy()
    if not keep.any():
        raise ValueError("centroid_reference has no perturbed cells to form the centroid.")
    kept = candidates[keep]
    ref_obs = reference.obs.iloc[kept][columns].copy()
    ref_obs[perturbation_key] = [
        "+".join(_REFERENCE_PREFIX + m for m in label.split("+"))
        for label in ref_obs[perturbation_key].astype(str)
    ]
    ref_obs.index = [f"{_REFERENCE_PREFIX}{i}" for i in range(len(kept))]
    parts = []
    for part_obs in (real.obs[columns].copy(), ref_obs):
        for column in columns:
            if part_obs[column].dtype.name == "category":
                part_obs[column] = part_obs[column].astype(str)
        parts.append(part_obs)
    obs = pd.concat(parts)
    cells = RealCells([(real, None), (reference, kept)], obs, layer)
    return cells, sorted(set(ref_obs[perturbation_key]))
