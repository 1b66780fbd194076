"""Evaluation of a trained ``PerturbX`` on held-out conditions, side by side with baselines.

:class:`EvaluationMixin` predicts every condition of an evaluation AnnData
(:meth:`~perturbx._prediction.PredictionMixin.predict_conditions`) and scores it with
:func:`perturbx.metrics.score`, whose perturbed centroid is the mean of the model's
*training* conditions.
"""

from __future__ import annotations

from collections.abc import Sequence

from anndata import AnnData

from perturbx.data._backed import is_on_disk
from perturbx.module import COUNT_LIKELIHOODS


class EvaluationMixin:
    """:meth:`evaluate` for ``PerturbX`` (and the scoring shared with ``PerturbXEnsemble``).

    Relies on :class:`~perturbx._prediction.PredictionMixin` (``predict_conditions``,
    ``_training_indices``) and the model's registry and ``module``.
    """

    def evaluate(
        self,
        adata_eval: AnnData,
        *,
        n_cells_per_target: int | None = 500,
        baselines: Sequence[str] = ("control_mean", "perturbed_centroid", "interpolated_duplicate"),
        top_k: Sequence[int] = (20, 50),
        method_name: str = "PerturbX",
        seed: int = 0,
        batch_size: int = 1024,
    ):
        """Predict every condition of ``adata_eval`` counterfactually and score it with baselines.

        The predictions of :meth:`predict_conditions` are scored with
        :func:`perturbx.metrics.score` against the real cells of ``adata_eval``, side by side
        with the baselines. The perturbed centroid is the mean of the *training* conditions
        of the model's AnnData.

        Parameters
        ----------
        adata_eval
            Held-out cells: the conditions to evaluate (and, ideally, held-out controls).
            Perturbations need not be known to the model if they have SMILES in the
            registered SMILES column.
        n_cells_per_target
            Predicted cells per condition (see :meth:`predict_conditions`). With a counts
            likelihood they are draws, so a condition's predicted mean carries Monte-Carlo
            error ∝ ``1 / sqrt(n_cells_per_target)``; for conditions with small effects (low
            doses) use a few thousand (``benchmarks/bench_quality.py`` uses 3,000). All
            predicted cells are held in memory.
        baselines, top_k
            See :func:`perturbx.metrics.score`.
        method_name
            Name of the model's rows in the result.
        seed
            Seed of the subsampling, of the sampling and of the positive control's half split.
        batch_size
            Cells per forward pass.

        Returns
        -------
        :class:`perturbx.metrics.EvaluationResult` (``per_condition`` tidy table,
        ``summary`` median/mean per method, ``calibration``, ``normalised``).
        """
        self._check_can_score()
        pred = self.predict_conditions(
            adata_eval, n_cells_per_target=n_cells_per_target, seed=seed, batch_size=batch_size
        )
        return self._score_predictions(
            pred, adata_eval, baselines=baselines, top_k=top_k, method_name=method_name, seed=seed
        )

    def _check_can_score(self) -> None:
        layer = self.registry["setup_args"]["layer"]
        if self.adata is not None and is_on_disk(self.adata, layer):
            raise ValueError(
                "evaluate needs the expression of the model's training cells in memory (their "
                "condition means form the perturbed centroid), but the model's AnnData is read "
                "from disk (backed). Use predict_conditions(adata_eval) and "
                "perturbx.metrics.score(..., centroid_reference=model.adata[cells].to_memory()) "
                "with a subsample of training cells, or load the model with an in-memory AnnData."
            )

    def _score_predictions(
        self,
        pred: AnnData,
        adata_eval: AnnData,
        *,
        baselines: Sequence[str],
        top_k: Sequence[int],
        method_name: str,
        seed: int,
    ):
        """Score predictions of ``adata_eval``'s conditions as :meth:`evaluate` does."""
        from perturbx.metrics import score

        pred.obs["method"] = method_name
        state = self._perturbation_state
        layer = self.registry["setup_args"]["layer"]
        return score(
            pred,
            adata_eval,
            perturbation_key=state["perturbation_key"],
            control_value=state["control_value"],
            dose_key=state["dose_key"],
            covariate_keys=list(self._covariate_categories),
            method_key="method",
            layer=layer,
            counts=self.module.likelihood in COUNT_LIKELIHOODS,
            top_k=top_k,
            baselines=baselines,
            seed=seed,
            centroid_reference=self.adata[self._training_indices()],
        )
