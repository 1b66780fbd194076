"""Metric functions on pseudobulk means (log-normalised expression).

Notation, for one condition and ``G`` genes: ``pred`` is the predicted mean, ``true`` the
real mean, ``reference`` either the control mean ``c`` or the perturbed centroid ``mu``;
a *delta* is a mean minus a reference.

Every function accepts one condition (1-D arrays of length ``G``, returns a float) or many
(2-D arrays ``(n_conditions, G)``, returns an ``(n_conditions,)`` array); all the work is
vectorised over conditions.

Conventions
-----------
* A Pearson correlation of a (numerically) constant vector is undefined and returned as
  NaN. "Constant" means a standard deviation at most ``CONSTANT_RTOL * (1 + max|x|)``,
  where ``x`` ranges over the predicted, true and reference values of the condition, so
  float32 rounding of a prediction equal to its reference still counts as constant.
* R² follows ``sklearn.metrics.r2_score(true, pred)`` except that a constant ``true``
  gives NaN (sklearn would return 1.0 or 0.0).
* Top-k DE genes are the genes with the largest ``|DE statistic|`` (ties broken by gene
  position), among genes with a finite non-zero statistic; a condition with fewer than
  ``k`` such genes uses those it has (none: NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

CONSTANT_RTOL = 1e-6


def _check_top_k(top_k: Sequence[int]) -> tuple[int, ...]:
    values = tuple(int(k) for k in top_k)
    if any(k < 1 for k in values) or any(k != v for k, v in zip(values, top_k, strict=True)):
        raise ValueError(f"top_k must be positive integers, got {tuple(top_k)!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"top_k has repeated values: {values!r}.")
    return values


def _rows(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D (genes) or 2-D (conditions x genes).")
    return arr


def _broadcast(*arrays_and_names) -> list[np.ndarray]:
    arrays = [_rows(a, n) for a, n in arrays_and_names]
    n_genes = {a.shape[1] for a in arrays}
    if len(n_genes) != 1:
        shapes = ", ".join(
            f"{n}: {a.shape}" for a, (_, n) in zip(arrays, arrays_and_names, strict=True)
        )
        raise ValueError(f"arrays must have the same number of genes; got {shapes}.")
    n = max(a.shape[0] for a in arrays)
    out = []
    for a, (_, name) in zip(arrays, arrays_and_names, strict=True):
        if a.shape[0] not in (1, n):
            raise ValueError(f"{name} has {a.shape[0]} rows, expected 1 or {n}.")
        out.append(np.broadcast_to(a, (n, a.shape[1])))
    return out


def _single(x, result):
    return float(result[0]) if np.ndim(x) == 1 else result


def _select_genes(genes, n_genes: int) -> np.ndarray:
    """Gene index array from an index list or a boolean mask."""
    idx = np.asarray(genes)
    if idx.size == 0:
        return np.zeros(0, dtype=int)
    if idx.dtype == bool:
        if idx.shape != (n_genes,):
            raise ValueError(f"a boolean genes mask must have length {n_genes}.")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("genes must be a 1-D integer index array or a boolean mask.")
    if idx.size and (idx.min() < -n_genes or idx.max() >= n_genes):
        raise ValueError(f"genes has indices outside [0, {n_genes}).")
    return idx


def _tolerance(*arrays: np.ndarray) -> np.ndarray:
    """Per-row absolute tolerance below which a standard deviation counts as zero."""
    with np.errstate(invalid="ignore"):
        scale = np.max([np.nanmax(np.abs(a), axis=1, initial=0.0) for a in arrays], axis=0)
    return CONSTANT_RTOL * (1.0 + scale)


def _masked_pearson(x, y, valid, tol) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Pearson of ``x`` and ``y`` over the ``valid`` entries.

    Returns the correlations (NaN where undefined) and a mask of rows where ``x`` is
    constant but ``y`` is not (a prediction with no information about the direction).
    """
    w = valid.astype(np.float64)
    n = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = (x - (x * w).sum(axis=1, keepdims=True) / n[:, None]) * w
        yc = (y - (y * w).sum(axis=1, keepdims=True) / n[:, None]) * w
        sxx, syy, sxy = (xc * xc).sum(1), (yc * yc).sum(1), (xc * yc).sum(1)
        r = np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0)
        x_const, y_const = sxx <= n * tol**2, syy <= n * tol**2
    undefined = x_const | y_const | (n < 2) | ~np.isfinite(r)
    r[undefined] = np.nan
    pred_constant = x_const & ~y_const & (n >= 2) & np.isfinite(syy)
    return r, pred_constant


