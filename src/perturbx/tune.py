"""Hyperparameter search for :class:`~perturbx.PerturbX` with Ray Tune.

Every trial trains a model on the ``"train"`` cells of a split column and scores its
*counterfactual* predictions of the ``"validation"`` conditions with
:meth:`perturbx.PerturbX.evaluate` (the metrics of :mod:`perturbx.metrics`), so the search
optimises what the model is for -- predicting conditions it has not been trained on -- and
not the training loss. Test cells are never touched.

Why Ray Tune directly rather than ``scvi.autotune.run_autotune``: scvi's wrapper reports only
what Lightning logs (``trainer.callback_metrics``) through a Lightning callback, and a
callback sees the training plan and the torch module, not the :class:`~perturbx.PerturbX`
object that :meth:`~perturbx.PerturbX.evaluate` needs to encode control cells, add the
held-out conditions and score them against the validation cells. Its trainable also
imports ``scib_metrics`` (and with it JAX) even when no scib metric is tuned, and it starts
Ray without a CPU limit. A Ray Tune function trainable (:class:`ray.tune.Tuner`) trains,
evaluates and reports in a few lines with public APIs only.

Install the optional dependency with ``pip install "perturbx[tune]"``.

Examples
--------
>>> import perturbx
>>> from perturbx.tune import default_search_space, run_search
>>> adata = perturbx.data.simulate_drug_screen(n_cells=5000, n_genes=500)
>>> perturbx.data.split_unseen_perturbations(
...     adata, "drug", dose_key="dose", n_held_out=4, validation_unit="perturbation",
...     validation_fraction=0.2)
>>> result = run_search(
...     adata, split_key="split", num_samples=20, max_epochs=20,
...     setup_kwargs=dict(perturbation_key="drug", dose_key="dose", smiles_key="smiles",
...                       covariate_keys=["cell_type"]))
>>> result.best_config
>>> result.results.head()
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

if TYPE_CHECKING:
    from perturbx.metrics import EvaluationResult
    from perturbx.model import PerturbX

__all__ = [
    "SearchResult",
    "default_search_space",
    "run_search",
    "search_space_keys",
    "train_and_evaluate",
]

_INSTALL_HINT = 'Hyperparameter search needs Ray Tune: pip install "perturbx[tune]"'
# Keys of a configuration that go to PerturbX.train itself (the rest are model or plan args).
_TRAIN_KEYS = ("batch_size", "max_epochs")
# Default arguments of PerturbX.evaluate in a trial: one baseline for context (the mean
# baseline), and every method scored against all cells of a condition (the positive
# control would halve them and make the metric noisier).
_DEFAULT_EVALUATE = {"baselines": ("perturbed_centroid",)}


def _import_tune():
    try:
        from ray import tune
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return tune


def default_search_space() -> dict[str, Any]:
    """The default search space (Ray Tune sampling primitives), in the spirit of CPA's.

    Returns
    -------
    dict
        Hyperparameter name -> Ray Tune domain:

        - ``n_latent``: latent size, ``choice([32, 64, 128, 256])`` (model).
        - ``dropout_rate``: encoder / decoder dropout, ``choice([0.0, 0.1, 0.2])`` (model).
        - ``dose_response``: ``choice(["amortized", "logsigm", "sigm", "linear"])`` (model);
          ``amortized`` is ``logsigm`` for perturbations without SMILES.
        - ``lr``: autoencoder learning rate, ``loguniform(1e-4, 3e-3)`` (training plan).
        - ``dose_lr``: dose-response learning rate, ``loguniform(1e-4, 3e-3)`` (plan).
        - ``adversary_lr``: adversary learning rate, ``loguniform(1e-4, 3e-3)`` (plan).
        - ``adversary_weight``: final weight ``λ`` of the adversarial term,
          ``loguniform(1.0, 300.0)`` (plan).
        - ``adversary_every``: one adversary step every this many minibatches,
          ``choice([2, 3, 5])`` (plan).

        Extend or override it with plain values or other domains, e.g.
        ``{**default_search_space(), "n_hidden": 128, "batch_size": tune.choice([128, 256])}``;
        :func:`search_space_keys` lists every key a configuration may hold.
    """
    tune = _import_tune()
    return {
        "n_latent": tune.choice([32, 64, 128, 256]),
        "dropout_rate": tune.choice([0.0, 0.1, 0.2]),
        "dose_response": tune.choice(["amortized", "logsigm", "sigm", "linear"]),
        "lr": tune.loguniform(1e-4, 3e-3),
        "dose_lr": tune.loguniform(1e-4, 3e-3),
        "adversary_lr": tune.loguniform(1e-4, 3e-3),
        "adversary_weight": tune.loguniform(1.0, 300.0),
        "adversary_every": tune.choice([2, 3, 5]),
    }


def _named_parameters(function, exclude: set[str]) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind in kinds and name not in exclude
    ]


def search_space_keys() -> dict[str, list[str]]:
    """The keys a search space may hold, by where they are passed.

    Returns
    -------
    dict
        ``"model"``: arguments of :class:`~perturbx.PerturbX` (``n_latent``, ``dropout_rate``,
        ``dose_response``, ``n_hidden``, ...); ``"plan"``: arguments of
        :class:`~perturbx.train.PerturbXTrainingPlan` and of scvi's ``TrainingPlan``
        (``lr``, ``adversary_weight``, ``adversary_every``, ...), passed as ``plan_kwargs``;
        ``"train"``: ``batch_size`` and ``max_epochs`` of :meth:`~perturbx.PerturbX.train`.
    """
    from scvi.train import TrainingPlan

    from perturbx.model import PerturbX
    from perturbx.train import PerturbXTrainingPlan

    plan = _named_parameters(PerturbXTrainingPlan.__init__, {"self", "module"})
    plan += [
        k for k in _named_parameters(TrainingPlan.__init__, {"self", "module"}) if k not in plan
    ]
    return {
        "model": _named_parameters(PerturbX.__init__, {"self", "adata", "registry"}),
        "plan": plan,
        "train": list(_TRAIN_KEYS),
    }


def _route_config(config: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Split a flat configuration into model, plan and train arguments."""
    keys = search_space_keys()
    unknown = sorted(k for k in config if not any(k in names for names in keys.values()))
    if unknown:
        raise ValueError(
            f"search_space has unknown key(s) {unknown}. Allowed: model arguments "
            f"{keys['model']}; training-plan arguments {keys['plan']}; train arguments "
            f"{keys['train']}."
        )
    model = {k: v for k, v in config.items() if k in keys["model"]}
    plan = {k: v for k, v in config.items() if k in keys["plan"]}
    train = {k: v for k, v in config.items() if k in keys["train"]}
    return model, plan, train


