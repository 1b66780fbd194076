"""Calibration of metrics by the negative and positive controls.

For each metric and condition, with ``m_neg`` the value of the perturbed centroid (mean
baseline) and ``m_pos`` that of the interpolated duplicate:

* dynamic range fraction (DRF) of the positive control, how much of the way from the mean
  baseline to a perfect prediction a technical duplicate goes:
  ``(m_pos - m_neg) / (m_perfect - m_neg)`` for higher-is-better metrics and
  ``(m_neg - m_pos) / m_neg`` for lower-is-better metrics whose perfect value is 0; clipped
  to [-1, 1]. A metric whose median DRF over conditions is below
  :data:`DEFAULT_DRF_THRESHOLD` (0.5: the duplicate covers less than half of the range) is
  flagged as poorly calibrated on this dataset: differences between methods on it are
  dominated by noise.
* normalised score of any method: ``(m - m_neg) / (m_pos - m_neg)``, so 0 = mean baseline
  and 1 = positive control for every metric, whichever its direction.

Pearson correlations of a constant predicted delta (e.g. the mean baseline's
``pearson_delta_centroid``) are NaN in the raw tables; here they count as 0 (no
association), so that the mean baseline has a finite reference value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_DRF_THRESHOLD = 0.5


def dynamic_range_fraction(positive, negative, *, higher_is_better: bool, perfect: float = 1.0):
    """DRF of the positive control, clipped to [-1, 1]; NaN where the range is empty.

    Parameters
    ----------
    positive, negative
        Metric values of the positive and negative controls (scalars or arrays).
    higher_is_better
        Direction of the metric.
    perfect
        Value of a perfect prediction (lower-is-better metrics: usually 0).
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if higher_is_better:
            drf = (pos - neg) / (perfect - neg)
        else:
            drf = (neg - pos) / (neg - perfect)
    drf = np.where(np.isfinite(drf), np.clip(drf, -1.0, 1.0), np.nan)
    return float(drf) if drf.ndim == 0 else drf


def normalised_score(value, negative, positive):
    """``(value - negative) / (positive - negative)``; NaN where ``positive == negative``."""
    value, neg, pos = (np.asarray(a, dtype=np.float64) for a in (value, negative, positive))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (value - neg) / (pos - neg) + 0.0  # + 0.0 turns -0.0 into 0.0
    out = np.where(np.isfinite(out), out, np.nan)
    return float(out) if out.ndim == 0 else out


def calibrate(
    values: pd.DataFrame,
    methods: pd.Series,
    conditions: pd.Series,
    info: pd.DataFrame,
    *,
    negative: str,
    positive: str,
    threshold: float = DEFAULT_DRF_THRESHOLD,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-metric DRF summary and per-row normalised scores.

    Parameters
    ----------
    values
        ``(n_rows, n_metrics)`` metric values (constant-delta Pearson already set to 0),
        one row per condition × method.
    methods, conditions
        ``(n_rows,)`` method name and condition label of each row.
    info
        :func:`perturbx.metrics.metric_info` table (``higher_is_better``, ``perfect_value``).
    negative, positive
        Method names of the negative and positive controls.

    Returns
    -------
    calibration
        One row per metric: ``higher_is_better``, ``perfect_value``, ``median_drf``,
        ``mean_drf``, ``n_conditions`` (with a finite DRF), ``well_calibrated``.
    normalised
        Same shape as ``values``: normalised scores (NaN where a control is missing).
    """
    metrics = list(values.columns)
    neg = _reference_rows(values, methods, conditions, negative)
    pos = _reference_rows(values, methods, conditions, positive)
    neg_rows = neg.reindex(conditions.to_numpy()).to_numpy()
    pos_rows = pos.reindex(conditions.to_numpy()).to_numpy()
    normalised = pd.DataFrame(
        normalised_score(values.to_numpy(), neg_rows, pos_rows),
        index=values.index,
        columns=metrics,
    )
    rows = []
    common = neg.index.intersection(pos.index)
    for metric in metrics:
        higher, perfect = (
            bool(info.loc[metric, "higher_is_better"]),
            info.loc[metric, "perfect_value"],
        )
        drf = dynamic_range_fraction(
            pos.loc[common, metric].to_numpy(),
            neg.loc[common, metric].to_numpy(),
            higher_is_better=higher,
            perfect=float(perfect),
        )
        drf = np.atleast_1d(drf)
        finite = drf[np.isfinite(drf)]
        median = float(np.median(finite)) if finite.size else np.nan
        rows.append(
            {
                "metric": metric,
                "higher_is_better": higher,
                "perfect_value": float(perfect),
                "median_drf": median,
                "mean_drf": float(finite.mean()) if finite.size else np.nan,
                "n_conditions": int(finite.size),
                "well_calibrated": bool(finite.size and median >= threshold),
            }
        )
    return pd.DataFrame(rows).set_index("metric"), normalised


def _reference_rows(values, methods, conditions, name) -> pd.DataFrame:
    mask = (methods == name).to_numpy()
    if not mask.any():
        return pd.DataFrame(columns=values.columns, dtype=float)
    return values.loc[mask].set_axis(conditions.to_numpy()[mask], axis=0)
