"""Building blocks of the PerturbX module: perturbation embeddings, dose responses, adversaries.

Shapes use ``B`` for cells in a minibatch, ``K`` for members of a combination, ``P`` for the
perturbation vocabulary, ``L`` for the latent size and ``F`` for fingerprint bits.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scvi.nn import FCLayers
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
#: (``benchmarks/README.md``, "The linear shift head and ridge embeddings as options").
RIDGE_PENALTY: float = 1e-3


def hidden_layers(n_in: int, n_hidden: int, n_layers: int, dropout_rate: float = 0.0) -> FCLayers:
    """``n_layers`` layers Linear → LayerNorm → ReLU → Dropout, ending at ``n_hidden`` units."""
    return FCLayers(
        n_in,
        n_hidden,
        n_layers=n_layers,
        n_hidden=n_hidden,
        dropout_rate=dropout_rate,
        use_batch_norm=False,
        use_layer_norm=True,
    )


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
            mlp(n_bits, n_latent, n_hidden, n_layers, dropout_rate)
            if has_structure.any()
            else None
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
        """
        unique, inverse = torch.unique(index, return_inverse=True)
        # Embed each distinct perturbation of the batch once, then broadcast to cells.
        table = self.token_embedding(unique.clamp(max=self.n_vocab)).clone()
        vocab_rows = (unique >= 1) & (unique <= self.n_vocab)
        structured = torch.zeros_like(unique, dtype=torch.bool)
        structured[vocab_rows] = self.has_structure[unique[vocab_rows] - 1]
        extra = unique > self.n_vocab
        if structured.any() or extra.any():
            if self.drug_encoder is None:
                raise ValueError("This model has no drug encoder (it was set up without SMILES).")
            fps = []
            if structured.any():
                fps.append(self.fingerprints[unique[structured] - 1])
            if extra.any():
                fps.append(extra_fingerprints[unique[extra] - self.n_vocab - 1])
            fps = torch.cat(fps)
            # Under autocast (bf16-mixed) the encoder's output is bf16; the table is float32.
            encoded = self.drug_encoder(fps).to(table.dtype)
            n_structured = int(structured.sum())
            ridge = _active(self.unseen_ridge, self.training)
            if ridge is not None:
                unseen = torch.cat([
                    ridge.applies_to[unique[structured] - 1],
                    torch.ones(len(fps) - n_structured, dtype=torch.bool, device=fps.device),
                ])
                encoded[unseen] = ridge(fps[unseen]).to(table.dtype)
            table[structured] = encoded[:n_structured]
            table[extra] = encoded[n_structured:]
        table = table * (unique != 0).unsqueeze(-1)
        return table[inverse]


class DoseResponse(nn.Module):
    """Scale factor ``s(d)`` of each perturbation's embedding at dose ``d`` (µM or any unit).

    ``logsigm``: ``sigmoid(a·log1p(d) + b)``; ``sigm``: ``sigmoid(a·d + b)``;
    ``linear``: ``a·d``; ``mlp``: a shared MLP of ``(log1p(d), code_p)`` with a learned code
    per perturbation; ``amortized``: ``logsigm`` whose ``(a, b)`` for molecules are computed
    from the fingerprint, so a molecule never seen in training has a dose response too
    (perturbations without structure keep learned ``(a, b)``).
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
            mlp(n_bits, 2, n_hidden, 1)
            if kind == "amortized" and has_structure.any()
            else None
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
        n_vocab = self.n_vocab
        extra = unique > n_vocab
        table = self._vocabulary_parameters(unique.clamp(max=n_vocab))
        if extra.any():
            ridge = _active(self.unseen_ridge, self.training)
            if ridge is not None and extra_fingerprints is not None:
                query = ridge(extra_fingerprints[unique[extra] - n_vocab - 1])
            elif self.amortizer is not None and extra_fingerprints is not None:
                query = self.amortizer(extra_fingerprints[unique[extra] - n_vocab - 1])
                query = query + self._offset()
            else:
                # No structure to go on: the mean over the vocabulary's molecules.
                molecules = torch.arange(1, n_vocab + 1, device=index.device)
                if self.has_structure.any():
                    molecules = molecules[self.has_structure]
                query = self._vocabulary_parameters(molecules).mean(0, keepdim=True)
            table = table.clone()
            table[extra] = query.to(table.dtype)
        return table[inverse]

    def _vocabulary_parameters(self, rows: torch.Tensor) -> torch.Tensor:
        """Parameters ``(len(rows), n_params)`` of vocabulary rows ``0..P`` (0 = empty slot)."""
        table = self.params[rows]
        structured = torch.zeros_like(rows, dtype=torch.bool)
        in_vocab = rows >= 1
        structured[in_vocab] = self.has_structure[rows[in_vocab] - 1]
        if self.amortizer is not None and structured.any():
            table = table.clone()
            amortized = self.amortizer(self.fingerprints[rows[structured] - 1]) + self._offset()
            table[structured] = amortized.to(table.dtype)
        ridge = _active(self.unseen_ridge, self.training)
        if ridge is not None:
            replaced = structured.clone()
            replaced[structured] = ridge.applies_to[rows[structured] - 1]
            if replaced.any():
                table = table.clone()
                table[replaced] = ridge(self.fingerprints[rows[replaced] - 1]).to(table.dtype)
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
        return scale * (index != 0)


class Adversary(nn.Module):
    """Classifier of a label (perturbation set or covariate) from the basal latent."""

    def __init__(self, n_latent: int, n_classes: int, n_hidden: int = 64, n_layers: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.net = mlp(n_latent, n_classes, n_hidden, n_layers)

    def forward(self, basal_latent: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.net(basal_latent)