def _validation_mask(adata: AnnData, split_key: str, perturbation_key: str,
                     control_value: str) -> np.ndarray:
    """Boolean mask of the validation cells, checked to hold conditions and controls."""
    if split_key not in adata.obs.columns:
        raise KeyError(f"split_key={split_key!r} is not a column of adata.obs.")
    split = adata.obs[split_key].astype(str).to_numpy()
    is_validation = split == "validation"
    if not (split == "train").any():
        raise ValueError(f"obs[{split_key!r}] has no 'train' cells to train on.")
    if not is_validation.any():
        raise ValueError(
            f"obs[{split_key!r}] has no 'validation' cells: the search scores held-out "
            "validation conditions (see perturbx.data.splits, validation_fraction)."
        )
    if perturbation_key not in adata.obs.columns:
        raise KeyError(f"perturbation_key={perturbation_key!r} is not a column of adata.obs.")
    is_control = adata.obs[perturbation_key].astype(str).to_numpy() == control_value
    if not (is_validation & ~is_control).any():
        raise ValueError(
            f"The 'validation' cells of obs[{split_key!r}] are all controls "
            f"({perturbation_key!r} == {control_value!r}); there is no condition to score."
        )
    if not (is_validation & is_control).any():
        raise ValueError(
            f"The 'validation' cells of obs[{split_key!r}] hold no control cells "
            f"({perturbation_key!r} == {control_value!r}); they are needed as the source of "
            "the predictions and for the DE genes (see control_fractions in perturbx.data.splits)."
        )
    return is_validation


def train_and_evaluate(
    adata: AnnData,
    config: Mapping[str, Any],
    *,
    setup_kwargs: Mapping[str, Any],
    split_key: str = "split",
    max_epochs: int = 20,
    seed: int = 0,
    evaluate_kwargs: Mapping[str, Any] | None = None,
) -> tuple[PerturbX, EvaluationResult]:
    """Train one model with a configuration and evaluate it on the validation conditions.

    This is what every trial of :func:`run_search` does; call it with
    ``result.best_config`` to get the best model back (then evaluate it on the test cells).

    Parameters
    ----------
    adata
        Cells × genes with the split column; not modified (a copy is set up).
    config
        One configuration: keys of :func:`search_space_keys` with plain values.
    setup_kwargs
        Arguments of :meth:`perturbx.PerturbX.setup_anndata` (``perturbation_key``, ...).
    split_key
        obs column with ``"train"`` / ``"validation"`` / ``"test"``: the model trains on
        ``"train"`` (``"validation"`` cells give Lightning's validation loss) and is scored on
        the ``"validation"`` conditions, predicted from the validation control cells.
    max_epochs
        Training epochs unless ``config`` has ``max_epochs``.
    seed
        Seed of training (``scvi.settings.seed``) and of the evaluation's subsampling.
    evaluate_kwargs
        Arguments of :meth:`perturbx.PerturbX.evaluate`; default
        ``baselines=("perturbed_centroid",)``.

    Returns
    -------
    model
        The trained :class:`~perturbx.PerturbX` (on a set-up copy of ``adata``).
    evaluation
        :class:`perturbx.metrics.EvaluationResult` of the validation conditions.
    """
    import scvi

    from perturbx.model import PerturbX

    model_kwargs, plan_kwargs, train_kwargs = _route_config(config)
    setup_kwargs = dict(setup_kwargs)
    is_validation = _validation_mask(
        adata, split_key, setup_kwargs.get("perturbation_key", ""),
        setup_kwargs.get("control_value", "control"),
    )
    adata = adata.copy()
    PerturbX.setup_anndata(adata, **setup_kwargs)
    # Seed before the model is built: train(seed=) alone leaves the initial weights random.
    scvi.settings.seed = seed
    model = PerturbX(adata, **model_kwargs)
    model.train(
        max_epochs=int(train_kwargs.get("max_epochs", max_epochs)),
        batch_size=int(train_kwargs.get("batch_size", 128)),
        split_key=split_key,
        plan_kwargs=plan_kwargs,
        seed=seed,
        enable_progress_bar=False,
    )
    evaluate_kwargs = {**_DEFAULT_EVALUATE, "seed": seed, **dict(evaluate_kwargs or {})}
    evaluation = model.evaluate(adata[is_validation].copy(), **evaluate_kwargs)
    return model, evaluation


