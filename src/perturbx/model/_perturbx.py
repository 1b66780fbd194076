"""``perturbx.PerturbX``: the user-facing scvi-tools model class."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from perturbx.chem import MorganFeaturizer, canonical_smiles, warn_indistinguishable_molecules
from perturbx.data._backed import (
    check_minibatch_access,
    check_not_backed_view,
    keep_requested_order,
)
from perturbx.data._fields import (
    PERTURBATIONS_KEY,
    CovariateField,
    PerturbationField,
    check_registry_state,
)
from perturbx.data._validation import (
    align_genes,
    check_expression,
    check_obs,
    check_same_genes,
    check_var_names,
    keeps_adata_on_error,
    unchanged_on_error,
)
from perturbx.model._evaluation import EvaluationMixin
from perturbx.model._prediction import PredictionMixin
from perturbx.model._save_load import SaveLoadMixin
from perturbx.module import COUNT_LIKELIHOODS, LIKELIHOODS, PerturbXModule
from perturbx.train import PerturbXTrainingPlan, check_plan_kwargs, resolve_ddp_strategy

logger = logging.getLogger(__name__)


class PerturbX(
    SaveLoadMixin, PredictionMixin, EvaluationMixin, UnsupervisedTrainingMixin, BaseModelClass
):
    """Compositional perturbation autoencoder with chemistry-aware drug embeddings.

    Each cell is encoded to a *basal latent* from which adversaries try to predict the
    perturbation and covariates; perturbation embeddings (from the Morgan fingerprint for
    drugs with SMILES, learned otherwise), scaled by a learned dose response, and covariate
    embeddings are added to it and decoded back to expression. Counterfactual predictions
    encode control cells and add the embeddings of any target condition, including molecules
    never seen in training (by SMILES).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    likelihood
        ``"nb"`` or ``"zinb"`` for raw counts, ``"gaussian"`` for log-normalised data.
    n_latent, n_hidden, n_layers, dropout_rate
        Latent size, and width / depth / dropout of encoder and decoder.
    variational
        Sample the basal latent from ``N(mu, sigma)`` with a KL term (default) instead of a
        deterministic encoder. The KL term limits how much a cell's basal latent can carry,
        which keeps its perturbation out of it; use ``False`` only to compare (see the
        benchmarks page for what it costs on held-out combinations).
    dose_response
        ``"amortized"`` (default; parameters from the fingerprint, so new molecules get a
        curve), ``"logsigm"``, ``"sigm"``, ``"linear"`` or ``"mlp"``.
    drug_encoder_hidden, drug_encoder_layers
        Size of the fingerprint → embedding MLP.
    adversary_hidden, adversary_layers
        Size of the adversarial classifiers.
    linear_shift_head
        Add the perturbation shift to the decoder's output through a linear map instead of
        passing it through the decoder's hidden layers (see
        :class:`perturbx.module.PerturbXModule`): effects are the same log-fold-change vector
        in every cell and interpolate as embeddings do. Off by default; the benchmarks page
        says on which data it helps.
    unseen_molecules
        How molecules without training cells (held-out vocabulary entries, new SMILES) are
        embedded: ``"encoder"`` (default), the drug encoder; ``"ridge"``, ridge regressions
        from the fingerprint to the training molecules' encoder embeddings and dose-response
        parameters, fitted at the end of :meth:`train` (see
        :class:`perturbx.module.FingerprintRidge`): a new molecule is placed by interpolating
        between the training molecules instead of by the encoder's extrapolation.

    Examples
    --------
    >>> import perturbx
    >>> adata = perturbx.data.simulate_drug_screen(n_cells=5000, n_genes=500)
    >>> perturbx.PerturbX.setup_anndata(
    ...     adata, perturbation_key="drug", dose_key="dose", smiles_key="smiles",
    ...     control_value="control", covariate_keys=["cell_type"])
    >>> model = perturbx.PerturbX(adata)
    >>> model.train(max_epochs=20)
    >>> pred = model.predict(target={"drug": "Dexamethasone", "dose": 1.0})
    """

    _module_cls = PerturbXModule
    _training_plan_cls = PerturbXTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        likelihood: Literal["nb", "zinb", "gaussian"] = "nb",
        n_latent: int = 128,
        n_hidden: int = 256,
        n_layers: int = 3,
        dropout_rate: float = 0.0,
        variational: bool = True,
        dose_response: Literal["amortized", "logsigm", "sigm", "linear", "mlp"] = "amortized",
        drug_encoder_hidden: int = 256,
        drug_encoder_layers: int = 2,
        adversary_hidden: int = 64,
        adversary_layers: int = 3,
        linear_shift_head: bool = False,
        unseen_molecules: Literal["encoder", "ridge"] = "encoder",
        registry: dict | None = None,
    ):
        super().__init__(adata, registry=registry)
        check_registry_state(self.perturbation_registry)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not one of {LIKELIHOODS}.")
        if adata is not None:
            counts = likelihood in COUNT_LIKELIHOODS
            check_minibatch_access(adata, self.registry["setup_args"]["layer"])
            check_expression(adata, self.registry["setup_args"]["layer"], counts)
        state = self.perturbation_registry
        fingerprints = np.zeros((len(state["vocabulary"]), self.featurizer.n_bits), np.float32)
        has_structure = np.array([s is not None for s in state["smiles"]], dtype=bool)
        if has_structure.any():
            structured = [s for s in state["smiles"] if s is not None]
            fingerprints[has_structure] = self.featurizer(structured)
        self.module = self._module_cls(
            n_genes=self.summary_stats.n_vars,
            fingerprints=torch.from_numpy(fingerprints),
            has_structure=torch.from_numpy(has_structure),
            n_labels=len(state["labels"]),
            n_cats_per_covariate=[len(v) for v in self.covariate_categories.values()],
            covariate_names=list(self.covariate_categories),
            likelihood=likelihood,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            variational=variational,
            dose_response=dose_response,
            drug_encoder_hidden=drug_encoder_hidden,
            drug_encoder_layers=drug_encoder_layers,
            adversary_hidden=adversary_hidden,
            adversary_layers=adversary_layers,
            linear_shift_head=linear_shift_head,
            unseen_molecules=unseen_molecules,
        )
        n_molecules = int(has_structure.sum())
        self._model_summary_string = (
            f"PerturbX: {likelihood} likelihood, latent {n_latent}, "
            f"{len(state['vocabulary'])} perturbations ({n_molecules} embedded from structure, "
            f"{len(state['vocabulary']) - n_molecules} learned), dose response {dose_response!r}"
            + (", linear shift head" if linear_shift_head else "")
            + (", unseen molecules by ridge" if unseen_molecules == "ridge" else "")
            + "."
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ registration
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_value: str = "control",
        dose_key: str | None = None,
        smiles_key: str | dict[str, str] | None = None,
        covariate_keys: Sequence[str] = (),
        layer: str | None = None,
        fingerprint_radius: int = 2,
        fingerprint_bits: int = 2048,
        fingerprint_counts: bool = True,
        fingerprint_chirality: bool = False,
        **kwargs,
    ) -> None:
        """Register an AnnData for PerturbX.

        Parameters
        ----------
        adata
            Cells × genes; raw counts (for ``nb``/``zinb``) or log-normalised (``gaussian``).
            Sparse matrices stay sparse; only minibatches are densified. Out of core:
            an AnnData opened with ``anndata.read_h5ad(path, backed="r")`` (counts in
            ``X``), or with a layer from ``anndata.io.sparse_dataset`` (HDF5 or zarr), is
            read minibatch by minibatch (see :mod:`perturbx.data._backed`).
        perturbation_key
            obs column of perturbations; combinations are ``"A+B"``.
        control_value
            Label of control (unperturbed / vehicle) cells in ``perturbation_key``.
        dose_key
            obs column of doses (numbers, or ``"1.0+3.0"`` for combinations, paired with the
            members by position). ``None``: every perturbation at dose 1.
        smiles_key
            obs column with each drug's SMILES (combinations ``+``-joined in member order) or
            a mapping perturbation → SMILES. Perturbations without SMILES (controls, genes,
            drugs of unknown structure) get learned embeddings.
        covariate_keys
            Categorical obs columns (cell type, donor, ...) with their own embeddings and
            adversaries.
        layer
            Layer with the expression; ``None`` uses ``adata.X``.
        fingerprint_radius, fingerprint_bits, fingerprint_counts
            Morgan fingerprint settings (stored in the registry): radius, length, and count
            vectors (the default) instead of 0/1 bits.
        fingerprint_chirality
            Include R/S stereo tags in the fingerprints, so that stereoisomers (e.g.
            ruxolitinib and S-ruxolitinib in sci-Plex 3) are different molecules to the
            model. Without it (the default) they get identical embeddings, and
            ``setup_anndata`` warns, naming them.

        Notes
        -----
        Invalid input raises ``KeyError`` / ``ValueError`` naming the column, value or
        argument, and leaves ``adata`` unchanged: missing columns, no control cells (with
        close matches of ``control_value``), missing (NaN), negative, non-numeric or
        non-finite doses, dose lists whose length differs from the combination's, doses above
        :data:`perturbx.conditions.MAX_DOSE` (``1e6``; doses are never clamped, larger
        values are taken as a unit error), missing perturbations or covariates, duplicate
        obs names, invalid SMILES. Unused categories of categorical columns are harmless:
        perturbations come from the values present, and an unused covariate category gets an
        embedding that is never trained (predicting it finds no source cells and says so).
        """
        covariate_keys = list(covariate_keys)
        setup_method_args = cls._get_setup_method_args(**locals())
        check_not_backed_view(adata, "setup_anndata")
        check_obs(adata, covariate_keys)
        check_var_names(adata)
        clashes = [k for k in covariate_keys if k in (perturbation_key, dose_key, smiles_key)]
        if clashes:
            raise ValueError(
                f"covariate_keys {clashes} repeat the perturbation, dose or SMILES column."
            )
        source_registry = kwargs.get("source_registry")
        if source_registry is not None:  # loading a saved model: its genes, in its order
            x_state = source_registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]
            check_same_genes(adata, x_state["column_names"])
        featurizer = MorganFeaturizer(
            fingerprint_radius, fingerprint_bits, fingerprint_counts, fingerprint_chirality
        )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            PerturbationField(
                perturbation_key,
                dose_key,
                control_value,
                canonicalize=canonical_smiles,
                fingerprint_settings=featurizer.to_dict(),
                smiles_key=smiles_key,
            ),
            CovariateField(covariate_keys),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with unchanged_on_error(adata):
            manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)
        if source_registry is None:
            warn_indistinguishable_molecules(
                manager.get_state_registry(PERTURBATIONS_KEY), featurizer
            )

    @property
    def perturbation_registry(self) -> dict:
        """The perturbation field's registry: ``vocabulary``, canonical ``smiles`` (``None``
        for learned perturbations), adversary ``labels``, the ``perturbation_key`` /
        ``dose_key`` / ``control_value`` and the ``fingerprint`` settings.
        """
        return self.registry["field_registries"][PERTURBATIONS_KEY]["state_registry"]

    @property
    def covariate_categories(self) -> dict[str, list]:
        """Registered covariates and their categories, in registration order."""
        field = self.registry["field_registries"].get(REGISTRY_KEYS.CAT_COVS_KEY, {})
        state = field.get("state_registry", {})
        keys = state.get("field_keys") or []
        return {k: list(state["mappings"][k]) for k in keys}

    @property
    def smiles_column(self) -> str:
        """Name of the SMILES column in targets: the registered obs column, else "smiles"."""
        smiles_key = self.registry["setup_args"].get("smiles_key")
        return smiles_key if isinstance(smiles_key, str) else "smiles"

    @property
    def featurizer(self) -> MorganFeaturizer:
        """The Morgan featuriser with the registered settings."""
        if not hasattr(self, "_featurizer"):
            settings_ = self.perturbation_registry["fingerprint"]
            self._featurizer = MorganFeaturizer.from_dict(settings_)
        return self._featurizer

    @property
    def perturbations(self) -> list[str]:
        """The perturbation vocabulary (controls excluded)."""
        return list(self.perturbation_registry["vocabulary"])

    # ----------------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        split_key: str | None = None,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        plan_kwargs: dict | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        """Train the model (again calls continue from the current weights).

        Parameters
        ----------
        max_epochs
            Passes through the training cells (default: scvi's heuristic).
        batch_size
            Cells per minibatch.
        split_key
            obs column with ``"train"`` / ``"validation"`` / ``"test"`` per cell (see
            :mod:`perturbx.data.splits`); test cells are never seen. If ``None``, a random
            ``train_size`` / ``validation_size`` split is drawn.
        train_size, validation_size
            Random split fractions when ``split_key`` is ``None``.
        early_stopping
            Stop when the validation loss stops improving (scvi/Lightning early stopping).
        plan_kwargs
            Arguments of :class:`perturbx.train.PerturbXTrainingPlan` (learning rates,
            ``adversary_weight``, ``adversary_every``, ``n_epochs_adversary_warmup``,
            ``gradient_penalty``, ``gradient_clip_val``, ...).
        seed
            Seeds torch, numpy and the split (``scvi.settings.seed``). The initial weights
            are drawn when the model is created, so for a fully reproducible run set
            ``scvi.settings.seed`` before ``PerturbX(adata)`` too.
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (e.g.
            ``accelerator``, ``devices``, ``datasplitter_kwargs``, Lightning trainer arguments
            such as ``callbacks`` or ``ckpt_path``).

        Notes
        -----
        Resuming. Calling ``train`` again, also on a model from :meth:`load`, continues from
        the current weights and appends to ``history``; it starts new optimisers and restarts
        the adversary and KL warm-ups, and draws a new random split unless ``split_key`` or
        the same ``seed`` is given. To resume the exact training state (optimiser moments,
        epoch counter, warm-ups), save a Lightning checkpoint after training with
        ``model.trainer.save_checkpoint(path)`` and train a model of the same setup with
        ``ckpt_path=path`` and a larger ``max_epochs``. During training,
        ``callbacks=[scvi.train.SaveCheckpoint(dirpath, monitor="elbo_validation")]`` keeps
        the best epoch as a model folder for :meth:`load` (written by :meth:`save`; its
        ``load_best_on_end=True`` is not supported, as it reads scvi's pickle files).

        Faults. A NaN or infinite loss term stops training with
        :class:`perturbx.train.NonFiniteLossError` naming the term, epoch and step, before
        the weights are updated; ``plan_kwargs={"gradient_clip_val": ...}`` clips the
        autoencoder's gradient norm.

        Several processes (data parallel). ``accelerator="gpu", devices=4`` (or
        ``accelerator="cpu"``; ``num_nodes=`` for several machines) trains one copy of the
        model per process on its share of the cells, averaging gradients at every step.
        Several devices or nodes, ``strategy="ddp"`` and any other DDP strategy name give a
        ``DDPStrategy(find_unused_parameters=True)`` (see
        :func:`perturbx.train.resolve_ddp_strategy`); ``..._find_unused_parameters_false`` is
        an error. Lightning's ``"ddp"`` re-runs the calling script once per extra process, so
        run it from a script, not a notebook, and keep the script deterministic up to
        ``train`` (same data, same ``setup_anndata``). ``batch_size`` is per process (the
        effective batch is ``batch_size × processes``). scvi turns early stopping off under
        DDP and keeps ``history`` on global rank 0 only (it also writes it to
        ``lightning_logs/`` in the working directory); :meth:`save` writes on rank 0 only.
        """
        check_plan_kwargs(plan_kwargs)
        if seed is not None:
            settings.seed = seed
        kwargs["strategy"] = resolve_ddp_strategy(
            kwargs.get("strategy", "auto"),
            kwargs.get("devices", "auto"),
            kwargs.get("num_nodes", 1),
        )
        if split_key is not None:
            kwargs["datasplitter_kwargs"] = {
                **kwargs.get("datasplitter_kwargs", {}),
                "external_indexing": self._split_indices(split_key),
            }
            train_size = validation_size = None
            has_validation = len(kwargs["datasplitter_kwargs"]["external_indexing"][1]) > 0
        elif "external_indexing" in kwargs.get("datasplitter_kwargs", {}):
            has_validation = len(kwargs["datasplitter_kwargs"]["external_indexing"][1]) > 0
        else:
            has_validation = train_size is None or train_size < 1.0 or bool(validation_size)
        # Validation metrics every epoch (history), unless there are no validation cells.
        kwargs.setdefault("check_val_every_n_epoch", 1 if has_validation else None)
        # predict() and load() leave the module in evaluation mode, and Lightning keeps each
        # submodule's mode at the start of fit: without this, a second call would train with
        # the basal latent's mean instead of a sample (and without dropout).
        self.module.train()
        ridge = self.module.unseen_molecules == "ridge"
        if ridge:
            # A ridge fitted after an earlier train() call would stand in for the encoder of
            # molecules in this run's validation cells.
            self.module.reset_unseen_molecule_ridge()
        result = super().train(
            max_epochs=max_epochs,
            batch_size=batch_size,
            train_size=train_size,
            validation_size=validation_size,
            early_stopping=early_stopping,
            plan_kwargs=plan_kwargs,
            **kwargs,
        )
        if ridge:
            self._fit_unseen_molecule_ridge()
        return result

    def _split_indices(self, split_key: str) -> list[np.ndarray]:
        if split_key not in self.adata.obs.columns:
            raise KeyError(f"split_key={split_key!r} is not a column of adata.obs.")
        split = self.adata.obs[split_key].astype(str).to_numpy()
        unknown = sorted(set(split) - {"train", "validation", "test"})
        if unknown:
            raise ValueError(
                f"obs[{split_key!r}] has values {unknown}; expected 'train', 'validation', 'test'."
            )
        indices = [np.flatnonzero(split == s) for s in ("train", "validation", "test")]
        if len(indices[0]) == 0:
            raise ValueError(f"obs[{split_key!r}] has no 'train' cells.")
        return indices

    # -------------------------------------------------------------------- data access
    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        """Scvi's validation, with genes matched by name and ``adata`` unchanged on error.

        A new AnnData whose genes are the model's in another order (or with extra genes) is
        replaced by a copy in the model's gene order; missing genes are an error.
        """
        if adata is None or adata is self.adata:
            return super()._validate_anndata(adata, copy_if_view)
        check_not_backed_view(adata, "predict / get_latent_representation / reconstruct")
        x_state = self.registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]
        aligned = align_genes(adata, x_state["column_names"])
        if aligned is not adata:
            logger.info("Matched the AnnData's genes to the model's by name (a reordered copy).")
        with unchanged_on_error(aligned):
            return super()._validate_anndata(aligned, copy_if_view)

    def _batches(self, adata: AnnData | None, indices=None, batch_size: int | None = None):
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, indices=indices, batch_size=batch_size)
        # Backed AnnData: scvi sorts each minibatch's cells; give them back in the asked order.
        return adata, keep_requested_order(loader, adata, indices)

    @keeps_adata_on_error("adata")
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        kind: Literal["basal", "full"] = "basal",
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent representation of cells, ``(n_cells, n_latent)``.

        ``kind="basal"``: the encoder output, stripped of perturbation and covariate
        information by the adversaries. ``kind="full"``: basal + the cell's own perturbation
        (dose-scaled) and covariate embeddings, the decoder's input.
        """
        if kind not in ("basal", "full"):
            raise ValueError(f"kind={kind!r} must be 'basal' or 'full'.")
        self.module.eval()
        _, loader = self._batches(adata, indices, batch_size)
        out = []
        for tensors in loader:
            inference_outputs, generative_outputs = self.module(tensors, compute_loss=False)
            key = "basal_latent" if kind == "basal" else None
            latent = inference_outputs[key] if key else generative_outputs["latent"]
            out.append(latent.cpu().numpy())
        return np.concatenate(out)

    @keeps_adata_on_error("adata")
    @torch.inference_mode()
    def reconstruct(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """Expected expression of observed cells under their *own* conditions.

        This is a reconstruction (the autoencoder's fit), not a counterfactual prediction;
        use :meth:`predict` for the latter. Returns an AnnData with the cells' obs.
        """
        self.module.eval()
        adata, loader = self._batches(adata, indices, batch_size)
        out = [self.module(t, compute_loss=False)[1]["px"].mean.cpu().numpy() for t in loader]
        obs = adata.obs.iloc[np.arange(adata.n_obs) if indices is None else np.asarray(indices)]
        return AnnData(
            np.concatenate(out).astype(np.float32), obs=obs.copy(), var=adata.var[[]].copy()
        )