def _masked_r2(pred, true, valid, tol) -> np.ndarray:
    w = valid.astype(np.float64)
    n = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_true = (true * w).sum(axis=1, keepdims=True) / n[:, None]
        ss_tot = (((true - mean_true) * w) ** 2).sum(1)
        ss_res = (((true - pred) * w) ** 2).sum(1)
        r2 = 1.0 - ss_res / ss_tot
    r2[(ss_tot <= n * tol**2) | (n < 1)] = np.nan
    return r2


def _gather(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx, axis=1)


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)`` indices of the ``k`` largest entries per row (stable: ties by position).

    Same result as ``np.argsort(-values, kind="stable")[:, :k]``, but partitions first and
    sorts only the ``k`` candidates (rows with ties at the k-th value use the full sort).
    """
    n, n_genes = values.shape
    k = min(k, n_genes)
    if k == 0 or 4 * k >= n_genes:
        return np.argsort(-values, axis=1, kind="stable")[:, :k]
    threshold = np.partition(values, n_genes - k, axis=1)[:, n_genes - k]
    candidates = values >= threshold[:, None]
    simple = candidates.sum(axis=1) == k
    out = np.empty((n, k), dtype=np.intp)
    if simple.any():
        # np.nonzero lists each row's candidates in increasing position: ties stay ordered.
        idx = np.nonzero(candidates[simple])[1].reshape(-1, k)
        order = np.argsort(-_gather(values[simple], idx), axis=1, kind="stable")
        out[simple] = _gather(idx, order)
    if not simple.all():
        out[~simple] = np.argsort(-values[~simple], axis=1, kind="stable")[:, :k]
    return out


def top_de_genes(de_scores, k: int):
    """Indices of the top-``k`` DE genes by ``|statistic|``.

    Parameters
    ----------
    de_scores
        ``(G,)`` DE statistics of one condition (t statistic or z-score).
    k
        Number of genes; with fewer than ``k`` finite non-zero statistics, all of those.

    Returns
    -------
    ``(k',)`` int gene indices, ``k' <= k``, most significant first.
    """
    idx, valid = _top_de(_rows(de_scores, "de_scores"), int(k))
    if np.ndim(de_scores) == 1:
        return idx[0][valid[0]]
    return [i[v] for i, v in zip(idx, valid, strict=True)]


def _top_de(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(np.nan_to_num(scores, nan=0.0))
    idx = _top_indices(magnitude, k)
    valid = _gather(magnitude, idx) > 0
    return idx, valid


def de_gene_weights(de_scores):
    """Gene weights from DE statistics: ``((|t| - min|t|) / (max|t| - min|t|))**2``, summing to 1.

    Parameters
    ----------
    de_scores
        ``(G,)`` or ``(n_conditions, G)`` DE statistics (NaN counts as 0).

    Returns
    -------
    Weights of the same shape; rows whose ``|t|`` is constant are NaN (undefined).
    """
    scores = _rows(de_scores, "de_scores")
    magnitude = np.abs(np.nan_to_num(scores, nan=0.0))
    low = magnitude.min(axis=1, keepdims=True)
    span = magnitude.max(axis=1, keepdims=True) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        w = ((magnitude - low) / span) ** 2
        w = w / w.sum(axis=1, keepdims=True)
    w[(span <= 0).ravel()] = np.nan
    return w[0] if np.ndim(de_scores) == 1 else w


def mse(pred, true, genes=None):
    """Mean squared error of two mean profiles, over all genes or ``genes``."""
    p, t = _broadcast((pred, "pred"), (true, "true"))
    if genes is not None:
        idx = _select_genes(genes, p.shape[1])
        p, t = p[:, idx], t[:, idx]
    with np.errstate(invalid="ignore"):
        return _single(
            pred, np.mean((p - t) ** 2, axis=1) if p.shape[1] else np.full(p.shape[0], np.nan)
        )


def pearson_delta(pred, true, reference, genes=None):
    """Pearson correlation of ``pred - reference`` and ``true - reference``.

    Parameters
    ----------
    pred, true, reference
        ``(G,)`` or ``(n, G)`` means (a 1-D ``reference`` is shared by all rows).
    genes
        Optional gene subset (index array or boolean mask).

    Returns
    -------
    Correlation in [-1, 1]; NaN if either delta is constant or fewer than 2 genes.
    """
    p, t, ref = _broadcast((pred, "pred"), (true, "true"), (reference, "reference"))
    tol = _tolerance(p, t, ref)
    if genes is not None:
        idx = _select_genes(genes, p.shape[1])
        p, t, ref = p[:, idx], t[:, idx], ref[:, idx]
    r, _ = _masked_pearson(p - ref, t - ref, np.ones(p.shape, bool), tol)
    return _single(pred, r)


def r2(pred, true, genes=None):
    """R² of the means: ``sklearn.metrics.r2_score(true, pred)`` over genes.

    NaN if ``true`` is constant over the genes (sklearn would return 1.0 or 0.0).
    """
    p, t = _broadcast((pred, "pred"), (true, "true"))
    tol = _tolerance(p, t)
    if genes is not None:
        idx = _select_genes(genes, p.shape[1])
        p, t = p[:, idx], t[:, idx]
    return _single(pred, _masked_r2(p, t, np.ones(p.shape, bool), tol))


def weighted_mse(pred, true, weights):
    """``sum_g w_g (pred_g - true_g)**2`` with weights from :func:`de_gene_weights` (sum 1)."""
    p, t, w = _broadcast((pred, "pred"), (true, "true"), (weights, "weights"))
    return _single(pred, (w * (p - t) ** 2).sum(axis=1))


def weighted_r2_delta(pred, true, reference, weights):
    """Weighted R² of ``pred - reference`` against ``true - reference``.

    Equals ``sklearn.metrics.r2_score(true - ref, pred - ref, sample_weight=weights)``
    (genes are the samples); NaN if the weighted variance of ``true - ref`` is zero.
    """
    p, t, ref, w = _broadcast(
        (pred, "pred"), (true, "true"), (reference, "reference"), (weights, "weights")
    )
    return _single(pred, _weighted_r2(p - ref, t - ref, w, _tolerance(p, t, ref)))


def _weighted_r2(pred_delta, true_delta, w, tol) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        w = w / w.sum(axis=1, keepdims=True)
        mean_true = (w * true_delta).sum(axis=1, keepdims=True)
        ss_tot = (w * (true_delta - mean_true) ** 2).sum(1)
        ss_res = (w * (true_delta - pred_delta) ** 2).sum(1)
        out = 1.0 - ss_res / ss_tot
    out[~(ss_tot > tol**2)] = np.nan
    return out


def overlap_at_k(pred, true, reference, k: int):
    """Fraction of shared genes between the top-``k`` of ``|true - ref|`` and of ``|pred - ref|``.

    Both sides are ranked by effect size, so a perfect prediction scores 1. With fewer
    than ``k`` genes, ``k`` is the number of genes.
    """
    p, t, ref = _broadcast((pred, "pred"), (true, "true"), (reference, "reference"))
    return _single(pred, _overlap(np.abs(p - ref), np.abs(t - ref), (int(k),))[int(k)])


def _overlap(pred_effect, true_effect, top_k) -> dict[int, np.ndarray]:
    n, n_genes = true_effect.shape
    kmax = min(max(top_k), n_genes)
    top_true, top_pred = _top_indices(true_effect, kmax), _top_indices(pred_effect, kmax)
    rows = np.arange(n)[:, None]
    out = {}
    for k in top_k:
        kk = min(k, n_genes)
        in_true = np.zeros((n, n_genes), dtype=bool)
        in_true[rows, top_true[:, :kk]] = True
        out[k] = _gather(in_true, top_pred[:, :kk]).sum(axis=1) / kk if kk else np.full(n, np.nan)
    return out


def direction_agreement(pred, true, reference, genes):
    """Fraction of ``genes`` where ``sign(pred - ref) == sign(true - ref)``; NaN if no genes."""
    p, t, ref = _broadcast((pred, "pred"), (true, "true"), (reference, "reference"))
    idx = _select_genes(genes, p.shape[1])
    same = np.sign(p[:, idx] - ref[:, idx]) == np.sign(t[:, idx] - ref[:, idx])
    with np.errstate(invalid="ignore"):
        return _single(pred, same.mean(axis=1) if idx.size else np.full(p.shape[0], np.nan))


def centroid_accuracy(pred_means, true_means, groups=None) -> np.ndarray:
    """Per condition, the fraction of other true conditions farther from the prediction.

    For condition ``p`` (within its group), counts the other conditions ``q`` whose true
    mean is strictly farther (Euclidean, all genes) from ``pred_means[p]`` than
    ``true_means[p]`` is, divided by ``N - 1``. Ties (equal up to a relative 1e-12) count
    as failures.

    Parameters
    ----------
    pred_means, true_means
        ``(N, G)``, row ``i`` of both is condition ``i``.
    groups
        ``(N,)`` labels (e.g. covariate combinations); conditions are compared only within
        their group. Default: one group.

    Returns
    -------
    ``(N,)`` accuracies in [0, 1]; NaN for groups of one condition or non-finite predictions.
    """
    pred, true = _rows(pred_means, "pred_means"), _rows(true_means, "true_means")
    if pred.shape != true.shape:
        raise ValueError(f"pred_means {pred.shape} and true_means {true.shape} differ in shape.")
    groups = np.zeros(len(pred), dtype=int) if groups is None else np.asarray(groups)
    if groups.shape != (len(pred),):
        raise ValueError(f"groups must have shape ({len(pred)},), got {groups.shape}.")
    out = np.full(len(pred), np.nan)
    for group in pd.unique(groups):
        members = np.flatnonzero(groups == group)
        if members.size > 1:
            out[members] = _centroid_accuracy_block(pred[members], true[members])
    return out


def _centroid_accuracy_block(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    n = len(pred)
    ok = np.isfinite(pred).all(axis=1)
    pred = np.where(ok[:, None], pred, 0.0)
    own = ((pred - true) ** 2).sum(axis=1)
    pred_sq, true_sq = (pred**2).sum(axis=1), (true**2).sum(axis=1)
    # Fast expansion |p|^2 + |t|^2 - 2 p.t; pairs whose distance is within rounding error of
    # the own distance are recomputed exactly so that ties are decided correctly.
    dist = pred_sq[:, None] + true_sq[None, :] - 2.0 * (pred @ true.T)
    near = np.abs(dist - own[:, None]) <= 1e-8 * (pred_sq[:, None] + true_sq[None, :]) + 1e-300
    ii, jj = np.nonzero(near)
    for start in range(0, ii.size, 4096):
        sl = slice(start, start + 4096)
        dist[ii[sl], jj[sl]] = ((pred[ii[sl]] - true[jj[sl]]) ** 2).sum(axis=1)
    tie = np.isclose(dist, own[:, None], rtol=1e-12, atol=0.0)
    farther = (dist > own[:, None]) & ~tie
    np.fill_diagonal(farther, False)
    acc = farther.sum(axis=1) / (n - 1)
    acc[~ok] = np.nan
    return acc
