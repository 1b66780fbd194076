"""Evaluation of a trained ``PerturbX`` on held-out conditions, side by side with baselines.

:class:`EvaluationMixin` predicts every condition of an evaluation AnnData as
:meth:`~perturbx.model._prediction.PredictionMixin.predict_conditions` does, reduced batch by batch
to per-condition means (:func:`predicted_condition_means`), and scores them with
:func:`perturbx.metrics.score`, whose perturbed centroid is the mean of the model's
*training* conditions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from perturbx.conditions import format_condition, parse_condition_columns
from perturbx.data._validation import check_obs, keeps_adata_on_error
from perturbx.model._prediction import sampling_member
from perturbx.module import COUNT_LIKELIHOODS, split_perturbations


def predicted_condition_means(
    models: Sequence,
    adata_eval: AnnData,
    *,
    n_cells_per_target: int | None = 500,
    seed: int = 0,
    batch_size: int = 1024,
    target_sum: float = 1e4,
) -> AnnData:
    """Per-condition means of log-normalised predictions, without holding the predicted cells.

    The same cells as :meth:`~perturbx.PerturbX.predict_conditions` (of one model, or of an
    ensemble's members combined as :meth:`~perturbx.PerturbXEnsemble.predict_conditions`
    does) are decoded batch by batch, log-normalised (counts: scaled to ``target_sum`` per
    cell, then ``log1p``; Gaussian predictions are already log-normalised) and summed per
    condition, so memory grows with conditions × genes, not with predicted cells.

    Parameters
    ----------
    models
        One ``PerturbX``, or the members of an ensemble (sharing their registration).
    adata_eval, n_cells_per_target, seed, batch_size
        As in :meth:`~perturbx.PerturbX.predict_conditions`.
    target_sum
        Counts per cell after normalisation (that of :func:`perturbx.metrics.score`).

    Returns
    -------
    AnnData ``(n_conditions, n_genes)`` of mean log-normalised expression; ``.obs`` holds the
    condition columns of ``adata_eval`` and ``n_cells``, the number of predicted cells.
    """
    from perturbx.metrics._pseudobulk import log_normalise

    first = models[0]
    sources, source_cells, targets = first.condition_targets(adata_eval)
    sample = first.module.likelihood in COUNT_LIKELIHOODS
    plans = [
        model.plan_prediction(
            sources,
            targets,
            source=source_cells,
            n_cells_per_target=n_cells_per_target,
            library_size="observed",
            repeat_sources=sample,
            batch_size=batch_size,
            seed=seed,
        )
        for model in models
    ]
    for k, plan in enumerate(plans[1:], start=1):
        if not all(map(np.array_equal, plan.target_rows, plans[0].target_rows)):
            raise RuntimeError(
                f"Ensemble member {k} chose other source cells than member 0; the members must "
                "share their AnnData registration."
            )
    n_cells = np.asarray([len(rows) for rows in plans[0].target_rows])
    sums = np.zeros((len(targets), plans[0].adata.n_vars))
    members = zip(
        *(
            model.decode_prediction(plan, sample=sample, batch_size=batch_size, seed=seed)
            for model, plan in zip(models, plans, strict=True)
        ),
        strict=True,
    )
    offset = 0
    # delay: no bar for work that ends within seconds (it would only clutter notebooks).
    with tqdm(
        total=int(n_cells.sum()),
        desc="Predicting conditions",
        unit="cells",
        disable=len(n_cells) < 2,
        delay=2.0,
    ) as progress:
        for batches in members:
            target = batches[0][0]
            values = [v for _, v in batches]
            if sample:  # cell i is drawn by member i mod K, as in an ensemble's prediction
                member = sampling_member(len(values[0]), len(values), offset)
                combined = values[0].copy()
                for k in range(1, len(values)):
                    combined[member == k] = values[k][member == k]
                combined, _ = log_normalise(combined, counts=True, target_sum=target_sum)
            else:
                combined = np.mean(values, axis=0, dtype=np.float64)
            sums[target] += combined.sum(0, dtype=np.float64)
            offset += len(values[0])
            progress.update(len(values[0]))
    obs = targets.drop(columns=[first.smiles_column], errors="ignore").astype(str)
    obs["n_cells"] = n_cells
    obs.index = [f"condition_{i}" for i in range(len(obs))]
    means = AnnData(sums / n_cells[:, None], obs=obs, var=plans[0].adata.var[[]].copy())
    layer = first.registry["setup_args"]["layer"]
    if layer is not None:  # scored like the real cells, which are read from that layer
        means.layers[layer] = means.X
    return means


class EvaluationMixin:
    """:meth:`evaluate` for ``PerturbX`` (and the scoring shared with ``PerturbXEnsemble``).

    Relies on :class:`~perturbx.model._prediction.PredictionMixin` (``predict_conditions``,
    ``_training_indices``) and the model's registry and ``module``.
    """

    @keeps_adata_on_error("adata_eval")
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
            doses) use a few thousand.
            Predicted cells are reduced to per-condition means batch by batch, so memory
            does not grow with this number.
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
        pred = predicted_condition_means(
            [self],
            adata_eval,
            n_cells_per_target=n_cells_per_target,
            seed=seed,
            batch_size=batch_size,
        )
        return self.score_predictions(
            pred, adata_eval, baselines=baselines, top_k=top_k, method_name=method_name, seed=seed
        )

    def score_predictions(
        self,
        pred: AnnData,
        adata_eval: AnnData,
        *,
        baselines: Sequence[str],
        top_k: Sequence[int],
        method_name: str,
        seed: int,
    ):
        """Score the output of :func:`predicted_condition_means` as :meth:`evaluate` does."""
        from perturbx.metrics import score
        from perturbx.metrics._cells import CellSubset
        from perturbx.metrics._pseudobulk import USED_AS_GIVEN, condition_table

        pred.obs["method"] = method_name
        state = self.perturbation_registry
        layer = self.registry["setup_args"]["layer"]
        condition_keys = dict(
            perturbation_key=state["perturbation_key"],
            control_value=state["control_value"],
            dose_key=state["dose_key"],
            covariate_keys=list(self.covariate_categories),
        )
        result = score(
            pred,
            adata_eval,
            **condition_keys,
            method_key="method",
            layer=layer,
            counts=self.module.likelihood in COUNT_LIKELIHOODS,
            pred_counts=False,
            top_k=top_k,
            baselines=baselines,
            seed=seed,
            # The training cells by index, not as a view: read a block at a time, also from
            # a backed AnnData.
            centroid_reference=CellSubset(self.adata, self._training_indices()),
        )
        # score counts pred's rows (one mean per condition); report the predicted cells.
        table, codes = condition_table(pred.obs, dataset="pred", **condition_keys)
        cells_of = dict(zip(table["condition"].to_numpy()[codes], pred.obs["n_cells"], strict=True))
        per_condition = result.per_condition
        ours = per_condition["method"] == method_name
        per_condition.loc[ours, "n_obs_pred"] = per_condition.loc[ours, "condition"].map(cells_of)
        predicted = "samples" if self.module.likelihood in COUNT_LIKELIHOODS else "means"
        result.normalisation = result.normalisation.replace(
            f"pred: {USED_AS_GIVEN}",
            f"pred: per-condition means of the predicted cells ({predicted}) after the same "
            "normalisation",
        )
        per_condition.attrs["normalisation"] = result.normalisation
        return result

    # ------------------------------------------------------- held-out conditions
    @keeps_adata_on_error("adata_eval")
    def predict_conditions(
        self,
        adata_eval: AnnData,
        *,
        n_cells_per_target: int | None = 500,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> AnnData:
        """Predict every perturbed condition of ``adata_eval`` counterfactually, from controls.

        Each non-control condition (perturbation × dose × covariates) of ``adata_eval`` is
        predicted from control cells of matching covariates (those of ``adata_eval``, else
        the model's training controls), never by reconstructing its treated cells. With a
        counts likelihood the predicted cells are samples from the decoder's distribution,
        so that they carry the same sampling noise as real cells.

        Parameters
        ----------
        adata_eval
            Held-out cells: the conditions to predict (and, ideally, held-out controls).
            Perturbations need not be known to the model if they have SMILES in the
            registered SMILES column.
        n_cells_per_target
            Predicted cells per condition: a seeded subsample of the matching control cells.
            With a counts likelihood, when fewer control cells match, each is used several
            times, every time with a new draw (``repeat_sources`` of :meth:`predict`): a
            condition's predicted mean then does not carry the noise of a few draws.
        seed
            Seed of the subsampling and of the sampling.
        batch_size
            Cells per forward pass.

        Returns
        -------
        AnnData ``(n_conditions × n_source_cells, n_genes)`` as from :meth:`predict`
        (counts for counts likelihoods, log-normalised values for ``gaussian``; copied to
        the registered layer too, so that it can be scored like the real cells).
        """
        sources, source_cells, targets = self.condition_targets(adata_eval)
        sample = self.module.likelihood in COUNT_LIKELIHOODS
        pred = self.predict(
            sources,
            target=targets,
            source=source_cells,
            n_cells_per_target=n_cells_per_target,
            # Counts: samples, so that predictions and cells share the noise that the
            # log-normalisation turns into bias (log of a mean != mean of logs), and enough
            # of them that the predicted condition is not just a few draws.
            sample=sample,
            repeat_sources=sample,
            batch_size=batch_size,
            seed=seed,
        )
        layer = self.registry["setup_args"]["layer"]
        if layer is not None:
            pred.layers[layer] = pred.X
        return pred

    def condition_targets(
        self, adata_eval: AnnData
    ) -> tuple[AnnData, str | np.ndarray, pd.DataFrame]:
        """The source cells and targets with which :meth:`predict_conditions` calls
        :meth:`predict`: ``(source AnnData, source, targets)``, one target per perturbed
        condition of ``adata_eval`` (perturbation × dose × covariates), in name order.
        """
        state = self.perturbation_registry
        pkey, dkey = state["perturbation_key"], state["dose_key"]
        covariate_keys = list(self.covariate_categories)
        if self.adata is None:
            raise ValueError(
                "Predicting held-out conditions needs the model's training AnnData (load the "
                "model with adata=)."
            )
        missing = [
            k for k in [pkey, dkey, *covariate_keys] if k and k not in adata_eval.obs.columns
        ]
        if missing:
            raise KeyError(f"adata_eval.obs lacks the registered column(s) {missing}.")
        check_obs(adata_eval, covariate_keys)
        is_control = adata_eval.obs[pkey].astype(str).to_numpy() == state["control_value"]
        if not (~is_control).any():
            raise ValueError("adata_eval has no perturbed cells to evaluate.")
        if is_control.any():
            if adata_eval.isbacked:
                raise ValueError(
                    "predict_conditions / evaluate: adata_eval is backed (on disk); its control "
                    "cells are copied into memory. Pass adata_eval.to_memory() (held-out cells)."
                )
            # Cells and targets in a canonical (name) order: results do not depend on the
            # order of adata_eval's cells through the seeded subsampling and sampling.
            sources = adata_eval[np.sort(adata_eval.obs_names[is_control])].copy()
            source_cells = "control"
        else:
            # The model's own AnnData, cells chosen by index: no copy (it may be on disk).
            sources, source_cells = self.adata, self._training_control_indices()
        columns = [pkey] + ([dkey] if dkey else []) + covariate_keys
        smiles_column = self.smiles_column
        if smiles_column in adata_eval.obs.columns:
            columns.append(smiles_column)
        # One target per condition however its dose is written ("3" / "3.0") and whatever
        # the order of a combination's members ("A+B" at "1+10" is "B+A" at "10+1").
        conditions, codes = parse_condition_columns(
            adata_eval.obs, pkey, dkey, state["control_value"]
        )
        control = state["control_value"]
        canonical = []
        for names, doses in conditions:
            members = sorted(zip(names, doses, strict=True))
            canonical.append(
                format_condition(
                    [n for n, _ in members], [d for _, d in members], control_value=control
                )
            )
        targets = adata_eval.obs.loc[~is_control, columns].astype(object)
        targets[pkey] = [canonical[c][0] for c in codes[~is_control]]
        if dkey:
            targets[dkey] = [canonical[c][1] for c in codes[~is_control]]
        targets = targets.drop_duplicates(subset=[pkey] + ([dkey] if dkey else []) + covariate_keys)
        order = np.argsort(targets.astype(str).agg("|".join, axis=1).to_numpy(), kind="stable")
        return sources, source_cells, targets.iloc[order].reset_index(drop=True)

    def _training_indices(self) -> np.ndarray:
        if self.train_indices_ is None:
            return np.arange(self.adata.n_obs)
        return np.asarray(self.train_indices_)

    def _training_control_indices(self) -> np.ndarray:
        train = self._training_indices()
        packed = torch.from_numpy(np.asarray(self.adata.obsm["_perturbx_perturbations"])[train])
        _, index, _ = split_perturbations(packed)
        return train[(index == 0).all(1).numpy()]
