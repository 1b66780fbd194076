"""The math: the compositional autoencoder, its layers and its likelihoods (torch, no AnnData).

:class:`PerturbXModule` implements scvi-tools' ``inference`` / ``generative`` / ``loss``; the
layers it is built from (perturbation embeddings, dose responses, adversaries, the
fingerprint ridge) and the negative binomial log-likelihood live beside it.
"""

from perturbx.module._layers import (
    DOSE_RESPONSES,
    RIDGE_PENALTY,
    Adversary,
    DoseResponse,
    DoseResponseKind,
    FingerprintRidge,
    PerturbationEmbedding,
    hidden_layers,
    mlp,
)
from perturbx.module._likelihood import negative_binomial_log_likelihood
from perturbx.module._module import (
    COUNT_LIKELIHOODS,
    LIKELIHOODS,
    UNSEEN_MOLECULES,
    AdversaryLosses,
    PerturbXModule,
    split_perturbations,
)

__all__ = [
    "COUNT_LIKELIHOODS",
    "DOSE_RESPONSES",
    "LIKELIHOODS",
    "RIDGE_PENALTY",
    "UNSEEN_MOLECULES",
    "Adversary",
    "AdversaryLosses",
    "DoseResponse",
    "DoseResponseKind",
    "FingerprintRidge",
    "PerturbXModule",
    "PerturbationEmbedding",
    "hidden_layers",
    "mlp",
    "negative_binomial_log_likelihood",
    "split_perturbations",
]
