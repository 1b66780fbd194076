"""The PerturbX module: a compositional perturbation autoencoder (torch, no AnnData).

inference:  x ──encoder──► basal latent z_b
generative: z = z_b + Σ_k dose_response(d_k) · embed(p_k) + Σ_c embed_c(covariate_c)
            z ──decoder──► p(x | z)   (NB / ZINB for counts, Gaussian for log-normalised data)
            (linear_shift_head: the decoder's hidden layers see z_b + Σ_c embed_c only, and
            the perturbation shift is added to its output through a linear map)
loss:       −log p(x | z) (+ KL if variational); adversaries are scored on z_b's
            posterior mean (cross-entropy for them, confusion for the autoencoder)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn
from torch.distributions import Normal, kl_divergence

from perturbx.data._fields import NO_LABEL, PERTURBATIONS_KEY
from perturbx.module._layers import (
    Adversary,
    DoseResponse,
    DoseResponseKind,
    PerturbationEmbedding,
    hidden_layers,
    mlp,
)
from perturbx.module._likelihood import negative_binomial_log_likelihood

Likelihood = Literal["nb", "zinb", "gaussian"]
UnseenMolecules = Literal["encoder", "ridge"]
UNSEEN_MOLECULES: tuple[str, ...] = ("encoder", "ridge")
LIKELIHOODS: tuple[str, ...] = ("nb", "zinb", "gaussian")
COUNT_LIKELIHOODS: tuple[str, ...] = ("nb", "zinb")
_MIN_VARIANCE = 1e-4


class AdversaryLosses(NamedTuple):
    """Output of :meth:`PerturbXModule.adversary_losses`."""

    cross_entropy: torch.Tensor
    confusion: torch.Tensor
    accuracy: dict[str, torch.Tensor]


def split_perturbations(packed: torch.Tensor):
    """Unpack the registered ``(B, 1 + 2K)`` perturbation array.

    Returns ``(label (B,), index (B, K) long, dose (B, K))``.
    """
    width = (packed.shape[1] - 1) // 2
    label = packed[:, 0].long()
    index = packed[:, 1 : 1 + width].long()
    dose = packed[:, 1 + width :]
    return label, index, dose


class PerturbXModule(BaseModuleClass):
    """Compositional autoencoder with chemistry-aware perturbation embeddings.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    fingerprints
        ``(P, F)`` fingerprint matrix of the perturbation vocabulary (zeros where a
        perturbation has no structure).
    has_structure
        ``(P,)`` bool: which perturbations are embedded from their fingerprint.
    n_labels
        Number of perturbation-set classes for the perturbation adversary.
    n_cats_per_covariate
        Number of categories of each covariate.
    covariate_names
        Names of the covariates (used in logged metric names).
    likelihood
        ``"nb"``, ``"zinb"`` (counts) or ``"gaussian"`` (log-normalised data).
    n_latent, n_hidden, n_layers
        Latent size and encoder/decoder width and depth.
    variational
        If True, the basal latent is sampled from ``N(mu, sigma)`` with a KL term.
    dose_response
        See :class:`perturbx.module.DoseResponse`.
    linear_shift_head
        Decode the perturbation shift ``s = Σ_k s_k(d_k) e_k`` linearly: the decoder's hidden
        layers see ``z_b + Σ_c e_c`` and the output (NB log-scale logits / Gaussian mean) is
        ``head(body(z_b + Σ_c e_c)) + W s``. A perturbation then moves every cell's
        log-rates by the same vector, effects interpolate as embeddings do, and combinations
        are additive in log-rate space. (ZINB: the zero-inflation does not depend on the
        perturbation.)
    unseen_molecules
        ``"encoder"``: molecules without training cells are embedded by the drug encoder;
        ``"ridge"``: by :class:`perturbx.module.FingerprintRidge` maps (embedding and
        dose-response parameters) fitted with :meth:`fit_unseen_molecule_ridge` after
        training.
    """

    def __init__(
        self,
        n_genes: int,
        fingerprints: torch.Tensor,
        has_structure: torch.Tensor,
        n_labels: int,
        n_cats_per_covariate: list[int],
        covariate_names: list[str] | None = None,
        likelihood: Likelihood = "nb",
        n_latent: int = 128,
        n_hidden: int = 256,
        n_layers: int = 3,
        dropout_rate: float = 0.0,
        variational: bool = True,
        dose_response: DoseResponseKind = "amortized",
        drug_encoder_hidden: int = 256,
        drug_encoder_layers: int = 2,
        adversary_hidden: int = 64,
        adversary_layers: int = 3,
        linear_shift_head: bool = False,
        unseen_molecules: UnseenMolecules = "encoder",
    ):
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"n_layers={n_layers!r} must be >= 0.")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not one of {LIKELIHOODS}.")
        if unseen_molecules not in UNSEEN_MOLECULES:
            raise ValueError(
                f"unseen_molecules={unseen_molecules!r} is not one of {UNSEEN_MOLECULES}."
            )
        if unseen_molecules == "ridge" and not bool(has_structure.any()):
            raise ValueError(
                "unseen_molecules='ridge' embeds molecules from their fingerprints, but no "
                "perturbation has a SMILES (setup_anndata(..., smiles_key=...))."
            )
        self.unseen_molecules = unseen_molecules
        self.n_genes = n_genes
        self.n_latent = n_latent
        self.likelihood = likelihood
        self.variational = variational
        self.covariate_names = list(
            covariate_names or [f"covariate_{i}" for i in range(len(n_cats_per_covariate))]
        )
        self.encoder = mlp(
            n_genes, n_latent * (2 if variational else 1), n_hidden, n_layers, dropout_rate
        )
        self.decoder_body = hidden_layers(n_latent, n_hidden, n_layers, dropout_rate)
        decoder_width = n_hidden if n_layers else n_latent  # n_layers=0: a linear decoder
        if likelihood in COUNT_LIKELIHOODS:
            self.scale_head = nn.Linear(decoder_width, n_genes)
            self.log_dispersion = nn.Parameter(torch.zeros(n_genes))
            self.dropout_head = nn.Linear(decoder_width, n_genes) if likelihood == "zinb" else None
        else:
            self.mean_head = nn.Linear(decoder_width, n_genes)
            # Gene-wise variance, like the NB's gene-wise dispersion: a per-cell variance head
            # learned to mark the (mostly zero) entries with tiny variances and left the mean
            # flat across cells on log-normalised sparse data.
            self.log_variance = nn.Parameter(torch.zeros(n_genes))
        # No bias: a zero shift (control cells) must leave the decoder's output unchanged.
        self.shift_head = nn.Linear(n_latent, n_genes, bias=False) if linear_shift_head else None
        ridge = unseen_molecules == "ridge"
        self.perturbation_embedding = PerturbationEmbedding(
            fingerprints,
            has_structure,
            n_latent,
            drug_encoder_hidden,
            drug_encoder_layers,
            unseen_ridge=ridge,
        )
        self.dose_response = DoseResponse(
            dose_response, fingerprints, has_structure, unseen_ridge=ridge
        )
        self.covariate_embeddings = nn.ModuleList(
            [nn.Embedding(n, n_latent) for n in n_cats_per_covariate]
        )
        self.perturbation_adversary = Adversary(
            n_latent, n_labels, adversary_hidden, adversary_layers
        )
        self.covariate_adversaries = nn.ModuleList(
            [
                Adversary(n_latent, n, adversary_hidden, adversary_layers)
                for n in n_cats_per_covariate
            ]
        )

    # ----------------------------------------------------------------- parameter groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning rate: autoencoder, dose response, NB dispersion, adversaries.

        ``dispersion`` holds the gene-wise inverse dispersion of counts likelihoods (empty
        for ``gaussian``).
        """
        dose = list(self.dose_response.parameters())
        dispersion = [self.log_dispersion] if self.likelihood in COUNT_LIKELIHOODS else []
        adversary = list(self.perturbation_adversary.parameters()) + list(
            self.covariate_adversaries.parameters()
        )
        taken = {id(p) for p in dose + dispersion + adversary}
        autoencoder = [p for p in self.parameters() if id(p) not in taken]
        return {
            "autoencoder": autoencoder,
            "dose_response": dose,
            "dispersion": dispersion,
            "adversary": adversary,
        }

    # ------------------------------------------------------------ unseen molecules
    @torch.no_grad()
    def fit_unseen_molecule_ridge(self, seen: torch.Tensor) -> None:
        """Fit the ridge maps of ``unseen_molecules="ridge"`` on the molecules in ``seen``.

        The targets are the trained drug encoder's embeddings and the dose-response
        parameters of the vocabulary's molecules that have training cells; the maps then
        stand in for the network for every other molecule (vocabulary rows without training
        cells, and query SMILES) in evaluation mode.

        Parameters
        ----------
        seen
            ``(P,)`` bool: vocabulary entries with training cells.
        """
        if self.unseen_molecules != "ridge":
            raise ValueError("This module was built with unseen_molecules='encoder'.")
        embedding, dose_response = self.perturbation_embedding, self.dose_response
        seen = seen.to(embedding.has_structure.device).bool()
        rows = torch.nonzero(embedding.has_structure & seen).squeeze(-1)
        if len(rows) < 2:
            raise ValueError(
                f"unseen_molecules='ridge' needs at least 2 molecules with training cells; "
                f"the training cells hold {len(rows)}."
            )
        was_training = self.training
        self.eval()
        fingerprints = embedding.fingerprints[rows]
        embedding.unseen_ridge.fit(fingerprints, embedding.drug_encoder(fingerprints), ~seen)
        dose_response.unseen_ridge.fit(fingerprints, dose_response.parameters_for(rows + 1), ~seen)
        self.train(was_training)

    def reset_unseen_molecule_ridge(self) -> None:
        """Forget the ridge maps (the network embeds every molecule, e.g. while training)."""
        for part in (self.perturbation_embedding, self.dose_response):
            if part.unseen_ridge is not None:
                part.unseen_ridge.reset()

    # ----------------------------------------------------------------------- inference
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    def encode(self, tensors: dict) -> dict:
        """:meth:`inference` of a minibatch of registered tensors (basal latent, library)."""
        return self.inference(**self._get_inference_input(tensors))

    @auto_move_data
    def inference(self, x: torch.Tensor, n_samples: int = 1) -> dict:
        """Encode expression ``x`` ``(B, G)`` to the basal latent ``(B, L)``.

        Counts are log1p-transformed first; the library size (total counts) is kept for
        the decoder.
        """
        library = x.sum(-1, keepdim=True)
        h = self.encoder(torch.log1p(x) if self.likelihood in COUNT_LIKELIHOODS else x)
        if not self.variational:
            return {"basal_latent": h, "library": library, "qz": None}
        mean, raw_var = h.chunk(2, dim=-1)
        # No argument validation: non-finite values must reach the training plan's check,
        # which names the loss term and epoch, instead of failing here without context.
        qz = Normal(mean, F.softplus(raw_var).add(_MIN_VARIANCE).sqrt(), validate_args=False)
        basal = qz.rsample() if self.training else mean
        return {"basal_latent": basal, "library": library, "qz": qz}

    # ---------------------------------------------------------------------- generative
    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        _, index, dose = split_perturbations(tensors[PERTURBATIONS_KEY])
        covariates = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        return {
            "basal_latent": inference_outputs["basal_latent"],
            "library": inference_outputs["library"],
            "perturbation_index": index,
            "dose": dose,
            "covariates": covariates,
        }

    def perturbation_latent(
        self,
        perturbation_index: torch.Tensor,
        dose: torch.Tensor,
        extra_fingerprints: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Σ_k s_k(d_k) · e_k: the latent shift ``(B, L)`` of ``(B, K)`` indices and doses."""
        embedding = self.perturbation_embedding(perturbation_index, extra_fingerprints)
        scale = self.dose_response(perturbation_index, dose, extra_fingerprints)
        return (scale.unsqueeze(-1) * embedding).sum(1)

    def covariate_latent(self, covariates: torch.Tensor | None) -> torch.Tensor | float:
        """Σ_c embed_c(covariate_c) for ``(B, C)`` category codes (0 if no covariates)."""
        if covariates is None or not len(self.covariate_embeddings):
            return 0.0
        codes = covariates.long()
        return sum(emb(codes[:, i]) for i, emb in enumerate(self.covariate_embeddings))

    @auto_move_data
    def generative(
        self,
        basal_latent: torch.Tensor,
        library: torch.Tensor,
        perturbation_index: torch.Tensor,
        dose: torch.Tensor,
        covariates: torch.Tensor | None = None,
        extra_fingerprints: torch.Tensor | None = None,
    ) -> dict:
        """Add perturbation and covariate effects to the basal latent and decode ``p(x | z)``."""
        perturbation_shift = self.perturbation_latent(perturbation_index, dose, extra_fingerprints)
        covariate_shift = self.covariate_latent(covariates)
        latent = basal_latent + perturbation_shift + covariate_shift
        if self.shift_head is None:
            h = self.decoder_body(latent)
        else:
            h = self.decoder_body(basal_latent + covariate_shift)
        outputs = {"latent": latent, "perturbation_shift": perturbation_shift}
        if self.likelihood in COUNT_LIKELIHOODS:
            scale_logits = self._plus_linear_effect(self.scale_head(h), perturbation_shift)
            outputs["decoder_output"] = scale_logits
            log_scale = torch.log_softmax(scale_logits, dim=-1)
            log_rate = torch.log(library) + log_scale
            rate = log_rate.exp()
            theta = self.log_dispersion.exp()
            if self.likelihood == "zinb":
                px = ZeroInflatedNegativeBinomial(
                    mu=rate, theta=theta, zi_logits=self.dropout_head(h), scale=log_scale.exp()
                )
            else:
                px = NegativeBinomial(mu=rate, theta=theta)
                outputs["log_rate"] = log_rate
        else:
            scale = (self.log_variance.exp() + _MIN_VARIANCE).sqrt()
            mean = self._plus_linear_effect(self.mean_head(h), perturbation_shift)
            outputs["decoder_output"] = mean
            px = Normal(mean, scale.expand(h.shape[0], -1))
        outputs["px"] = px
        return outputs

    def _plus_linear_effect(self, output: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``output + W shift`` with ``linear_shift_head``, else ``output`` itself (no copy:
        it is a (B, G) tensor).
        """
        return output if self.shift_head is None else output + self.shift_head(shift)

    def _decoder_output(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoder's ``(B, G)`` output for latents ``(B, L)``: NB/ZINB log-scale logits
        (before the softmax over genes) or the Gaussian mean.
        """
        h = self.decoder_body(latent)
        return self.scale_head(h) if self.likelihood in COUNT_LIKELIHOODS else self.mean_head(h)

    def embedding_linearity_penalty(self, generative_outputs: dict) -> torch.Tensor:
        """How far the decoder is from linear between the minibatch's perturbation shifts.

        Each cell ``i`` (latent ``z_i = basal_i + cov_i + shift_i``) is paired with a random
        other cell ``j`` of the minibatch and a weight ``w ~ U(0, 1)``; with ``z'_i`` the latent
        of cell ``i`` carrying ``j``'s perturbation shift and ``g`` the decoder output (counts:
        log-scale logits centred over genes, since the softmax ignores a per-cell constant;
        Gaussian: the mean), the penalty is the mean over cells of
        ``‖g(w z_i + (1 - w) z'_i) - w g(z_i) - (1 - w) g(z'_i)‖²`` (summed over genes).
        It is zero for a decoder that is linear in the perturbation shift, so that an unseen
        drug whose embedding interpolates between training drugs' gets the interpolation of
        their effects. Costs two extra decoder passes.

        Parameters
        ----------
        generative_outputs
            Output of :meth:`generative` (``latent``, ``perturbation_shift``,
            ``decoder_output``).

        Returns
        -------
        Scalar tensor (log-scale units squared, summed over genes).
        """
        if self.shift_head is not None:
            raise ValueError(
                "The linearity penalty does not apply with linear_shift_head=True: the decoder "
                "is linear in the perturbation shift by construction."
            )
        latent = generative_outputs["latent"]
        shift = generative_outputs["perturbation_shift"]
        own = generative_outputs["decoder_output"]
        partner = torch.randperm(latent.shape[0], device=latent.device)
        weight = torch.rand(latent.shape[0], 1, device=latent.device, dtype=latent.dtype)
        swapped = latent - shift + shift[partner]
        mixed = weight * latent + (1 - weight) * swapped
        residual = (
            self._decoder_output(mixed)
            - weight * own
            - (1 - weight) * self._decoder_output(swapped)
        )
        if self.likelihood in COUNT_LIKELIHOODS:
            residual = residual - residual.mean(-1, keepdim=True)
        return residual.pow(2).sum(-1).mean()

    # ---------------------------------------------------------------------------- loss
    def adversary_latent(self, inference_outputs: dict) -> torch.Tensor:
        """What the adversaries see: the basal latent's posterior mean ``(B, L)``.

        Not a sample: the information the encoder leaves in the mean can sit below the
        sampling noise, where adversaries trained on samples miss it, while
        :meth:`~perturbx.PerturbX.get_latent_representation` returns the mean. With
        ``variational=False`` the mean is the basal latent.
        """
        qz = inference_outputs["qz"]
        return inference_outputs["basal_latent"] if qz is None else qz.loc

    def adversary_losses(self, basal_latent: torch.Tensor, tensors: dict) -> AdversaryLosses:
        """The adversaries' cross-entropy and confusion on ``basal_latent`` ``(B, L)``.

        Cells whose label is missing (``NO_LABEL``) are left out of an adversary's terms.

        Returns
        -------
        :class:`AdversaryLosses`: ``cross_entropy`` (summed over adversaries, the
        adversaries' objective), ``confusion`` (summed over adversaries, the autoencoder's:
        the mean KL divergence from the minibatch's label frequencies to an adversary's
        predicted distribution, zero when it predicts the label mix for every cell, i.e.
        cannot tell the cells apart) and ``accuracy`` per adversary.
        """
        label, _, _ = split_perturbations(tensors[PERTURBATIONS_KEY])
        targets = [("perturbation", self.perturbation_adversary, label)]
        covariates = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        for i, adversary in enumerate(self.covariate_adversaries):
            targets.append((self.covariate_names[i], adversary, covariates[:, i].long()))
        cross_entropy = basal_latent.new_zeros(())
        confusion = basal_latent.new_zeros(())
        accuracy = {}
        for name, adversary, target in targets:
            valid = target != NO_LABEL
            n_valid = valid.sum()
            if not n_valid:
                continue
            logits = adversary(basal_latent)
            log_p = F.log_softmax(logits, dim=-1)
            # ignore_index instead of selecting the labelled rows: no copies, same mean.
            cross_entropy = cross_entropy + F.nll_loss(log_p, target, ignore_index=NO_LABEL)
            frequency = torch.bincount(target[valid], minlength=logits.shape[-1])
            frequency = frequency.to(log_p.dtype) / n_valid
            # KL(frequency || p) = Σ_c f_c (log f_c − log p_c), with 0 · log 0 = 0.
            kl = (torch.xlogy(frequency, frequency) - frequency * log_p).sum(-1)
            confusion = confusion + (kl * valid).sum() / n_valid
            accuracy[name] = ((logits.argmax(-1) == target) & valid).sum() / n_valid
        return AdversaryLosses(cross_entropy, confusion, accuracy)

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative log-likelihood summed over genes (+ weighted KL), averaged over cells.

        The adversarial terms live in the training plan (:meth:`adversary_losses`).
        """
        x = tensors[REGISTRY_KEYS.X_KEY]
        if "log_rate" in generative_outputs:
            reconstruction = -negative_binomial_log_likelihood(
                x, generative_outputs["log_rate"], self.log_dispersion
            )
        else:
            reconstruction = -generative_outputs["px"].log_prob(x).sum(-1)
        qz = inference_outputs["qz"]
        if qz is not None:
            prior = Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale), validate_args=False)
            kl = kl_divergence(qz, prior).sum(-1)
        else:
            kl = torch.zeros_like(reconstruction)
        return LossOutput(
            loss=torch.mean(reconstruction + kl_weight * kl),
            reconstruction_loss=reconstruction,
            kl_local=kl,
        )

    @torch.inference_mode()
    def sample(self, tensors: dict, n_samples: int = 1) -> torch.Tensor:
        """Sample expression ``(n_samples, B, G)`` for the registered conditions of ``tensors``."""
        _, generative_outputs = self.forward(tensors, compute_loss=False)
        return generative_outputs["px"].sample((n_samples,))
