"""Building blocks of the PerturbX module: perturbation embeddings, dose responses, adversaries.

Shapes use ``B`` for cells in a minibatch, ``K`` for members of a combination, ``P`` for the
perturbation vocabulary, ``L`` for the latent size and ``F`` for fingerprint bits.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import Ridge
from torch import nn

DoseResponseKind = Literal["logsigm", "sigm", "linear", "mlp", "amortized"]
DOSE_RESPONSES: tuple[str, ...] = ("logsigm", "sigm", "linear", "mlp", "amortized")
_MLP_CODE_SIZE = 4  # per-perturbation code fed to the shared dose-response MLP
#: Penalty of :class:`FingerprintRidge`, in units of the training fingerprints' mean squared
#: distance to their centroid (the mean diagonal of the centred linear kernel): close to the
#: minimum-norm interpolation of the training molecules. Leave-one-out over the training
#: molecules' embeddings chose 10 instead (it finds them barely predictable), which shrank
#: held-out drugs to the average drug and predicted them worse on the simulator
#: (``docs/notes/benchmark_notes.md``, "The linear shift head and ridge embeddings as options").
RIDGE_PENALTY: float = 1e-3


def hidden_layers(
    n_in: int, n_hidden: int, n_layers: int, dropout_rate: float = 0.0
) -> nn.Sequential:
    """``n_layers`` layers Linear → LayerNorm → ReLU (→ Dropout), ending at ``n_hidden`` units.

    The layers of scvi's ``FCLayers(use_layer_norm=True, use_batch_norm=False)``, without its
    covariate injection, whose concatenation copies every layer's input on every call.
    """
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Linear(n_in if i == 0 else n_hidden, n_hidden),
            nn.LayerNorm(n_hidden, elementwise_affine=False),
            nn.ReLU(),
        ]
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
    return nn.Sequential(*layers)


def mlp(
    n_in: int,
    n_out: int,
    n_hidden: int,
    n_layers: int,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """``n_layers`` hidden layers (Linear → LayerNorm → ReLU → Dropout) and a linear output."""
    if n_layers == 0:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(
        hidden_layers(n_in, n_hidden, n_layers, dropout_rate), nn.Linear(n_hidden, n_out)
    )


class FingerprintRidge(nn.Module):
    """Ridge regression from fingerprints to vectors, for molecules without training cells.

    Fitted in closed form (:meth:`fit`, scikit-learn's ``Ridge`` with the relative penalty
    :data:`RIDGE_PENALTY`), not by gradient: the targets are what the trained network gives
    the training molecules (drug-encoder embeddings, dose-response parameters), and the map
    replaces the network for the vocabulary rows in ``applies_to`` and for query molecules.
    A molecule is placed by linear interpolation between the training molecules' values
    (through its fingerprint's projection on theirs), where an MLP extrapolates freely.
    Everything is kept in buffers, so :meth:`PerturbX.save` keeps it.

    Parameters
    ----------
    n_vocab
        Vocabulary size ``P``.
    n_bits
        Fingerprint length ``F``.
    n_out
        Output size ``D``.
    """

    def __init__(self, n_vocab: int, n_bits: int, n_out: int):
        super().__init__()
        self.register_buffer("coef", torch.zeros(n_bits, n_out))
        self.register_buffer("intercept", torch.zeros(n_out))
        self.register_buffer("penalty", torch.zeros(()))
        self.register_buffer("applies_to", torch.zeros(n_vocab, dtype=torch.bool))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(
        self, fingerprints: torch.Tensor, values: torch.Tensor, applies_to: torch.Tensor
    ) -> None:
        """Fit on ``(n, F)`` fingerprints and ``(n, D)`` values of ``n >= 2`` molecules.

        ``applies_to`` ``(P,)`` bool marks the vocabulary rows the map then stands in for.
        """
        x = fingerprints.detach().cpu().double().numpy()
        y = values.detach().cpu().double().numpy()
        if len(x) < 2:
            raise ValueError(f"A fingerprint ridge needs at least 2 molecules, got {len(x)}.")
        spread = float(((x - x.mean(0)) ** 2).sum(1).mean())
        penalty = RIDGE_PENALTY * (spread if spread > 0 else 1.0)
        ridge = Ridge(alpha=penalty).fit(x, y)
        self.coef.copy_(torch.from_numpy(ridge.coef_.T.copy()))
        self.intercept.copy_(torch.from_numpy(np.asarray(ridge.intercept_)))
        self.penalty.fill_(penalty)
        self.applies_to.copy_(applies_to)
        self.fitted.fill_(True)

    def reset(self) -> None:
        """Forget the fit (the network is used for every molecule again)."""
        self.fitted.fill_(False)

    def forward(self, fingerprints: torch.Tensor) -> torch.Tensor:
        """``(n, F)`` fingerprints → ``(n, D)`` predictions."""
        return fingerprints.to(self.coef.dtype) @ self.coef + self.intercept


def _active(ridge: FingerprintRidge | None, training: bool) -> FingerprintRidge | None:
    """The ridge if it is fitted and the module is in evaluation mode, else ``None``."""
    if ridge is None or training or not bool(ridge.fitted):
        return None
    return ridge


def _structures(
    unique: torch.Tensor,
    fingerprints: torch.Tensor,
    has_structure: torch.Tensor,
    extra_fingerprints: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fingerprints of distinct indices ``(U,)`` (``0`` empty, ``1..P`` vocabulary, ``P+1..``
    rows of ``extra_fingerprints``).

    Returns ``(fingerprints (U, F), structured (U,), in_vocabulary (U,), vocabulary_row (U,))``:
    ``structured`` marks the vocabulary molecules and the query rows (when
    ``extra_fingerprints`` is given), the entries the fingerprint networks embed; the other
    rows hold an arbitrary vocabulary fingerprint, to be masked out by the caller.
    ``vocabulary_row`` is the row of ``fingerprints`` (clamped to the vocabulary).
    """
    n_vocab = fingerprints.shape[0]
    vocabulary_row = (unique - 1).clamp(0, n_vocab - 1)
    in_vocabulary = (unique >= 1) & (unique <= n_vocab)
    fps = fingerprints[vocabulary_row]
    structured = has_structure[vocabulary_row] & in_vocabulary
    if extra_fingerprints is not None and len(extra_fingerprints):
        extra = unique > n_vocab
        query = extra_fingerprints[(unique - n_vocab - 1).clamp(0, len(extra_fingerprints) - 1)]
        fps = torch.where(extra.unsqueeze(-1), query.to(fps.dtype), fps)
        structured = structured | extra
    return fps, structured, in_vocabulary, vocabulary_row


class PerturbationEmbedding(nn.Module):
    """Latent vectors of the perturbation vocabulary.

    Perturbations with a structure are embedded by a trainable MLP of their Morgan
    fingerprint (the *drug encoder*); the others (genes, drugs without SMILES) by a learned
    table. Index ``0`` is the empty slot and embeds to zero.

    Parameters
    ----------
    fingerprints
        ``(P, F)`` fingerprints of the vocabulary; rows of perturbations without SMILES are
        ignored (``has_structure`` is False for them).
    has_structure
        ``(P,)`` bool.
    n_latent, n_hidden, n_layers, dropout_rate
        Embedding size and the drug encoder's width, depth and dropout.
    unseen_ridge
        Keep a :class:`FingerprintRidge` (``unseen_ridge``) that, once fitted, embeds
        molecules without training cells in evaluation mode instead of the drug encoder.
    """

    def __init__(
        self,
        fingerprints: torch.Tensor,
        has_structure: torch.Tensor,
        n_latent: int,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
        unseen_ridge: bool = False,
    ):
        super().__init__()
        n_vocab, n_bits = fingerprints.shape
        self.register_buffer("fingerprints", fingerprints.float())
        # A copy: .bool() of a bool tensor is the same tensor, which the dose response also
        # holds; switching a row to the learned table here must not switch its dose response.
        self.register_buffer("has_structure", has_structure.bool().clone())
        self.token_embedding = nn.Embedding(n_vocab + 1, n_latent)
        nn.init.normal_(self.token_embedding.weight, std=0.1)
        self.drug_encoder = (
            mlp(n_bits, n_latent, n_hidden, n_layers, dropout_rate) if has_structure.any() else None
        )
        self.unseen_ridge = FingerprintRidge(n_vocab, n_bits, n_latent) if unseen_ridge else None

    @property
    def n_vocab(self) -> int:
        return self.fingerprints.shape[0]

    def forward(self, index: torch.Tensor, extra_fingerprints: torch.Tensor | None = None):
        """Embed vocabulary indices.

        Parameters
        ----------
        index
            Integer tensor of any shape; ``0`` = empty, ``1..P`` = vocabulary,
            ``P+1..P+Q`` = rows of ``extra_fingerprints`` (molecules not in the vocabulary).
        extra_fingerprints
            ``(Q, F)`` fingerprints of query molecules.

        Returns
        -------
        ``index.shape + (L,)`` embeddings.

        Raises
        ------
        ValueError
            For indices above ``P`` in a model without a drug encoder.
        IndexError
            For indices above ``P`` without ``extra_fingerprints``.
        """
        unique, inverse = torch.unique(index, return_inverse=True)
        # Embed each distinct perturbation of the batch once, then broadcast to cells.
        table = self.token_embedding(unique.clamp(max=self.n_vocab))
        fps, structured, in_vocabulary, row = _structures(
            unique, self.fingerprints, self.has_structure, extra_fingerprints
        )
        if bool((unique > self.n_vocab).any()):
            if self.drug_encoder is None:
                raise ValueError("This model has no drug encoder (it was set up without SMILES).")
            if extra_fingerprints is None or not len(extra_fingerprints):
                raise IndexError(
                    f"Perturbation indices above the vocabulary ({self.n_vocab}) need "
                    "extra_fingerprints."
                )
        if self.drug_encoder is not None:
            # Every distinct entry goes through the encoder and the table keeps the structured
            # ones: cheaper than selecting rows, which would copy at every step.
            # Under autocast (bf16-mixed) the encoder's output is bf16; the table is float32.
            encoded = self.drug_encoder(fps).to(table.dtype)
            ridge = _active(self.unseen_ridge, self.training)
            if ridge is not None:
                by_ridge = (ridge.applies_to[row] & in_vocabulary) | (structured & ~in_vocabulary)
                encoded = torch.where(by_ridge.unsqueeze(-1), ridge(fps).to(table.dtype), encoded)
            table = torch.where(structured.unsqueeze(-1), encoded, table)
        table = table * (unique != 0).unsqueeze(-1)
        return table[inverse]


class DoseResponse(nn.Module):
    """Scale factor ``s(d)`` of each perturbation's embedding at dose ``d`` (µM or any unit).

    ``logsigm``: ``sigmoid(a·log1p(d) + b)``; ``sigm``: ``sigmoid(a·d + b)``;
    ``linear``: ``a·d``; ``mlp``: a shared MLP of ``(log1p(d), code_p)`` with a learned code
    per perturbation; ``amortized``: ``logsigm`` whose ``(a, b)`` for molecules are computed
    from the fingerprint, so a molecule never seen in training has a dose response too
    (perturbations without structure keep learned ``(a, b)``). Every kind gives exactly
    ``s(0) = 0``: a perturbation at dose 0 is no perturbation (the curves themselves are not
    0 there), so a prediction at dose 0 equals the control's.
    Parameters of molecules not in the vocabulary, for the non-amortised kinds, are the mean
    over the vocabulary's molecules. With ``unseen_ridge``, a fitted :class:`FingerprintRidge`
    gives the parameters of molecules without training cells (in evaluation mode) instead.
    """

    def __init__(
        self,
        kind: DoseResponseKind,
        fingerprints: torch.Tensor,
        has_structure: torch.Tensor,
        n_hidden: int = 64,
        unseen_ridge: bool = False,
    ):
        super().__init__()
        if kind not in DOSE_RESPONSES:
            raise ValueError(f"dose_response={kind!r} is not one of {DOSE_RESPONSES}.")
        self.kind = kind
        n_vocab, n_bits = fingerprints.shape
        n_params = _MLP_CODE_SIZE if kind == "mlp" else (1 if kind == "linear" else 2)
        init = torch.zeros(n_vocab + 1, n_params)
        if kind == "linear":
            init[:, 0] = 1.0
        elif kind != "mlp":
            init[:, 0] = 1.0  # slope a; offset b = 0 gives s(0) = 0.5 for sigm, 0.5 for logsigm
        self.params = nn.Parameter(init)
        self.register_buffer("has_structure", has_structure.bool().clone())
        self.shared_mlp = mlp(1 + _MLP_CODE_SIZE, 1, n_hidden, 1) if kind == "mlp" else None
        self.amortizer = (
            mlp(n_bits, 2, n_hidden, 1) if kind == "amortized" and has_structure.any() else None
        )
        self.register_buffer("fingerprints", fingerprints.float())
        self.unseen_ridge = FingerprintRidge(n_vocab, n_bits, n_params) if unseen_ridge else None

    @property
    def n_vocab(self) -> int:
        return self.fingerprints.shape[0]

    def parameters_for(self, index: torch.Tensor, extra_fingerprints: torch.Tensor | None = None):
        """Per-slot dose-response parameters, ``index.shape + (n_params,)``."""
        # Compute each distinct index of the batch once: running the amortiser over the whole
        # vocabulary on every step would make a step's cost grow with the compound library.
        unique, inverse = torch.unique(index, return_inverse=True)
        return self._distinct_parameters(unique, extra_fingerprints)[inverse]

    def _distinct_parameters(
        self, unique: torch.Tensor, extra_fingerprints: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Parameters ``(U, n_params)`` of distinct indices (0 = empty slot)."""
        table = self.params[unique.clamp(max=self.n_vocab)]
        fps, structured, in_vocabulary, row = _structures(
            unique, self.fingerprints, self.has_structure, extra_fingerprints
        )
        query = structured & ~in_vocabulary
        if self.amortizer is not None:
            amortized = (self.amortizer(fps) + self._offset()).to(table.dtype)
            table = torch.where(structured.unsqueeze(-1), amortized, table)
        ridge = _active(self.unseen_ridge, self.training)
        if ridge is not None:
            by_ridge = (ridge.applies_to[row] & structured) | query
            table = torch.where(by_ridge.unsqueeze(-1), ridge(fps).to(table.dtype), table)
        # Molecules outside the vocabulary with nothing to go on (no fingerprint, or neither
        # amortiser nor ridge): the mean over the vocabulary's molecules.
        unknown = unique > self.n_vocab
        if self.amortizer is not None or ridge is not None:
            unknown = unknown & ~query
        if bool(unknown.any()):
            molecules = torch.arange(1, self.n_vocab + 1, device=unique.device)
            if self.has_structure.any():
                molecules = molecules[self.has_structure]
            mean = self._distinct_parameters(molecules).mean(0)
            table = torch.where(unknown.unsqueeze(-1), mean.to(table.dtype), table)
        return table

    def _offset(self) -> torch.Tensor:
        # The amortiser predicts deviations from slope 1, offset 0.
        return torch.tensor([1.0, 0.0], device=self.params.device)

    def forward(self, index: torch.Tensor, dose: torch.Tensor, extra_fingerprints=None):
        """Scale factors ``(B, K)`` for vocabulary indices and doses of shape ``(B, K)``."""
        theta = self.parameters_for(index, extra_fingerprints)
        if self.kind == "linear":
            scale = theta[..., 0] * dose
        elif self.kind == "sigm":
            scale = torch.sigmoid(theta[..., 0] * dose + theta[..., 1])
        elif self.kind in ("logsigm", "amortized"):
            scale = torch.sigmoid(theta[..., 0] * torch.log1p(dose) + theta[..., 1])
        else:
            features = torch.cat([torch.log1p(dose).unsqueeze(-1), theta], dim=-1)
            scale = self.shared_mlp(features).squeeze(-1)
        # Dose 0 is no perturbation: the curves above are not 0 there (sigmoid(b)).
        return scale * ((index != 0) & (dose > 0))


class Adversary(nn.Module):
    """Classifier of a label (perturbation set or covariate) from the basal latent."""

    def __init__(self, n_latent: int, n_classes: int, n_hidden: int = 64, n_layers: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.net = mlp(n_latent, n_classes, n_hidden, n_layers)

    def forward(self, basal_latent: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.net(basal_latent)
