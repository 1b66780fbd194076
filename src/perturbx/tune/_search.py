"""Ray Tune orchestration of :mod:`perturbx.tune`: run the trials, collect and rank them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.tune._trial import (
    _DEFAULT_EVALUATE,
    _check_setup,
    _import_tune,
    _route_config,
    _run_trial,
    _validation_mask,
    default_search_space,
)


@dataclass
class SearchResult:
    """Outcome of :func:`run_search`.

    Attributes
    ----------
    best_config
        The configuration whose trial reported the best finite ``metric``.
    best_metrics
        That trial's reported values (medians over validation conditions).
    results
        One row per trial, best first: ``trial_id``, ``config/<key>`` for every key of the
        search space, the PerturbX median of every metric, ``<metric>_<baseline>`` for the
        baselines, ``n_conditions``, ``conditions`` / ``perturbations`` (``;``-joined labels
        of the scored validation conditions), ``trial_seconds`` and ``error`` (the exception
        of a failed trial, else ``None``).
    metric, mode
        What was optimised.
    result_grid
        Ray Tune's :class:`ray.tune.ResultGrid` (logs, per-trial paths).
    """

    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    results: pd.DataFrame
    metric: str
    mode: str
    result_grid: Any = field(repr=False, default=None)


def _check_metric(metric: str, mode: str | None, top_k) -> str:
    from perturbx.metrics import metric_info

    info = metric_info(top_k)
    if metric not in info.index:
        raise ValueError(f"metric={metric!r} is not one of {list(info.index)}.")
    if mode is None:
        return "max" if bool(info.loc[metric, "higher_is_better"]) else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r} must be 'min' or 'max'.")
    return mode


def _results_table(result_grid, metric: str, mode: str) -> tuple[pd.DataFrame, list[dict]]:
    """One row per trial, best first, and the trials' configurations in the same order."""
    rows, configs = [], []
    for result in result_grid:
        reported = dict(result.metrics or {}) if result.error is None else {}
        row = {"trial_id": (result.metrics or {}).get("trial_id")}
        row.update({f"config/{k}": v for k, v in (result.config or {}).items()})
        row[metric] = reported.get(metric, math.nan)
        row.update(
            {
                k: v
                for k, v in reported.items()
                if k not in _RAY_COLUMNS and k not in ("trial_id", "config")
            }
        )
        # Ray wraps a trial's exception (RayTaskError); show the user's own exception.
        error = None if result.error is None else getattr(result.error, "cause", result.error)
        row["error"] = None if error is None else repr(error)
        rows.append(row)
        configs.append(dict(result.config or {}))
    table = pd.DataFrame(rows)
    value = pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=float)
    order = np.argsort(
        np.where(np.isfinite(value), value if mode == "min" else -value, np.inf), kind="stable"
    )
    return table.iloc[order].reset_index(drop=True), [configs[i] for i in order]


# Ray's own bookkeeping in every report, left out of the results table.
_RAY_COLUMNS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "experiment_tag",
}


