"""Counterfactual queries of a trained ``PerturbX``: prediction, embeddings, dose responses.

:class:`PredictionMixin` holds everything that resolves target conditions (names, dose,
covariates, or SMILES of molecules never seen in training) into the module's inputs and
decodes the answer: :meth:`~PredictionMixin.predict`, :meth:`~PredictionMixin.predict_conditions`,
the perturbation embeddings and dose responses. Scoring predictions against baselines lives
in :mod:`perturbx.model._evaluation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from perturbx.chem import canonical_smiles, nearest_reference
from perturbx.conditions import (
    split_smiles_combination,
)
from perturbx.data._validation import keeps_adata_on_error
from perturbx.model._targets import (
    KEEP_SOURCE,
    ResolvedTargets,
    check_prediction_arguments,
    checked_doses,
    resolve_targets,
)
from perturbx.module import COUNT_LIKELIHOODS, split_perturbations


@dataclass
class PredictionPlan:
    """A resolved :meth:`PredictionMixin.predict` query, before decoding.

    ``targets``: the resolved targets; ``extra``: fingerprints of molecules outside the
    vocabulary; ``adata`` / ``sources``: the source cells' AnnData and indices; ``basal``
    ``(S, L)``, ``library`` ``(S, 1)``, ``covariates`` ``(S, C)``: their encoding;
    ``target_rows``: for each target, the rows of ``sources`` it is predicted from.
    """

    targets: ResolvedTargets
    extra: torch.Tensor | None
    adata: AnnData
    sources: np.ndarray
    basal: torch.Tensor
    library: torch.Tensor
    covariates: torch.Tensor
    target_rows: list[np.ndarray]

    @property
    def n_cells(self) -> int:
        return sum(map(len, self.target_rows))


def sampling_member(n_cells: int, n_models: int, offset: int = 0) -> np.ndarray:
    """Which ensemble member draws each of ``n_cells`` sampled cells.

    Cell ``i`` of an ensemble's sampled prediction is member ``i mod n_models``'s draw;
    ``offset`` is the index of the first of these cells in the whole prediction.
    """
    return (offset + np.arange(n_cells)) % n_models


class PredictionMixin:
    """Counterfactual prediction, perturbation embeddings and dose responses for ``PerturbX``.

    Mixed into :class:`perturbx.PerturbX` (as scvi-tools mixes ``RNASeqMixin`` into its
    models); relies on its ``module``, registry properties (``perturbation_registry``,
    ``covariate_categories``, ``smiles_column``, ``featurizer``, ``perturbations``), data
    access (``_validate_anndata``, ``_batches``) and scvi's ``adata`` and ``train_indices_``.
    """

    @property
    def _embeds_molecules(self) -> bool:
        """Whether the model has a drug encoder (a perturbation registered with a SMILES)."""
        return any(smiles is not None for smiles in self.perturbation_registry["smiles"])

    # --------------------------------------------------------------------- prediction
    def _source_indices(self, adata: AnnData, source) -> np.ndarray:
        if isinstance(source, str):
            if source != "control":
                raise ValueError(f"source={source!r}: use 'control', a boolean mask or indices.")
            _, index, _ = split_perturbations(
                torch.from_numpy(np.asarray(adata.obsm["_perturbx_perturbations"]))
            )
            chosen = np.flatnonzero((index == 0).all(1).numpy())
            if len(chosen) == 0:
                raise ValueError("The AnnData has no control cells to predict from.")
            return chosen
        source = np.asarray(source)
        if source.dtype == bool:
            if source.shape != (adata.n_obs,):
                raise ValueError(
                    f"source mask has shape {source.shape}, expected ({adata.n_obs},)."
                )
            if not source.any():
                raise ValueError("source mask selects no cells (it is all False).")
            return np.flatnonzero(source)
        if source.ndim != 1 or source.dtype.kind not in "iu":
            raise TypeError(
                f"source must be 'control', a boolean mask or integer cell indices; got an "
                f"array of dtype {source.dtype} and shape {source.shape}"
                + (
                    " (obs names: pass np.flatnonzero(adata.obs_names.isin(names)))."
                    if source.dtype.kind in "OUS"
                    else "."
                )
            )
        if len(source) == 0:
            raise ValueError("source selects no cells (no indices given).")
        outside = source[(source < 0) | (source >= adata.n_obs)]
        if len(outside):
            raise IndexError(
                f"source indices {outside[:5].tolist()} are outside 0..{adata.n_obs - 1} "
                f"(the AnnData has {adata.n_obs} cells)."
            )
        return source.astype(np.int64)

    @torch.inference_mode()
    def _encode_sources(self, adata: AnnData, indices: np.ndarray, batch_size: int | None):
        """Basal latent, library size and covariate codes of the source cells."""
        _, loader = self._batches(adata, indices, batch_size)
        basal, library, covariates = [], [], []
        for tensors in loader:
            inference_outputs = self.module.encode(tensors)
            basal.append(inference_outputs["basal_latent"])
            library.append(inference_outputs["library"])
            cov = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
            n = basal[-1].shape[0]
            covariates.append(
                cov.long() if cov is not None else torch.zeros(n, 0, dtype=torch.long)
            )
        return torch.cat(basal), torch.cat(library), torch.cat(covariates)

    def _seen_in_training(self) -> np.ndarray:
        """``(P,)`` bool: vocabulary entries with training cells (all, if unknown)."""
        seen = np.ones(len(self.perturbation_registry["vocabulary"]), dtype=bool)
        if self.adata is not None and self.train_indices_ is not None:
            packed = np.asarray(self.adata.obsm["_perturbx_perturbations"])[self.train_indices_]
            _, index, _ = split_perturbations(torch.from_numpy(packed))
            members = np.unique(index.numpy())
            seen[:] = False
            seen[members[members > 0] - 1] = True
        return seen

    def _fit_unseen_molecule_ridge(self) -> None:
        """Fit ``unseen_molecules="ridge"`` maps on the molecules with training cells."""
        seen = self._seen_in_training()
        n_seen = int((seen & self.module.perturbation_embedding.has_structure.cpu().numpy()).sum())
        if n_seen < 2:
            warnings.warn(
                f"unseen_molecules='ridge' needs at least 2 molecules with training cells, but "
                f"the training cells hold {n_seen}: molecules without training cells are "
                "embedded by the drug encoder.",
                UserWarning,
                stacklevel=3,
            )
            return
        self.module.fit_unseen_molecule_ridge(torch.from_numpy(seen))

    def _training_molecules(self) -> tuple[list[str], list[str]]:
        """Names and SMILES of the vocabulary's molecules that have training cells."""
        state = self.perturbation_registry
        seen = self._seen_in_training()
        chosen = [
            (name, smiles)
            for name, smiles, is_seen in zip(
                state["vocabulary"], state["smiles"], seen, strict=True
            )
            if smiles and is_seen
        ]
        return [name for name, _ in chosen], [smiles for _, smiles in chosen]

    @keeps_adata_on_error("adata")
    @torch.inference_mode()
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
        """Counterfactual prediction: source cells (controls by default) under target conditions.

        Each source cell is encoded to its basal latent; the target's dose-scaled perturbation
        embeddings and covariate embeddings are added; the decoder gives the expression.

        Parameters
        ----------
        adata
            AnnData with the source cells (default: the model's AnnData). Its genes are
            matched to the model's by name (a reordered copy is used if the order differs;
            extra genes are ignored); missing genes are an error.
        target
            One or several conditions: a perturbation string (``"A+B"``), a dict with the
            registered obs keys (perturbation, dose, covariates, and ``smiles`` for molecules
            not in the training data), a list of those, or a DataFrame with one row per
            target. A target covariate restricts the source cells to that category; without
            it, each source cell keeps its own covariates. New molecules can be given as the
            perturbation itself (a SMILES string) or in the ``smiles`` column. Doses must
            be finite, non-negative and at most ``1e6`` (not clamped; see
            :meth:`setup_anndata`). Unknown perturbations or covariate values raise
            ``ValueError`` with close matches.
        source
            ``"control"``, a boolean mask or integer indices of the source cells.
        n_cells_per_target
            Randomly use at most this many source cells per target (seeded).
        library_size
            ``"observed"``: each source cell's total counts; a number: that library size for
            every cell (e.g. ``1e4`` for normalised expression). Counts likelihoods only.
        sample
            Draw from ``p(x | z)`` instead of returning its mean.
        repeat_sources
            When fewer source cells than ``n_cells_per_target`` match a target, use each of
            them several times so that the target still gets ``n_cells_per_target`` cells
            (all of them ``⌊n / n_sources⌋`` times, a seeded subsample once more). With
            ``sample=True`` every use is a new draw, so the predicted condition's statistics
            are estimated from more draws of the model's distribution; without sampling the
            repeats are identical.
        batch_size
            Cells per forward pass.
        seed
            Seed of the source-cell subsampling and of ``sample``.

        Returns
        -------
        AnnData ``(n_targets × n_source_cells, n_genes)`` of predicted expression (expected
        counts at the library size for counts likelihoods, log-normalised values for
        ``gaussian``). ``.obs`` holds ``source_cell``, the target perturbation, dose,
        covariates, ``condition``, and for molecules not in the training data their
        ``smiles``, ``max_tanimoto_to_training`` and ``nearest_training_drug``.
        """
        plan = self.plan_prediction(
            adata,
            target,
            source=source,
            n_cells_per_target=n_cells_per_target,
            library_size=library_size,
            repeat_sources=repeat_sources,
            batch_size=batch_size,
            seed=seed,
        )
        # Filled batch by batch: peak memory is the result plus one batch, not twice the result.
        predicted = np.empty((plan.n_cells, plan.adata.n_vars), dtype=np.float32)
        offset = 0
        for _, values in self.decode_prediction(
            plan, sample=sample, batch_size=batch_size, seed=seed
        ):
            predicted[offset : offset + len(values)] = values
            offset += len(values)
        obs = pd.concat(
            [self._target_obs(plan, t) for t in range(len(plan.target_rows))], ignore_index=True
        )
        obs = self._annotate_new_molecules(obs, plan.targets, self.smiles_column)
        obs.index = [f"pred_{i}" for i in range(len(obs))]
        for key in obs.columns:  # text columns (object, or pandas 3's str) as categories
            if pd.api.types.is_object_dtype(obs[key]) or pd.api.types.is_string_dtype(obs[key]):
                obs[key] = obs[key].astype(str).astype("category")
        result = AnnData(predicted, obs=obs, var=plan.adata.var[[]].copy())
        state = self.perturbation_registry
        result.uns["perturbx_prediction"] = {
            "likelihood": self.module.likelihood,
            "values": "samples" if sample else "expected",
            "library_size": library_size if library_size != "observed" else "observed",
            "control_value": state["control_value"],
            "perturbation_key": state["perturbation_key"],
            "dose_key": state["dose_key"] or "dose",
            "covariate_keys": list(self.covariate_categories),
        }
        return result

    def plan_prediction(
        self,
        adata: AnnData | None,
        target,
        *,
        source: str | np.ndarray,
        n_cells_per_target: int | None,
        library_size: Literal["observed"] | float,
        repeat_sources: bool,
        batch_size: int,
        seed: int,
    ) -> PredictionPlan:
        """Resolve the targets, encode the source cells and choose each target's source rows
        (arguments as in :meth:`predict`).
        """
        if repeat_sources and n_cells_per_target is None:
            raise ValueError("repeat_sources=True needs n_cells_per_target (cells per target).")
        check_prediction_arguments(
            n_cells_per_target,
            library_size,
            batch_size,
            self.module.likelihood in COUNT_LIKELIHOODS,
        )
        self.module.eval()
        targets = resolve_targets(
            target,
            self.perturbation_registry,
            self.covariate_categories,
            canonical_smiles,
            self.smiles_column,
            embeds_molecules=self._embeds_molecules,
        )
        extra = None
        if targets.new_smiles:
            extra = torch.from_numpy(self.featurizer(targets.new_smiles)).to(self.device)
        # Registered after the targets are checked, so a bad target leaves adata untouched.
        adata = self._validate_anndata(adata)
        sources = self._source_indices(adata, source)
        basal, library, covariates = self._encode_sources(adata, sources, batch_size)
        if library_size != "observed":
            library = torch.full_like(library, float(library_size))
        rng = np.random.default_rng(seed)
        target_rows = []
        for t in range(len(targets.obs)):
            rows = np.arange(len(sources))
            for c, code in enumerate(targets.covariate_codes[t]):
                if code != KEEP_SOURCE:
                    rows = rows[covariates[rows, c].numpy() == code]
            if len(rows) == 0:
                raise ValueError(
                    "No source cells match the covariates of target "
                    f"{targets.obs.iloc[t].to_dict()}."
                )
            if n_cells_per_target is not None and len(rows) > n_cells_per_target:
                rows = np.sort(rng.choice(rows, n_cells_per_target, replace=False))
            elif repeat_sources and len(rows) < n_cells_per_target:
                repeats, remainder = divmod(n_cells_per_target, len(rows))
                extra_rows = rng.choice(rows, remainder, replace=False)
                rows = np.sort(np.concatenate([np.repeat(rows, repeats), extra_rows]))
            target_rows.append(rows)
        return PredictionPlan(
            targets, extra, adata, sources, basal, library, covariates, target_rows
        )

    @torch.inference_mode()
    def decode_prediction(
        self, plan: PredictionPlan, *, sample: bool, batch_size: int, seed: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Decode ``plan`` batch by batch: yields ``(target, (n, G) float32 values)`` in
        target order, each target's cells in row order (``sample``: draws, else means).
        """
        generator = torch.Generator().manual_seed(seed)
        for t, rows in enumerate(plan.target_rows):
            codes = plan.targets.covariate_codes[t]
            for start in range(0, len(rows), batch_size):
                chunk = torch.from_numpy(rows[start : start + batch_size])
                n = len(chunk)
                index = torch.from_numpy(plan.targets.index[t]).expand(n, -1)
                dose = torch.from_numpy(plan.targets.dose[t]).expand(n, -1)
                cov = plan.covariates[chunk].clone()
                for c, code in enumerate(codes):
                    if code != KEEP_SOURCE:
                        cov[:, c] = int(code)
                px = self.module.generative(
                    plan.basal[chunk],
                    plan.library[chunk],
                    index,
                    dose,
                    cov if cov.shape[1] else None,
                    plan.extra,
                )["px"]
                if sample:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                    values = px.sample()
                else:
                    values = px.mean
                yield t, values.cpu().numpy().astype(np.float32, copy=False)

    def _target_obs(self, plan: PredictionPlan, t: int) -> pd.DataFrame:
        """``.obs`` of target ``t``'s predicted cells (before the new-molecule annotation)."""
        rows = plan.target_rows[t]
        categories = self.covariate_categories
        obs = pd.DataFrame({"source_cell": plan.adata.obs_names[plan.sources[rows]].to_numpy()})
        for key, value in plan.targets.obs.iloc[t].items():
            obs[key] = value
        for c, key in enumerate(categories):
            if plan.targets.covariate_codes[t][c] == KEEP_SOURCE:
                obs[key] = np.asarray(categories[key], dtype=object)[
                    plan.covariates[rows, c].numpy()
                ]
        return obs

    def _annotate_new_molecules(
        self, obs: pd.DataFrame, targets, smiles_column: str
    ) -> pd.DataFrame:
        """Tanimoto distance of each target's new molecules to the training drugs."""
        if not targets.new_smiles:
            return obs.drop(columns=[smiles_column])
        names, smiles = self._training_molecules()
        if not smiles:
            return obs
        nearest = nearest_reference(targets.new_smiles, smiles, names)
        similarity = dict(zip(targets.new_smiles, nearest["max_similarity"], strict=True))
        neighbour = dict(zip(targets.new_smiles, nearest["nearest_reference"], strict=True))
        # Bracket-aware split: charged atoms ("[N+]") contain "+" too.
        members = obs[smiles_column].map(
            lambda s: [m for m in split_smiles_combination(str(s)) if m] if s else []
        )
        # Several new members: report the one farthest from the training drugs.
        farthest = members.map(lambda ms: min(ms, key=similarity.get) if ms else None)
        obs["max_tanimoto_to_training"] = farthest.map(lambda m: similarity.get(m, np.nan))
        obs["nearest_training_drug"] = farthest.map(lambda m: neighbour.get(m, ""))
        return obs

    # ------------------------------------------------------------ embeddings and doses
    def _resolve_members(self, perturbations: Sequence[str]):
        """Vocabulary indices (or new-molecule indices) and fingerprints of new molecules."""
        state = self.perturbation_registry
        frame = pd.DataFrame({state["perturbation_key"]: list(perturbations)})
        targets = resolve_targets(
            frame,
            state,
            {},
            canonical_smiles,
            self.smiles_column,
            embeds_molecules=self._embeds_molecules,
        )
        if (targets.index > 0).sum(1).max() > 1:
            raise ValueError("Give single perturbations here, not combinations.")
        extra = None
        if targets.new_smiles:
            extra = torch.from_numpy(self.featurizer(targets.new_smiles)).to(self.device)
        return torch.from_numpy(targets.index[:, :1]), extra

    @torch.inference_mode()
    def get_perturbation_embeddings(
        self,
        perturbations: Sequence[str] | None = None,
        doses: float | Sequence[float] | None = None,
    ) -> pd.DataFrame:
        """Latent embedding of each perturbation, optionally scaled by its dose response.

        Parameters
        ----------
        perturbations
            Names from the vocabulary, or SMILES of any molecule (default: the vocabulary).
        doses
            ``None``: unscaled embeddings ``e_p``; a number or one dose per perturbation:
            ``s_p(d) · e_p``, the shift actually added to the latent.

        Returns
        -------
        DataFrame ``(n_perturbations, n_latent)`` indexed by perturbation.
        """
        self.module.eval()
        perturbations = self.perturbations if perturbations is None else list(perturbations)
        index, extra = self._resolve_members(perturbations)
        embedding = self.module.perturbation_embedding(index, extra)[:, 0]
        if doses is not None:
            values = checked_doses(doses, "doses", n_values=len(perturbations))
            dose = torch.as_tensor(np.broadcast_to(values.astype(np.float32), (len(index),)).copy())
            scale = self.module.dose_response(index, dose.unsqueeze(1), extra)
            embedding = embedding * scale
        return pd.DataFrame(
            embedding.cpu().numpy(), index=pd.Index(perturbations, name="perturbation")
        )

    @torch.inference_mode()
    def get_dose_response(self, perturbation: str, doses: Sequence[float]) -> np.ndarray:
        """Dose-response scale ``s_p(d)`` of one perturbation (name or SMILES) at ``doses``.

        Returns
        -------
        ``(len(doses),)`` array: the factor multiplying the perturbation's embedding.
        """
        values = checked_doses(doses, "doses")
        self.module.eval()
        index, extra = self._resolve_members([perturbation])
        dose = torch.as_tensor(values.astype(np.float32)).reshape(-1, 1)
        return (
            self.module.dose_response(index.expand(len(dose), 1), dose, extra)[:, 0].cpu().numpy()
        )
