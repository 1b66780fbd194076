"""The search space of :mod:`perturbx.tune` and one trial: train a configuration, score it.

:func:`train_and_evaluate` trains :class:`~perturbx.PerturbX` on the ``"train"`` cells with one
configuration and evaluates its counterfactual predictions of the ``"validation"`` conditions;
:func:`_run_trial` wraps it as the Ray Tune function trainable that
:func:`perturbx.tune.run_search` runs.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

if TYPE_CHECKING:
    from perturbx.metrics import EvaluationResult
    from perturbx.model import PerturbX


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
        - ``dispersion_lr``: learning rate of the NB / ZINB inverse dispersion,
          ``loguniform(1e-3, 3e-2)`` (plan; no effect with the ``gaussian`` likelihood).
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
        "dispersion_lr": tune.loguniform(1e-3, 3e-2),
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


def _validation_mask(
    adata: AnnData, split_key: str, perturbation_key: str, control_value: str
) -> np.ndarray:
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
        adata,
        split_key,
        setup_kwargs.get("perturbation_key", ""),
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
    stand_in = AnnData(
        zeros,
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=adata.var_names),
        layers={layer: zeros} if layer is not None else None,
    )
    PerturbX.setup_anndata(stand_in, **setup_kwargs)


def _trial_report(evaluation: EvaluationResult, metric: str, method: str) -> dict[str, Any]:
    """Medians over the validation conditions: every metric of ``method``, and ``metric``
    of each baseline (``<metric>_<baseline>``).
    """
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