def run_search(
    adata: AnnData,
    *,
    setup_kwargs: Mapping[str, Any],
    split_key: str = "split",
    search_space: Mapping[str, Any] | None = None,
    num_samples: int = 20,
    max_epochs: int = 20,
    metric: str = "weighted_mse",
    mode: str | None = None,
    resources_per_trial: Mapping[str, float] | None = None,
    num_cpus: int | None = None,
    seed: int = 0,
    evaluate_kwargs: Mapping[str, Any] | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    verbose: int = 0,
) -> SearchResult:
    """Search PerturbX hyperparameters, scoring each trial on held-out validation conditions.

    Each trial (a Ray Tune function trainable) sets up a copy of ``adata`` with
    ``setup_kwargs``, trains on the ``"train"`` cells of ``split_key`` with a configuration
    sampled from ``search_space``, predicts every ``"validation"`` condition from the
    validation control cells (:meth:`perturbx.PerturbX.evaluate`) and reports the median
    over those conditions of every metric of :func:`perturbx.metrics.metric_info`. The best
    trial is the one with the best finite median ``metric``. Use a split whose validation
    set mirrors the test, e.g. :func:`perturbx.data.split_unseen_perturbations` with
    ``validation_unit="perturbation"`` to tune for unseen drugs.

    Parameters
    ----------
    adata
        Cells × genes (counts or log-normalised, as for the model); not modified. It goes
        to the trials through Ray's object store (:func:`ray.tune.with_parameters`).
    setup_kwargs
        Arguments of :meth:`perturbx.PerturbX.setup_anndata`, checked here once before any
        trial starts.
    split_key
        obs column with ``"train"`` / ``"validation"`` / ``"test"`` per cell. Validation must
        hold perturbed conditions and control cells; test cells are never used.
    search_space
        Flat dict of hyperparameter -> Ray Tune domain or plain value (keys:
        :func:`search_space_keys`). Default :func:`default_search_space`.
    num_samples
        Number of configurations (trials) drawn.
    max_epochs
        Training epochs per trial (unless the space has ``max_epochs``).
    metric
        Metric of :func:`perturbx.metrics.metric_info` to optimise (median over
        validation conditions of the PerturbX rows).
    mode
        ``"min"`` or ``"max"``; default from the metric (``higher_is_better``).
    resources_per_trial
        Ray resources of one trial, default ``{"cpu": 1}``; torch in a trial uses that many
        threads.
    num_cpus
        CPUs of the local Ray instance started when Ray is not running yet (default: all);
        with ``resources_per_trial["cpu"]`` it sets how many trials run at once. Ignored
        when Ray is already initialised (that instance is used and left running).
    seed
        Seed of the configuration sampler, of every trial's training (the same for all, so
        trials differ by their configuration only) and of the evaluation's subsampling.
    evaluate_kwargs
        Arguments of :meth:`perturbx.PerturbX.evaluate` in each trial (``top_k``,
        ``n_cells_per_target``, ...); default ``baselines=("perturbed_centroid",)``.
    storage_path, name
        Where Ray Tune writes the experiment (default ``~/ray_results``) and its folder name.
    verbose
        Ray Tune verbosity (0 silent); above 0 the trials' output also reaches this process.

    Returns
    -------
    SearchResult
        ``best_config``, ``best_metrics``, ``results`` (one row per trial, best first).

    Raises
    ------
    ImportError
        Ray Tune is not installed (``pip install "perturbx[tune]"``).
    KeyError, ValueError
        Unknown search-space keys, a metric or mode that does not exist, a missing split
        column, no training or validation cells, validation without conditions or
        controls, or invalid ``setup_kwargs``.
    RuntimeError
        Every trial failed (the first error is shown).

    Notes
    -----
    When this function starts Ray, it disables Ray's usage statistics unless the
    ``RAY_USAGE_STATS_ENABLED`` environment variable is set, and shuts Ray down at the end.
    With ``verbose=0`` it sets ``RAY_AIR_NEW_OUTPUT=0`` (unless set), which silences Ray
    Tune's console tables. ``adata`` reaches the trials through Ray's object store once
    (:func:`ray.tune.with_parameters`); each trial sets up its own copy.
    """
    tune = _import_tune()
    import ray
    from ray.tune.search import BasicVariantGenerator

    if int(num_samples) < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    space = dict(default_search_space() if search_space is None else search_space)
    _route_config(space)  # unknown keys fail here, before Ray starts
    evaluate_kwargs = {**_DEFAULT_EVALUATE, **dict(evaluate_kwargs or {})}
    mode = _check_metric(metric, mode, evaluate_kwargs.get("top_k", (20, 50)))
    setup_kwargs = dict(setup_kwargs)
    _validation_mask(
        adata,
        split_key,
        setup_kwargs.get("perturbation_key", ""),
        setup_kwargs.get("control_value", "control"),
    )
    _check_setup(adata, setup_kwargs)
    if adata.is_view:
        adata = adata.copy()  # Ray pickles it; a view would drag its parent along
    resources = dict(resources_per_trial or {"cpu": 1})

    if verbose == 0:
        # Ray Tune's newer console output prints a table even at verbose=0 (as scvi does).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=verbose > 0,
            configure_logging=verbose > 0,
        )
    try:
        options = {
            "setup_kwargs": setup_kwargs,
            "split_key": split_key,
            "max_epochs": int(max_epochs),
            "seed": int(seed),
            "evaluate_kwargs": evaluate_kwargs,
            "metric": metric,
            "cpus_per_trial": resources.get("cpu", 1),
        }
        trainable = tune.with_resources(
            tune.with_parameters(_run_trial, adata=adata, options=options), resources
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=int(num_samples),
                search_alg=BasicVariantGenerator(random_state=int(seed)),
                reuse_actors=True,  # later trials skip re-importing torch and scvi-tools
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=None if storage_path is None else os.path.abspath(storage_path),
                verbose=verbose,
            ),
        )
        result_grid = tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()

    table, configs = _results_table(result_grid, metric, mode)
    if not np.isfinite(pd.to_numeric(table[metric], errors="coerce").iloc[0]):
        errors = [e for e in table["error"] if e is not None]
        detail = errors[0] if errors else f"no trial reported a finite {metric!r}"
        raise RuntimeError(f"No trial of the search succeeded: {detail}")
    best = table.iloc[0]
    best_metrics = {
        k: (v.item() if isinstance(v, np.generic) else v)
        for k, v in best.items()
        if not k.startswith("config/") and k not in ("trial_id", "error")
    }
    return SearchResult(
        best_config=configs[0],
        best_metrics=best_metrics,
        results=table,
        metric=metric,
        mode=mode,
        result_grid=result_grid,
    )
