"""Predicted vs true log-fold changes of one condition: :func:`lfc_scatter`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.conditions import parse_condition, parse_condition_columns
from perturbx.metrics import DEFAULT_TARGET_SUM, log_normalise
from perturbx.metrics._pseudobulk import get_expression
from perturbx.plotting._utils import _finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_COUNT_LIKELIHOODS = ("nb", "zinb")


def _canonical(names: tuple[str, ...], doses: tuple[float, ...]) -> tuple:
    """Order-free form of a condition: ``A+B @ 1+3`` equals ``B+A @ 3+1``."""
    return tuple(sorted(zip(names, doses, strict=True)))


def condition_mask(
    obs: pd.DataFrame,
    spec: Mapping[str, object],
    *,
    perturbation_key: str,
    dose_key: str | None,
    control_value: str,
    dataset: str,
) -> np.ndarray:
    """Boolean ``(n_obs,)`` mask of the cells matching ``spec`` (obs key -> value).

    The perturbation (and the dose, when ``spec`` gives one) are compared as parsed
    conditions, so ``"1"``, ``1.0`` and ``"1.0"`` match; other keys are compared as strings.
    """
    missing = [k for k in spec if k not in obs.columns]
    if missing:
        raise KeyError(
            f"condition keys {missing} are not columns of {dataset}.obs; available columns: "
            f"{', '.join(map(repr, obs.columns))}."
        )
    use_dose = dose_key is not None and dose_key in spec
    wanted = parse_condition(
        str(spec[perturbation_key]),
        spec[dose_key] if use_dose else None,
        control_value=control_value,
        where="condition",
    )
    conditions, codes = parse_condition_columns(
        obs, perturbation_key, dose_key if use_dose else None, control_value
    )
    if use_dose:
        matches = [_canonical(*c) == _canonical(*wanted) for c in conditions]
    else:
        matches = [sorted(c[0]) == sorted(wanted[0]) for c in conditions]
    mask = np.asarray(matches, dtype=bool)[codes]
    for key, value in spec.items():
        if key not in (perturbation_key, dose_key):
            mask &= obs[key].astype(str).to_numpy() == str(value)
    return mask


def _condition_label(spec: Mapping[str, object], perturbation_key: str, dose_key: str | None):
    label = str(spec[perturbation_key])
    if dose_key is not None and dose_key in spec:
        label += f" @ {spec[dose_key]}"
    others = [f"{k}={v}" for k, v in spec.items() if k not in (perturbation_key, dose_key)]
    return label + (f" | {', '.join(others)}" if others else "")


def _mean_log_normalised(adata: AnnData, mask: np.ndarray, layer, counts, target_sum):
    matrix = get_expression(adata, layer)[np.flatnonzero(mask)]
    values, _ = log_normalise(matrix, counts=counts, target_sum=target_sum)
    return np.asarray(values.mean(axis=0), dtype=np.float64).ravel()


def _top_genes_wilcoxon(
    real: AnnData, cells: np.ndarray, controls: np.ndarray, layer, counts, target_sum: float
) -> np.ndarray:
    """Genes of ``real`` ordered by |Wilcoxon score| of the condition vs controls (scanpy)."""
    import scanpy as sc

    rows = np.concatenate([np.flatnonzero(cells), np.flatnonzero(controls)])
    matrix, _ = log_normalise(
        get_expression(real, layer)[rows], counts=counts, target_sum=target_sum
    )
    group = np.repeat(["condition", "control"], [cells.sum(), controls.sum()])
    work = AnnData(
        matrix,
        obs=pd.DataFrame(
            {"group": pd.Categorical(group)}, index=[str(i) for i in range(len(rows))]
        ),
    )
    work.var_names = real.var_names.astype(str)
    work.uns["log1p"] = {"base": None}  # natural-log normalised, as scanpy expects
    sc.tl.rank_genes_groups(
        work,
        "group",
        groups=["condition"],
        reference="control",
        method="wilcoxon",
        n_genes=work.n_vars,
    )
    ranked = sc.get.rank_genes_groups_df(work, group="condition")
    order = np.argsort(-np.abs(ranked["scores"].to_numpy()), kind="stable")
    return real.var_names.get_indexer(ranked["names"].to_numpy()[order])


def lfc_scatter(
    pred: AnnData,
    real: AnnData,
    condition: str | Mapping[str, object],
    *,
    control_value: str | None = None,
    perturbation_key: str | None = None,
    dose_key: str | None = None,
    n_genes: int = 20,
    rank_by: Literal["lfc", "wilcoxon"] = "lfc",
    reference: Literal["real_control", "pred_control"] = "real_control",
    layer: str | None = None,
    pred_layer: str | None = None,
    real_counts: bool | None = None,
    pred_counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    annotate: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Predicted vs true log-fold changes on the top differentially expressed genes.

    Log-fold changes are differences of mean expression in log-normalised space (counts
    scaled to ``target_sum`` per cell, then ``log1p``):
    ``true = mean(real condition) - mean(real control)`` and, by default,
    ``pred = mean(pred condition) - mean(real control)``, the convention of the
    control-referenced metrics in :mod:`perturbx.metrics`. The dashed line is the identity;
    the title gives the Pearson correlation over the plotted genes.

    Parameters
    ----------
    pred
        Predicted cells (e.g. from :meth:`perturbx.PerturbX.predict`), genes covering ``real``'s.
    real
        Measured cells including the condition and controls.
    condition
        The condition: a value of ``perturbation_key`` (all doses and covariates pooled), or a
        mapping obs key -> value, e.g. ``{"drug": "Aspirin", "dose": 10.0,
        "cell_type": "T"}``; doses and combinations (``"A+B"``) are compared as parsed
        conditions. Covariates in the mapping also restrict the control cells.
    control_value, perturbation_key, dose_key
        Control label and obs keys; default: from ``pred.uns["perturbx_prediction"]``
        (written by ``predict``), else ``"control"`` and required ``perturbation_key``.
    n_genes
        Number of top genes to plot.
    reference
        Control of the predicted log-fold changes: ``"real_control"`` (the real control
        mean) or ``"pred_control"`` (the mean of ``pred``'s own control cells, e.g. predicted
        with the control as a target). Expected counts are smoother than measured counts, so
        log-normalised predictions sit above noisy measurements at low expression;
        ``"pred_control"`` cancels that offset and shows the predicted *change* alone.
    rank_by
        ``"lfc"``: genes with the largest absolute true log-fold change; ``"wilcoxon"``: the
        largest absolute score of scanpy's Wilcoxon test (``sc.tl.rank_genes_groups``) of the real
        condition cells vs the real controls.
    layer, pred_layer
        Expression layers of ``real`` and ``pred`` (default: ``X``).
    real_counts, pred_counts
        Whether the values are counts to log-normalise (``True``) or already log-normalised
        (``False``). ``None``: for ``real``, counts if all values are non-negative integers;
        for ``pred``, from the model's likelihood in ``pred.uns`` (expected counts for
        ``nb``/``zinb``), else the same integer check.
    target_sum
        Counts per cell after normalisation.
    annotate
        Write the names of this many top genes next to their points.
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
    from scipy.stats import pearsonr

    info = pred.uns.get("perturbx_prediction", {})
    perturbation_key = perturbation_key or info.get("perturbation_key")
    if perturbation_key is None:
        raise ValueError("perturbation_key is required (pred.uns has no perturbx_prediction).")
    if dose_key is None and info.get("perturbation_key") == perturbation_key:
        dose_key = info.get("dose_key")
    control_value = control_value or info.get("control_value", "control")
    if pred_counts is None and "likelihood" in info:
        pred_counts = info["likelihood"] in _COUNT_LIKELIHOODS
    if rank_by not in ("lfc", "wilcoxon"):
        raise ValueError(f"rank_by={rank_by!r} must be 'lfc' or 'wilcoxon'.")
    if reference not in ("real_control", "pred_control"):
        raise ValueError(f"reference={reference!r} must be 'real_control' or 'pred_control'.")
    if not 1 <= n_genes <= real.n_vars:
        raise ValueError(f"n_genes={n_genes!r} must be between 1 and the {real.n_vars} genes.")

    spec = {perturbation_key: condition} if isinstance(condition, str) else dict(condition)
    if perturbation_key not in spec:
        raise KeyError(f"condition must give {perturbation_key!r} (the perturbation key).")
    if parse_condition(str(spec[perturbation_key]), control_value=control_value) == ((), ()):
        raise ValueError(f"condition {condition!r} is the control; pick a perturbed condition.")
    keys = {
        "perturbation_key": perturbation_key,
        "dose_key": dose_key,
        "control_value": control_value,
    }
    real_cells = condition_mask(real.obs, spec, **keys, dataset="real")
    pred_cells = condition_mask(pred.obs, spec, **keys, dataset="pred")
    covariates = {k: v for k, v in spec.items() if k not in (perturbation_key, dose_key)}
    control_spec = {perturbation_key: control_value, **covariates}
    controls = condition_mask(real.obs, control_spec, **keys, dataset="real")
    label = _condition_label(spec, perturbation_key, dose_key)
    for name, mask in (("real", real_cells), ("pred", pred_cells), ("real control", controls)):
        if not mask.any():
            raise ValueError(f"no {name} cells match {label!r}.")
    if reference == "pred_control":
        pred_controls = condition_mask(pred.obs, control_spec, **keys, dataset="pred")
        if not pred_controls.any():
            raise ValueError(
                f"reference='pred_control' but pred has no control cells matching "
                f"{control_spec}; predict the control as a target too or use "
                "reference='real_control'."
            )

    pred_columns = pred.var_names.get_indexer(real.var_names)
    if (pred_columns < 0).any():
        missing = list(real.var_names[pred_columns < 0][:5])
        raise ValueError(f"genes of real missing from pred.var_names, e.g. {missing!r}.")
    control_mean = _mean_log_normalised(real, controls, layer, real_counts, target_sum)
    true_lfc = _mean_log_normalised(real, real_cells, layer, real_counts, target_sum) - control_mean
    pred_mean = _mean_log_normalised(pred, pred_cells, pred_layer, pred_counts, target_sum)
    if reference == "pred_control":
        pred_control_mean = _mean_log_normalised(
            pred, pred_controls, pred_layer, pred_counts, target_sum
        )
        pred_lfc = (pred_mean - pred_control_mean)[pred_columns]
    else:
        pred_lfc = pred_mean[pred_columns] - control_mean
    if rank_by == "lfc":
        order = np.argsort(-np.abs(true_lfc), kind="stable")
    else:
        order = _top_genes_wilcoxon(real, real_cells, controls, layer, real_counts, target_sum)
    top = order[:n_genes]
    x, y = true_lfc[top], pred_lfc[top]

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
    ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", linewidth=0.8, zorder=0)
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    pad = 0.05 * (high - low or 1.0)
    ax.plot(
        [low - pad, high + pad],
        [low - pad, high + pad],
        linestyle="--",
        color="0.4",
        linewidth=1,
        label="identity (y = x)",
    )
    ax.scatter(x, y, s=18, zorder=3, label=f"top {n_genes} genes")
    for i in range(min(annotate, n_genes)):
        ax.annotate(
            str(real.var_names[top[i]]),
            (x[i], y[i]),
            fontsize="x-small",
            xytext=(3, 3),
            textcoords="offset points",
        )
    constant = np.ptp(x) == 0 or np.ptp(y) == 0
    r = np.nan if constant else float(pearsonr(x, y).statistic)
    ax.set_title(
        f"{label}\nPearson r = {'n/a' if constant else f'{r:.2f}'} "
        f"(top {n_genes} DE genes by {rank_by})",
        fontsize="medium",
    )
    ax.set_xlabel("true log-fold change vs control")
    ax.set_ylabel(f"predicted log-fold change vs {reference.replace('_', ' ')}")
    ax.set_aspect("equal", adjustable="datalim")
    return _finish(ax, show, save)
