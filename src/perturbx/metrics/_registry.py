"""The metric registry: one specification per metric, used to compute and to describe it.

Each :class:`Metric` names the metric, says which direction is better, what a perfect
prediction scores, what it is computed on and how: its ``compute`` takes a
:class:`MetricInputs` (the pseudobulk means of ``N`` conditions and what they share: the
deltas, the top DE genes, the gene weights) and returns ``(N,)`` values. :func:`metrics`
lists them in report order; :func:`perturbx.metrics.metric_info` describes them and
:func:`metric_arrays` computes them, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from perturbx.metrics._functions import (
    _broadcast,
    _check_top_k,
    _gather,
    _masked_pearson,
    _masked_r2,
    _overlap,
    _tolerance,
    _top_de,
    _weighted_r2,
    centroid_accuracy,
    de_gene_weights,
)

#: Values of one metric for ``N`` conditions, and where a Pearson metric's predicted delta
#: is constant while the true one is not (``None`` for other metrics).
MetricValues = tuple[np.ndarray, "np.ndarray | None"]


class MetricInputs:
    """The pseudobulk means of ``N`` conditions and the quantities the metrics share.

    Parameters
    ----------
    pred, true
        ``(N, G)`` predicted and real means (log-normalised).
    control, centroid
        ``(N, G)`` or ``(G,)`` control mean ``c`` and perturbed centroid ``mu``.
    de_scores
        ``(N, G)`` DE statistics of each real condition against its controls.
    groups
        ``(N,)`` covariate group labels for centroid accuracy (default: one group).
    top_k
        The top-DE gene set sizes the metrics use.
    """

    def __init__(self, pred, true, control, centroid, de_scores, groups=None, top_k=(20, 50)):
        self.top_k = _check_top_k(top_k)
        self.pred, self.true, self.control, self.centroid, self.de_scores = _broadcast(
            (pred, "pred"),
            (true, "true"),
            (control, "control"),
            (centroid, "centroid"),
            (de_scores, "de_scores"),
        )
        self.groups = groups

    @cached_property
    def tolerance(self) -> np.ndarray:
        """``(N,)`` absolute tolerance below which a standard deviation counts as zero."""
        return _tolerance(self.pred, self.true, self.control, self.centroid)

    @cached_property
    def all_genes(self) -> np.ndarray:
        """``(N, G)`` all-True mask."""
        return np.ones(self.true.shape, dtype=bool)

    def delta(self, reference: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pred - ref, true - ref)`` for ``reference`` ``"control"`` or ``"centroid"``."""
        ref = self.control if reference == "control" else self.centroid
        return self.pred - ref, self.true - ref

    @cached_property
    def _top_de(self) -> tuple[np.ndarray, np.ndarray]:
        return _top_de(self.de_scores, max(self.top_k))

    def top_de(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(N, k)`` indices of the top-``k`` DE genes and whether each is a DE gene."""
        idx, valid = self._top_de
        return idx[:, :k], valid[:, :k]

    @cached_property
    def weights(self) -> np.ndarray:
        """``(N, G)`` DE gene weights (:func:`perturbx.metrics.de_gene_weights`)."""
        return de_gene_weights(self.de_scores)

    @cached_property
    def overlap(self) -> dict[int, np.ndarray]:
        """Top-``k`` overlap of ``|pred - c|`` and ``|true - c|``, for every ``k``."""
        dp, dt = self.delta("control")
        return _overlap(np.abs(dp), np.abs(dt), self.top_k)


@dataclass(frozen=True)
class Metric:
    """One metric: how to compute it and how to read it.

    Attributes
    ----------
    name
        Column name in the result tables.
    higher_is_better
        Direction of improvement.
    perfect_value
        Value of a perfect prediction.
    computed_on
        The genes (and conditions) it looks at: ``"all genes"``, ``"top-20 DE genes"``,
        ``"DE gene weights"``, ``"all genes, the group's conditions"``.
    description
        What it measures, in one line.
    compute
        ``MetricInputs -> (values (N,), predicted-constant mask or None)``.
    """

    name: str
    higher_is_better: bool
    perfect_value: float
    computed_on: str
    description: str
    compute: Callable[[MetricInputs], MetricValues]


def _pearson(reference: str, k: int | None) -> Callable[[MetricInputs], MetricValues]:
    def compute(x: MetricInputs) -> MetricValues:
        dp, dt = x.delta(reference)
        if k is None:
            return _masked_pearson(dp, dt, x.all_genes, x.tolerance)
        idx, valid = x.top_de(k)
        return _masked_pearson(_gather(dp, idx), _gather(dt, idx), valid, x.tolerance)

    return compute


def _r2(k: int | None) -> Callable[[MetricInputs], MetricValues]:
    def compute(x: MetricInputs) -> MetricValues:
        if k is None:
            return _masked_r2(x.pred, x.true, x.all_genes, x.tolerance), None
        idx, valid = x.top_de(k)
        return _masked_r2(_gather(x.pred, idx), _gather(x.true, idx), valid, x.tolerance), None

    return compute


def _mse(x: MetricInputs) -> MetricValues:
    with np.errstate(invalid="ignore"):
        return np.mean((x.pred - x.true) ** 2, axis=1), None


def _weighted_mse(x: MetricInputs) -> MetricValues:
    return (x.weights * (x.pred - x.true) ** 2).sum(axis=1), None


def _weighted_r2_delta_centroid(x: MetricInputs) -> MetricValues:
    return _weighted_r2(*x.delta("centroid"), x.weights, x.tolerance), None


def _centroid_accuracy(x: MetricInputs) -> MetricValues:
    return centroid_accuracy(x.pred, x.true, x.groups), None


def _overlap_at(k: int) -> Callable[[MetricInputs], MetricValues]:
    return lambda x: (x.overlap[k], None)


def _direction_agreement(k: int) -> Callable[[MetricInputs], MetricValues]:
    def compute(x: MetricInputs) -> MetricValues:
        dp, dt = x.delta("control")
        idx, valid = x.top_de(k)
        same = (np.sign(_gather(dp, idx)) == np.sign(_gather(dt, idx))) & valid
        with np.errstate(invalid="ignore", divide="ignore"):
            return same.sum(1) / valid.sum(1), None

    return compute


def metric_registry(top_k: Sequence[int] = (20, 50)) -> list[Metric]:
    """The metrics computed by :func:`perturbx.metrics.score`, in report order."""
    top_k = _check_top_k(top_k)
    found = [Metric("mse", False, 0.0, "all genes", "mean squared error of the means", _mse)]
    for reference, symbol in (("control", "c"), ("centroid", "mu")):
        found.append(
            Metric(
                f"pearson_delta_{reference}",
                True,
                1.0,
                "all genes",
                f"Pearson of pred-{symbol} vs true-{symbol}",
                _pearson(reference, None),
            )
        )
        found += [
            Metric(
                f"pearson_delta_{reference}_top{k}",
                True,
                1.0,
                f"top-{k} DE genes",
                f"Pearson of pred-{symbol} vs true-{symbol}",
                _pearson(reference, k),
            )
            for k in top_k
        ]
    found.append(
        Metric("r2", True, 1.0, "all genes", "r2_score(true, pred) of the means", _r2(None))
    )
    found += [
        Metric(
            f"r2_top{k}",
            True,
            1.0,
            f"top-{k} DE genes",
            "r2_score(true, pred) of the means",
            _r2(k),
        )
        for k in top_k
    ]
    found += [
        Metric(
            "weighted_mse",
            False,
            0.0,
            "DE gene weights",
            "MSE of the means weighted by DE gene weights",
            _weighted_mse,
        ),
        Metric(
            "weighted_r2_delta_centroid",
            True,
            1.0,
            "DE gene weights",
            "weighted R2 of pred-mu vs true-mu",
            _weighted_r2_delta_centroid,
        ),
        Metric(
            "centroid_accuracy",
            True,
            1.0,
            "all genes, the group's conditions",
            "fraction of other true means farther than own",
            _centroid_accuracy,
        ),
    ]
    found += [
        Metric(
            f"overlap_at_{k}",
            True,
            1.0,
            f"top-{k} genes by |delta vs c|",
            f"shared top-{k} genes by |delta vs c|",
            _overlap_at(k),
        )
        for k in top_k
    ]
    found += [
        Metric(
            f"direction_agreement_top{k}",
            True,
            1.0,
            f"top-{k} DE genes",
            "sign(pred-c) == sign(true-c)",
            _direction_agreement(k),
        )
        for k in top_k
    ]
    return found


def metric_info(top_k: Sequence[int] = (20, 50)) -> pd.DataFrame:
    """The metrics computed by :func:`perturbx.metrics.score`, in report order.

    Returns
    -------
    DataFrame indexed by metric name with ``higher_is_better`` (bool), ``perfect_value``
    (value of a perfect prediction), ``computed_on`` and ``description``.
    """
    rows = [
        (m.name, m.higher_is_better, m.perfect_value, m.computed_on, m.description)
        for m in metric_registry(top_k)
    ]
    columns = ["metric", "higher_is_better", "perfect_value", "computed_on", "description"]
    return pd.DataFrame(rows, columns=columns).set_index("metric")


def metric_arrays(
    pred: np.ndarray,
    true: np.ndarray,
    control: np.ndarray,
    centroid: np.ndarray,
    de_scores: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    top_k: Sequence[int] = (20, 50),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All metrics for ``N`` conditions at once (the vectorised core of ``score_means``).

    Returns
    -------
    values
        Metric name -> ``(N,)`` values, in :func:`metric_info` order, plus ``n_de_genes``.
        Rows whose prediction is not finite are NaN.
    pred_constant
        Pearson metric name -> ``(N,)`` bool, True where the predicted delta is constant
        while the true one is not (used to score such predictions as correlation 0 in
        calibration; the metric itself stays NaN).
    """
    inputs = MetricInputs(pred, true, control, centroid, de_scores, groups, top_k)
    values: dict[str, np.ndarray] = {}
    constant: dict[str, np.ndarray] = {}
    for metric in metric_registry(top_k):
        values[metric.name], pred_constant = metric.compute(inputs)
        if pred_constant is not None:
            constant[metric.name] = pred_constant
    bad_rows = ~np.isfinite(inputs.pred).all(axis=1)
    for array in values.values():
        array[bad_rows] = np.nan
    for array in constant.values():
        array[bad_rows] = False
    values["n_de_genes"] = np.count_nonzero(np.nan_to_num(inputs.de_scores) != 0, axis=1).astype(
        float
    )
    return values, constant
