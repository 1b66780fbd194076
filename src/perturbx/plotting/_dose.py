"""Predicted vs measured dose-response curves: :func:`dose_response`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.conditions import parse_condition_columns
from perturbx.metrics import DEFAULT_TARGET_SUM, log_normalise
from perturbx.metrics._pseudobulk import get_expression, group_means
from perturbx.plotting._utils import _finish, model_keys, panel_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SCORES = ("signed_lfc", "mean_lfc", "mean_abs_lfc", "mean_expression")
_YLABELS = {
    "signed_lfc": "signed mean log-fold change",
    "mean_lfc": "mean log-fold change",
    "mean_abs_lfc": "mean |log-fold change|",
    "mean_expression": "mean log-normalised expression",
}
# The default dose grid reaches this factor beyond the lowest and highest measured dose.
_GRID_MARGIN = 2.0


def _gene_positions(adata: AnnData, genes: Sequence[str]) -> np.ndarray:
    positions = adata.var_names.get_indexer(list(genes))
    if (positions < 0).any():
        missing = [g for g, p in zip(genes, positions, strict=True) if p < 0]
        raise KeyError(f"genes {missing[:10]} are not in adata.var_names.")
    if len(positions) == 0:
        raise ValueError("genes is empty.")
    return positions


def _scores(
    means: np.ndarray, reference: np.ndarray, genes: np.ndarray, sign: np.ndarray, score: str
) -> np.ndarray:
    """Score of each row of ``means`` ``(k, n_genes)`` against ``reference`` ``(n_genes,)``."""
    if score == "mean_expression":
        return means[:, genes].mean(axis=1)
    lfc = means[:, genes] - reference[genes]
    if score == "signed_lfc":
        return (lfc * sign).mean(axis=1)
    if score == "mean_abs_lfc":
        return np.abs(lfc).mean(axis=1)
    return lfc.mean(axis=1)


def _covariate_mask(adata: AnnData, covariates: Mapping[str, object], registered: list[str]):
    mask = np.ones(adata.n_obs, dtype=bool)
    for key, value in covariates.items():
        if key not in registered:
            raise KeyError(f"covariates: {key!r} is not a registered covariate ({registered}).")
        values = adata.obs[key].astype(str).to_numpy()
        if str(value) not in set(values):
            raise ValueError(f"covariates: {key}={value!r} has no cells in adata.")
        mask &= values == str(value)
    return mask


def dose_response(
    model,
    adata: AnnData | None = None,
    perturbations: str | Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    *,
    covariates: Mapping[str, object] | None = None,
    doses: Sequence[float] | None = None,
    score: Literal["signed_lfc", "mean_lfc", "mean_abs_lfc", "mean_expression"] = "signed_lfc",
    n_top_genes: int = 20,
    n_doses: int = 25,
    n_source_cells: int | None = 500,
    layer: str | None = None,
    layer_is_counts: bool | None = None,
    target_sum: float = DEFAULT_TARGET_SUM,
    seed: int = 0,
    ncols: int = 4,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Predicted (line) vs measured (points) dose-response curves, one panel per drug.

    Expression is compared in log-normalised space (counts scaled to ``target_sum`` per cell,
    then ``log1p``; data of a ``gaussian`` model are used as they are). Measured points are
    the cells of ``adata`` at each dose of the drug alone, with error bars of ±1 standard
    error over cells for the linear scores; their log-fold changes are taken against the
    measured controls. The predicted curve comes from :meth:`perturbx.PerturbX.predict` on
    the same control cells of ``adata`` at every dose of a log-spaced grid, its log-fold
    changes against the model's prediction for the controls themselves: both sides share
    the source cells, so the model's reconstruction error of the controls cancels out.

    Parameters
    ----------
    model
        A trained :class:`perturbx.PerturbX` registered with a ``dose_key``.
    adata
        Cells with the measured doses and the control cells to predict from (default: the
        model's AnnData).
    perturbations
        Drug name(s) (default: every single drug with cells in ``adata``).
    genes
        Genes whose score is plotted, the same for every drug. Default: per drug the
        ``n_top_genes`` genes with the largest absolute measured log-fold change at its highest
        dose.
    covariates
        Restrict measured and source cells to these covariate values, e.g.
        ``{"cell_type": "T"}`` (default: all cells pooled).
    doses
        Dose grid of the predicted curves (positive, in the units of the dose column).
        Default: ``n_doses`` log-spaced doses from half the lowest to twice the highest
        measured dose of each drug.
    score
        Per-condition summary over ``genes`` of the mean log-normalised expression:
        ``"signed_lfc"``: mean of ``sign_g · lfc_g`` with ``sign_g`` the sign of the measured
        lfc at the drug's highest dose (up- and down-regulated genes both count as response;
        the measurement at the highest dose chose the signs, so it is biased upwards by noise);
        ``"mean_lfc"``: mean lfc; ``"mean_abs_lfc"``: mean absolute lfc; ``"mean_expression"``: mean
        log-normalised expression (predictions are expected values, so for counts models they
        sit above noisy measurements at low expression).
    n_top_genes
        Genes per drug when ``genes`` is not given.
    n_doses
        Doses of the default grid.
    n_source_cells
        Control cells to predict from (a seeded random subset; ``None``: all).
    layer
        Layer of ``adata`` with the measured expression (default: the layer the model was
        registered with).
    layer_is_counts
        Whether ``layer`` holds counts, normalised and ``log1p``-transformed here, or
        log-normalised values, used as they are. Default: counts for ``nb``/``zinb`` models,
        log-normalised for ``gaussian`` ones (the model's own scale).
    target_sum
        Counts per cell after normalisation.
    seed
        Seed of the source-cell subset.
    ncols
        Panels per row of a new figure.
    ax
        One axes per drug (default: a new figure).
    show
        Call ``plt.show()``; ``None``: only in interactive sessions without ``save``.
    save
        File path to save the figure to (format from the extension).

    Returns
    -------
    The list of axes, one per drug.
    """
    keys = model_keys(model)
    pkey, dkey, control = keys["perturbation_key"], keys["dose_key"], keys["control_value"]
    if dkey is None:
        raise ValueError("the model was registered without dose_key; there are no doses to plot.")
    if score not in SCORES:
        raise ValueError(f"score={score!r} must be one of {SCORES}.")
    data = model.adata if adata is None else adata
    if data is None:
        raise ValueError("adata is required: the model holds no AnnData.")
    layer = keys["layer"] if layer is None else layer
    counts = getattr(model.module, "likelihood", "nb") != "gaussian"
    layer_is_counts = counts if layer_is_counts is None else bool(layer_is_counts)
    for name, value, minimum in (("n_top_genes", n_top_genes, 1), ("n_doses", n_doses, 2)):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    covariates = dict(covariates or {})
    in_covariates = _covariate_mask(data, covariates, keys["covariate_keys"])

    # One condition per cell: drug alone at one dose, control, or something else (skipped).
    conditions, codes = parse_condition_columns(data.obs, pkey, dkey, control)
    single = [len(names) == 1 for names, _ in conditions]
    cell_drug = np.array(
        [names[0] if s else None for (names, _), s in zip(conditions, single, strict=True)],
        dtype=object,
    )[codes]
    cell_dose = np.array(
        [doses[0] if s else np.nan for (_, doses), s in zip(conditions, single, strict=True)]
    )[codes]
    is_control = np.array([len(names) == 0 for names, _ in conditions])[codes] & in_covariates
    measured = in_covariates & pd.notna(cell_drug) & (cell_dose > 0)
    available = sorted(set(cell_drug[measured]))
    if perturbations is None:
        perturbations = available
    perturbations = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    for drug in perturbations:
        if drug not in available:
            raise ValueError(
                f"perturbation {drug!r} has no cells alone at a positive dose in adata"
                f"{' with ' + str(covariates) if covariates else ''}; available: {available}."
            )
    if not perturbations:
        raise ValueError("no perturbation to plot.")
    if not is_control.any():
        raise ValueError(f"adata has no control cells ({pkey}={control!r}) to compare with.")

    # Measured: per (drug, dose) means of log-normalised expression and per-cell scores.
    rows = np.flatnonzero(measured | is_control)
    expression, _ = log_normalise(
        get_expression(data, layer)[rows], counts=layer_is_counts, target_sum=target_sum
    )
    control_rows = is_control[rows]
    control_mean = group_means(expression, np.where(control_rows, 0, -1), 1)[0][0]
    gene_sets = {}
    curves = {}
    for drug in perturbations:
        cells = measured[rows] & (cell_drug[rows] == drug)
        drug_doses, dose_codes = np.unique(cell_dose[rows][cells], return_inverse=True)
        group = np.full(len(rows), -1)
        group[cells] = dose_codes
        means, _ = group_means(expression, group, len(drug_doses))
        top_lfc = means[-1] - control_mean
        positions = (
            np.argsort(-np.abs(top_lfc), kind="stable")[:n_top_genes]
            if genes is None
            else _gene_positions(data, genes)
        )
        sign = np.sign(top_lfc[positions])
        gene_sets[drug] = (positions, sign)
        values = _scores(means, control_mean, positions, sign, score)
        errors = None
        if score != "mean_abs_lfc":  # linear in the cells: a standard error is meaningful
            per_cell = _scores(
                _dense(expression[np.flatnonzero(cells)]), control_mean, positions, sign, score
            )
            errors = [
                per_cell[dose_codes == k].std(ddof=1) / np.sqrt((dose_codes == k).sum())
                if (dose_codes == k).sum() > 1
                else 0.0
                for k in range(len(drug_doses))
            ]
        curves[drug] = {"doses": drug_doses, "values": values, "errors": errors}

    # Predicted: every drug at every grid dose (and the control) from the same source cells.
    sources = np.flatnonzero(is_control)
    if n_source_cells is not None and len(sources) > n_source_cells:
        sources = np.sort(
            np.random.default_rng(seed).choice(sources, n_source_cells, replace=False)
        )
    predict = {
        "model": model,
        "adata": adata,
        "sources": sources,
        "counts": counts,
        "target_sum": target_sum,
    }
    predicted_control = _predicted_means(
        targets=[{pkey: control, dkey: 0.0, **covariates}], **predict
    )[0]
    lines = {}
    for drug in perturbations:
        measured_doses = curves[drug]["doses"]
        grid = (
            np.geomspace(
                measured_doses.min() / _GRID_MARGIN, measured_doses.max() * _GRID_MARGIN, n_doses
            )
            if doses is None
            else np.asarray(doses, dtype=float)
        )
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid) & (grid > 0)):
            raise ValueError(f"doses must be positive finite numbers, got {doses!r}.")
        # One drug per call bounds memory to len(grid) x n_source_cells x n_genes values.
        means = _predicted_means(
            targets=[{pkey: drug, dkey: float(d), **covariates} for d in grid], **predict
        )
        positions, sign = gene_sets[drug]
        lines[drug] = (grid, _scores(means, predicted_control, positions, sign, score))

    axes = panel_axes(len(perturbations), ax, ncols=ncols)
    for panel_ax, drug in zip(axes, perturbations, strict=True):
        positions, _ = gene_sets[drug]
        grid, line = lines[drug]
        curve = curves[drug]
        panel_ax.plot(grid, line, color="C0", label="predicted")
        if curve["errors"] is not None:
            panel_ax.errorbar(
                curve["doses"],
                curve["values"],
                yerr=curve["errors"],
                fmt="none",
                ecolor="C1",
                elinewidth=1,
                capsize=2,
            )
        panel_ax.scatter(
            curve["doses"], curve["values"], color="C1", zorder=3, s=25, label="measured"
        )
        if score != "mean_expression":
            panel_ax.axhline(0.0, color="0.6", linestyle=":", linewidth=1, label="control")
        panel_ax.set_xscale("log")
        panel_ax.set_xlabel(f"{dkey} (log scale)")
        genes_text = (
            f"top {len(positions)} genes"
            if genes is None
            else f"{len(positions)} gene{'s' if len(positions) > 1 else ''}"
        )
        panel_ax.set_ylabel(f"{_YLABELS[score]} ({genes_text})")
        suffix = ", ".join(f"{k}={v}" for k, v in covariates.items())
        panel_ax.set_title(drug + (f" | {suffix}" if suffix else ""))
    axes[0].legend(fontsize="small", frameon=False)
    return _finish(axes, show, save)


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def _predicted_means(
    model, adata, targets: list[dict], sources: np.ndarray, counts: bool, target_sum: float
) -> np.ndarray:
    """``(len(targets), n_genes)`` mean log-normalised prediction of each target."""
    prediction = model.predict(adata, target=pd.DataFrame(targets), source=sources)
    # predict returns the source cells in blocks, one block per target, in target order.
    target_of_row = np.repeat(np.arange(len(targets)), len(sources))
    if prediction.n_obs != len(target_of_row):
        raise RuntimeError(
            "unexpected prediction layout: expected one block of source cells per target."
        )
    values, _ = log_normalise(_dense(prediction.X), counts=counts, target_sum=target_sum)
    return group_means(values, target_of_row, len(targets))[0]
