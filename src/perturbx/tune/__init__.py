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

The package is split in two: :mod:`perturbx.tune._trial` holds the search space and what one
trial does (:func:`train_and_evaluate`); :mod:`perturbx.tune._search` runs the trials with
Ray Tune (:func:`run_search`).

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

from perturbx.tune._search import SearchResult, run_search
from perturbx.tune._trial import default_search_space, search_space_keys, train_and_evaluate

__all__ = [
    "SearchResult",
    "default_search_space",
    "run_search",
    "search_space_keys",
    "train_and_evaluate",
]
