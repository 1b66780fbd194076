"""Deep ensembles of ``PerturbX`` models: several initialisations, one averaged prediction.

On molecules never seen in training a single network's prediction carries much variance
from its random initialisation and minibatch order; averaging a few models trained on the
same cells removes part of it (measured on the benchmarks page).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scvi import settings

from perturbx.model._evaluation import predicted_condition_means
from perturbx.model._perturbx import PerturbX
from perturbx.model._prediction import sampling_member

_MANIFEST = "perturbx_ensemble.json"
logger = logging.getLogger(__name__)


class PerturbXEnsemble:
    """``n_models`` :class:`~perturbx.PerturbX` models whose predictions are averaged.

    The members share the AnnData, its registration and the architecture; member ``k``'s
    initial weights are drawn with seed ``seed + k``, and it is trained with seed
    ``seed + k`` on the same training cells as the others. Predictions follow the mixture
    of the members' predictive distributions: expected values are the members' mean, and
    sampled cells are each drawn from one member (members take turns), so an ensemble's
    prediction has the shape and ``.obs`` of a single model's and is scored the same way.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`perturbx.PerturbX.setup_anndata`.
    n_models
        Number of members (at least 1).
    seed
        Seed of the first member's initial weights and training.
    **model_kwargs
        Arguments of :class:`perturbx.PerturbX` (likelihood, latent size, ...), the same for
        every member.

    Examples
    --------
    >>> ensemble = perturbx.PerturbXEnsemble(adata, n_models=5)
    >>> ensemble.train(max_epochs=100, split_key="split")
    >>> result = ensemble.evaluate(adata[adata.obs["split"] == "test"].copy())
    """

    def __init__(self, adata: AnnData, n_models: int = 5, seed: int = 0, **model_kwargs: Any):
        if isinstance(n_models, bool) or not isinstance(n_models, (int, np.integer)):
            raise TypeError(f"n_models must be an integer, got {n_models!r}.")
        if n_models < 1:
            raise ValueError(f"n_models={n_models} must be at least 1.")
        models = []
        for k in range(n_models):
            settings.seed = seed + k  # the initial weights are drawn here
            models.append(PerturbX(adata, **model_kwargs))
        self.models: list[PerturbX] = models
        self.seed = seed

    @classmethod
    def from_models(cls, models: Sequence[PerturbX], seed: int = 0) -> PerturbXEnsemble:
        """An ensemble of models already built (trained or not) on the same registration.

        Raises ``ValueError`` unless every model has the same genes, perturbation vocabulary,
        covariates and likelihood as the first one, and trained models the same training
        cells (so that the ensemble's held-out cells are held out from every member).
        """
        models = list(models)
        if not models:
            raise ValueError("from_models needs at least one model.")
        for i, model in enumerate(models):
            if not isinstance(model, PerturbX):
                raise TypeError(f"models[{i}] is a {type(model).__name__}, not a PerturbX.")
        reference = _signature(models[0])
        for i, model in enumerate(models[1:], start=1):
            differs = [key for key, value in _signature(model).items() if value != reference[key]]
            if differs:
                raise ValueError(
                    f"models[{i}] differs from models[0] in {differs}: ensemble members must be "
                    "set up on the same genes, perturbations and covariates."
                )
        trained = [np.sort(np.asarray(m.train_indices)) for m in models if m.is_trained]
        if any(not np.array_equal(t, trained[0]) for t in trained[1:]):
            raise ValueError(
                "The trained models were trained on different cells; ensemble members must "
                "share their training cells (train them with the same split_key)."
            )
        ensemble = cls.__new__(cls)
        ensemble.models = models
        ensemble.seed = seed
        return ensemble

    def __len__(self) -> int:
        return len(self.models)

    def __repr__(self) -> str:
        trained = sum(m.is_trained for m in self.models)
        return (
            f"PerturbXEnsemble of {len(self)} models ({trained} trained); first member:\n"
            f"{self.models[0]._model_summary_string}"
        )

    @property
    def adata(self) -> AnnData | None:
        """The AnnData of the members (the first member's)."""
        return self.models[0].adata

    @property
    def is_trained(self) -> bool:
        """Whether every member has been trained."""
        return all(m.is_trained for m in self.models)

    # -------------------------------------------------------------------------- training
    def train(self, max_epochs: int | None = None, **train_kwargs: Any) -> None:
        """Train every member in turn (:meth:`perturbx.PerturbX.train` arguments).

        Member ``k`` is trained with ``seed = self.seed + k`` (``seed=`` is not accepted).
        Without ``split_key``, the first member draws the random train / validation split
        and the others train on the same cells, so that cells held out from one member are
        held out from all.
        """
        if "seed" in train_kwargs:
            raise TypeError(
                "PerturbXEnsemble.train takes no seed: member k trains with seed "
                f"{self.seed} + k (set seed= when creating the ensemble)."
            )
        for k, model in enumerate(self.models):
            kwargs = dict(train_kwargs)
            if k > 0 and kwargs.get("split_key") is None:
                first = self.models[0]
                kwargs["datasplitter_kwargs"] = {
                    **kwargs.get("datasplitter_kwargs", {}),
                    "external_indexing": [
                        np.asarray(first.train_indices),
                        np.asarray(first.validation_indices),
                        np.asarray(first.test_indices),
                    ],
                }
                kwargs["train_size"] = kwargs["validation_size"] = None
            logger.info("Training ensemble member %d of %d.", k + 1, len(self))
            model.train(max_epochs=max_epochs, seed=self.seed + k, **kwargs)

    # ------------------------------------------------------------------------ prediction
    def predict(
        self,
        adata: AnnData | None = None,
        target=None,
        *,
        source: str | np.ndarray = "control",
        n_cells_per_target: int | None = None,
        library_size: Literal["observed"] | float = "observed",
        sample: bool = False,
        repeat_sources: bool = False,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> AnnData:
        """Counterfactual prediction (see :meth:`perturbx.PerturbX.predict`).

        Every member predicts the same source cells (chosen with ``seed``); the result holds
        the members' mean expected expression (``sample=False``), or for cell ``i`` the sample
        of member ``i mod n_models`` (``sample=True``). Same shape and ``.obs`` as one
        member's prediction; ``.obs["ensemble_member"]`` names the member of sampled cells.
        """
        return self._combine(
            lambda m: m.predict(
                adata,
                target,
                source=source,
                n_cells_per_target=n_cells_per_target,
                library_size=library_size,
                sample=sample,
                repeat_sources=repeat_sources,
                batch_size=batch_size,
                seed=seed,
            )
        )

    def predict_conditions(
        self,
        adata_eval: AnnData,
        *,
        n_cells_per_target: int | None = 500,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> AnnData:
        """Predict every perturbed condition of ``adata_eval`` from controls (see
        :meth:`perturbx.PerturbX.predict_conditions`), combined over members as in
        :meth:`predict`.
        """
        return self._combine(
            lambda m: m.predict_conditions(
                adata_eval, n_cells_per_target=n_cells_per_target, seed=seed, batch_size=batch_size
            )
        )

    def evaluate(
        self,
        adata_eval: AnnData,
        *,
        n_cells_per_target: int | None = 500,
        baselines: Sequence[str] = ("control_mean", "perturbed_centroid", "interpolated_duplicate"),
        top_k: Sequence[int] = (20, 50),
        method_name: str | None = None,
        seed: int = 0,
        batch_size: int = 1024,
    ):
        """Score the ensemble's predictions of ``adata_eval`` with baselines (see
        :meth:`perturbx.PerturbX.evaluate`; the perturbed centroid is the mean of the
        training conditions, which all members share). ``method_name`` defaults to
        ``"PerturbX (ensemble of K)"``.
        """
        first = self.models[0]
        pred = predicted_condition_means(
            self.models,
            adata_eval,
            n_cells_per_target=n_cells_per_target,
            seed=seed,
            batch_size=batch_size,
        )
        return first.score_predictions(
            pred,
            adata_eval,
            baselines=baselines,
            top_k=top_k,
            method_name=method_name or f"PerturbX (ensemble of {len(self)})",
            seed=seed,
        )

    def _combine(self, predict_one) -> AnnData:
        """Run ``predict_one`` on every member and mix the results (one member at a time)."""
        result = predict_one(self.models[0])
        sampled = result.uns["perturbx_prediction"]["values"] == "samples"
        n_models = len(self)
        member = sampling_member(result.n_obs, n_models)
        total = np.asarray(result.X, dtype=np.float64) if not sampled else None
        for k, model in enumerate(self.models[1:], start=1):
            other = predict_one(model)
            if not other.obs.equals(result.obs):
                raise RuntimeError(
                    f"Ensemble member {k} predicted other cells than member 0; the members must "
                    "share their AnnData registration."
                )
            if sampled:
                rows = member == k
                result.X[rows] = other.X[rows]
            else:
                total += other.X
        if sampled:
            result.obs["ensemble_member"] = member
        else:
            result.X = (total / n_models).astype(result.X.dtype)
        for name in list(result.layers):  # predict_conditions copies X to the registered layer
            result.layers[name] = result.X
        result.uns["perturbx_prediction"]["ensemble_size"] = n_models
        return result

    # ------------------------------------------------------------------------ save / load
    def save(self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False):
        """Save every member to ``dir_path/member_<k>/`` (with the AnnData once, in member 0's
        folder, if ``save_anndata``) and a manifest ``perturbx_ensemble.json``.
        """
        dir_path = Path(dir_path)
        if dir_path.exists() and any(dir_path.iterdir()) and not overwrite:
            raise ValueError(
                f"{dir_path} already exists and is not empty; pass overwrite=True to replace it."
            )
        dir_path.mkdir(parents=True, exist_ok=True)
        for k, model in enumerate(self.models):
            model.save(
                str(dir_path / f"member_{k}"),
                overwrite=overwrite,
                save_anndata=save_anndata and k == 0,
            )
        manifest = {"n_models": len(self), "seed": self.seed}
        (dir_path / _MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(
        cls, dir_path: str | Path, adata: AnnData | None = None, trust_pickle: bool = False
    ) -> PerturbXEnsemble:
        """Load an ensemble written by :meth:`save` (``adata``: see
        :meth:`perturbx.PerturbX.load`; if ``None``, the AnnData saved with the first member).

        ``trust_pickle``: also read members saved by perturbx < 0.2, whose files are Python
        pickles that can run code when read (see :meth:`perturbx.PerturbX.load`).
        """
        dir_path = Path(dir_path)
        manifest_path = dir_path / _MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{dir_path} holds no {_MANIFEST}: not a folder written by PerturbXEnsemble.save."
            )
        manifest = json.loads(manifest_path.read_text())
        first = PerturbX.load(str(dir_path / "member_0"), adata=adata, trust_pickle=trust_pickle)
        models = [first] + [
            PerturbX.load(
                str(dir_path / f"member_{k}"), adata=first.adata, trust_pickle=trust_pickle
            )
            for k in range(1, manifest["n_models"])
        ]
        return cls.from_models(models, seed=manifest["seed"])


def _signature(model: PerturbX) -> dict[str, Any]:
    """What ensemble members must share."""
    x_state = model.registry["field_registries"]["X"]["state_registry"]
    return {
        "genes": list(x_state["column_names"]),
        "perturbations": model.perturbation_registry,
        "covariates": model.covariate_categories,
        "likelihood": model.module.likelihood,
    }