def _check_setup(adata: AnnData, setup_kwargs: dict[str, Any]) -> None:
    """Run ``setup_anndata`` once here so that bad arguments fail before any trial starts.

    It runs on a stand-in with the same obs and genes and an all-zero sparse matrix (the
    setup reads obs only), so that the user's AnnData is untouched and not copied.
    """
    from perturbx.model import PerturbX

    layer = setup_kwargs.get("layer")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"setup_kwargs layer={layer!r} is not a layer of adata.")
    zeros = sparse.csr_matrix(adata.shape, dtype=np.float32)
    stand_in = AnnData(zeros, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names),
                       layers={layer: zeros} if layer is not None else None)
    PerturbX.setup_anndata(stand_in, **setup_kwargs)


def _trial_report(evaluation: EvaluationResult, metric: str, method: str) -> dict[str, Any]:
    """Medians over the validation conditions: every metric of ``method``, and ``metric``
    of each baseline (``<metric>_<baseline>``)."""
    summary = evaluation.summary
    ours = summary[summary["method"] == method].set_index("metric")["median"]
    report = {name: float(value) for name, value in ours.items()}
    for baseline in evaluation.methods:
        if baseline != method:
            row = summary[(summary["method"] == baseline) & (summary["metric"] == metric)]
            report[f"{metric}_{baseline}"] = float(row["median"].iloc[0])
    evaluated = evaluation.per_condition[evaluation.per_condition["method"] == method]
    report["n_conditions"] = int(len(evaluated))
    # Joined strings: Ray keeps them as one column of the results table.
    report["conditions"] = ";".join(sorted(evaluated["condition"].astype(str)))
    report["perturbations"] = ";".join(sorted(set(evaluated["perturbation"].astype(str))))
    return report


def _run_trial(config: dict, *, adata: AnnData, options: dict) -> None:
    """Ray Tune function trainable: train, evaluate on validation, report once."""
    import torch
    from ray import tune

    # One thread per CPU the trial was given: trials sharing cores must not oversubscribe.
    torch.set_num_threads(max(1, int(options["cpus_per_trial"])))
    start = time.perf_counter()
    _, evaluation = train_and_evaluate(
        adata,
        config,
        setup_kwargs=options["setup_kwargs"],
        split_key=options["split_key"],
        max_epochs=options["max_epochs"],
        seed=options["seed"],
        evaluate_kwargs=options["evaluate_kwargs"],
    )
    method = options["evaluate_kwargs"].get("method_name", "PerturbX")
    report = _trial_report(evaluation, options["metric"], method)
    report["trial_seconds"] = time.perf_counter() - start
    tune.report(report)


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
        row.update({k: v for k, v in reported.items()
                    if k not in _RAY_COLUMNS and k not in ("trial_id", "config")})
        # Ray wraps a trial's exception (RayTaskError); show the user's own exception.
        error = None if result.error is None else getattr(result.error, "cause", result.error)
        row["error"] = None if error is None else repr(error)
        rows.append(row)
        configs.append(dict(result.config or {}))
    table = pd.DataFrame(rows)
    value = pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=float)
    order = np.argsort(np.where(np.isfinite(value), value if mode == "min" else -value, np.inf),
                       kind="stable")
    return table.iloc[order].reset_index(drop=True), [configs[i] for i in order]


# Ray's own bookkeeping in every report, left out of the results table.
_RAY_COLUMNS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "date",
                "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
                "time_since_restore", "iterations_since_restore", "experiment_tag"}


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
    _validation_mask(adata, split_key, setup_kwargs.get("perturbation_key", ""),
                     setup_kwargs.get("control_value", "control"))
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
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose > 0,
                 configure_logging=verbose > 0)
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
    best_metrics = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in best.items()
                    if not k.startswith("config/") and k not in ("trial_id", "error")}
    return SearchResult(best_config=configs[0], best_metrics=best_metrics, results=table,
                        metric=metric, mode=mode, result_grid=result_grid)
