"""Reference predictions: control mean, perturbed centroid, interpolated duplicate.

* ``control_mean`` predicts no effect: the mean of the controls with the same covariates.
* ``perturbed_centroid`` (the *mean baseline*, the negative control) predicts ``mu``, the
  unweighted mean of the per-condition means of the training perturbations with the same
  covariates.
* ``interpolated_duplicate`` (the positive control): the real cells of a condition are
  split at random in two halves; the first half is the ground truth and the prediction is,
  gene by gene, ``(1 - p_adj) * second_half_mean + p_adj * mu`` with ``p_adj`` from the DE
  test of the second half against the controls. Significant genes keep the duplicate's
  value, non-significant ones shrink to the centroid.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

BASELINES = ("control_mean", "perturbed_centroid", "interpolated_duplicate")
NEGATIVE_CONTROL = "perturbed_centroid"
POSITIVE_CONTROL = "interpolated_duplicate"

#: Smallest number of cells for which a condition gets a positive control (two halves of
#: at least two cells each, so that the second half can be tested with a t-test).
MIN_CELLS_FOR_DUPLICATE = 4


def interpolated_duplicate(second_half_mean, pvals_adj, centroid) -> np.ndarray:
    """``(1 - p_adj) * second_half_mean + p_adj * centroid``, gene by gene.

    Parameters
    ----------
    second_half_mean
        ``(G,)`` or ``(n, G)`` mean of the held-out half of the real cells.
    pvals_adj
        Same shape: adjusted p-values of the second half against the controls (in [0, 1]).
    centroid
        ``(G,)`` or ``(n, G)`` perturbed centroid ``mu``.

    Returns
    -------
    The positive-control prediction, broadcast shape of the inputs.
    """
    p = np.asarray(pvals_adj, dtype=np.float64)
    finite = p[np.isfinite(p)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError("pvals_adj must lie in [0, 1].")
    return (1.0 - p) * np.asarray(second_half_mean, dtype=np.float64) + p * np.asarray(
        centroid, dtype=np.float64
    )


def perturbed_centroid(
    condition_means: np.ndarray, condition_groups: np.ndarray, groups: np.ndarray
) -> np.ndarray:
    """Unweighted mean of training-condition means per covariate group.

    Parameters
    ----------
    condition_means
        ``(n_train, G)`` means of the training conditions.
    condition_groups
        ``(n_train,)`` covariate group of each training condition.
    groups
        ``(n,)`` covariate groups for which the centroid is wanted.

    Returns
    -------
    ``(n, G)``; NaN rows for groups without training conditions.
    """
    condition_means = np.asarray(condition_means, dtype=np.float64)
    out = np.full((len(groups), condition_means.shape[1]), np.nan)
    for group in pd.unique(np.asarray(groups)):
        members = np.asarray(condition_groups) == group
        if members.any():
            out[np.asarray(groups) == group] = condition_means[members].mean(axis=0)
    return out


def split_halves(
    codes: np.ndarray,
    cell_names: np.ndarray,
    condition_labels: dict[int, str],
    seed: int,
) -> np.ndarray:
    """Split the cells of each listed condition at random into two halves.

    The split of a condition depends only on the seed, its label and the names of its
    cells (cells are sorted by name before shuffling), not on the cell order or on the
    other conditions.

    Parameters
    ----------
    codes
        ``(n_cells,)`` condition code of each cell.
    cell_names
        ``(n_cells,)`` cell names (``obs_names``).
    condition_labels
        Code -> label for the conditions to split (others are left alone).
    seed
        Random seed.

    Returns
    -------
    ``(n_cells,)`` int8: 1 = first half (ground truth, ``n // 2`` cells), 2 = second half
    (``n - n // 2`` cells), 0 = not split.
    """
    half = np.zeros(len(codes), dtype=np.int8)
    order = np.lexsort((np.asarray(cell_names).astype(str), codes))
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, list(condition_labels), side="left")
    ends = np.searchsorted(sorted_codes, list(condition_labels), side="right")
    for (_code, label), start, end in zip(condition_labels.items(), starts, ends, strict=True):
        cells = order[start:end]
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        shuffled = cells[rng.permutation(cells.size)]
        half[shuffled[: cells.size // 2]] = 1
        half[shuffled[cells.size // 2 :]] = 2
    return half
