"""Grouped bar chart of an evaluation result: :func:`evaluation_summary`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from perturbx.plotting._utils import _finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from perturbx.metrics import EvaluationResult

_NEGATIVE = "perturbed_centroid"
_POSITIVE = "interpolated_duplicate"


def _default_metrics(result: EvaluationResult) -> list[str]:
    k = min(result.settings.get("top_k", (20,)) or (20,))
    wanted = [
        "mse",
        "pearson_delta_control",
        "pearson_delta_centroid",
        f"pearson_delta_centroid_top{k}",
        "r2",
        "weighted_mse",
        "weighted_r2_delta_centroid",
        "centroid_accuracy",
        f"overlap_at_{k}",
        f"direction_agreement_top{k}",
    ]
    return [m for m in wanted if m in result.metrics]


def evaluation_summary(
    result: EvaluationResult,
    metrics: Sequence[str] | None = None,
    *,
    normalised: bool | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Compare methods across metrics in one grouped bar chart.

    With a positive control (``normalised=True``, the default when available) bars are the
    median **normalised score** of each method over conditions: 0 is the perturbed
    centroid (mean baseline, drawn as a dashed line), 1 is the interpolated duplicate
    (positive control, solid line), with the band between them shaded; whiskers span the
    25th-75th percentiles. Metrics flagged as poorly calibrated are marked with ``*`` in
    their tick label. Without a positive control (``normalised=False``) bars are median
    raw metric values and the baselines are drawn as hatched bars.

    Parameters
    ----------
    result
        Output of :func:`perturbx.metrics.score`.
    metrics
        Metric names to show (default: a representative subset).
    normalised
        Plot normalised scores (``None``: if any are finite) or raw medians.
    ax
        Axes to draw into (default: a new figure).
    show
        Call ``plt.show()``; ``None``: only in interactive sessions without ``save``.
    save
        File path to save the figure to (format from the extension).

    Returns
    -------
    The matplotlib axes.
    """
    import matplotlib.pyplot as plt

    metrics = _default_metrics(result) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in result.metrics]
    if unknown:
        raise ValueError(f"unknown metrics {unknown!r}; available: {result.metrics}.")
    if not metrics:
        raise ValueError("no metrics to plot.")
    if normalised is None:
        normalised = bool(np.isfinite(result.normalised[metrics].to_numpy(float)).any())
    table = result.normalised if normalised else result.per_condition
    methods = result.methods
    if normalised:
        methods = [m for m in methods if m not in (_NEGATIVE, _POSITIVE)]
    if not methods:
        raise ValueError("no method to plot besides the reference baselines.")

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(metrics) * len(methods) + 2), 4.0))
    x = np.arange(len(metrics))
    width = 0.8 / len(methods)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        values = table.loc[table["method"] == method, metrics].to_numpy(float)
        median, low, high = (np.full(len(metrics), np.nan) for _ in range(3))
        for j in range(len(metrics)):
            finite = values[:, j][np.isfinite(values[:, j])]
            if finite.size:
                median[j] = np.median(finite)
                low[j], high[j] = np.percentile(finite, [25, 75])
        baseline = method in (_NEGATIVE, _POSITIVE, "control_mean")
        positions = x - 0.4 + width * (i + 0.5)
        for position in positions[np.isnan(median)]:
            # an undefined median (e.g. correlation of a constant prediction) is not a 0
            ax.text(
                position,
                0.0,
                "n/a",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize="x-small",
                color="0.4",
            )
        ax.bar(
            positions,
            np.nan_to_num(median),
            width,
            yerr=np.vstack([np.nan_to_num(median - low), np.nan_to_num(high - median)]),
            label=method,
            color=colours[i % len(colours)],
            capsize=2,
            hatch="//" if baseline and not normalised else None,
            error_kw={"elinewidth": 0.8},
        )
    if normalised:
        ax.axhspan(0.0, 1.0, color="0.92", zorder=0)
        ax.axhline(
            0.0,
            color="0.3",
            linestyle="--",
            linewidth=1,
            label="mean baseline (perturbed centroid) = 0",
        )
        ax.axhline(
            1.0,
            color="0.1",
            linestyle="-",
            linewidth=1,
            label="positive control (interpolated duplicate) = 1",
        )
        ax.set_ylabel("normalised score (median over conditions)")
    else:
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_ylabel("metric value (median over conditions)")
    calibration = result.calibration
    poor = [
        normalised and m in calibration.index and not bool(calibration.loc[m, "well_calibrated"])
        for m in metrics
    ]
    labels = [f"{m}*" if flag else m for m, flag in zip(metrics, poor, strict=True)]
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_title(
        "Evaluation summary" + ("  (* = poorly calibrated on this dataset)" if any(poor) else "")
    )
    ax.legend(fontsize="small", frameon=False, loc="best")
    return _finish(ax, show, save)
