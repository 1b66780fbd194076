"""The decoder-linearity penalty between perturbation shifts (plan_kwargs linearity_penalty)."""

from __future__ import annotations

import pytest
import torch

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def _model(likelihood: str = "nb", seed: int = 0) -> PerturbX:
    import scvi

    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    scvi.settings.seed = seed
    return PerturbX(adata, likelihood=likelihood, **SMALL_ARCH)


def _generative_outputs(model: PerturbX) -> dict:
    loader = model._make_data_loader(adata=model.adata, batch_size=256, shuffle=False)
    batch = next(iter(loader))
    model.module.train()
    _, generative_outputs = model.module.forward(batch, compute_loss=False)
    return generative_outputs


def _penalty(model: PerturbX, seed: int = 0) -> float:
    outputs = _generative_outputs(model)
    torch.manual_seed(seed)  # the same pairing and weights for every model
    with torch.no_grad():
        return float(model.module.embedding_linearity_penalty(outputs))


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_penalty_vanishes_for_a_decoder_affine_in_the_latent(likelihood):
    model = _model(likelihood)
    assert _penalty(model) > 1e-4  # the default decoder (ReLU layers) is not linear
    hidden = model.module.decoder_body[0].out_features
    model.module.decoder_body = torch.nn.Linear(model.module.n_latent, hidden)
    assert _penalty(model) < 1e-8


def test_penalty_for_a_quadratic_decoder_matches_the_hand_computed_bound():
    # g(z) = z² elementwise: g(w a + (1-w) b) - w g(a) - (1-w) g(b) = -w (1-w) (a-b)², with
    # a - b the difference of the two cells' perturbation shifts, so the penalty is
    # mean_i w_i² (1-w_i)² Σ (shift_i - shift_j)⁴, between 0 and max_ij Σ (Δ)⁴ / 16.
    model = _model("gaussian")
    outputs = _generative_outputs(model)
    model.module._decoder_output = lambda latent: latent**2
    outputs["decoder_output"] = outputs["latent"] ** 2
    shift = outputs["perturbation_shift"].detach()
    largest = float(((shift[:, None] - shift[None]) ** 4).sum(-1).max())
    torch.manual_seed(1)
    with torch.no_grad():
        penalty = float(model.module.embedding_linearity_penalty(outputs))
    assert 0 < penalty <= largest / 16
    # With every cell given the same shift there is nothing to interpolate.
    outputs["perturbation_shift"] = shift[:1].expand_as(shift)
    with torch.no_grad():
        assert float(model.module.embedding_linearity_penalty(outputs)) < 1e-10


def _simulated_model() -> PerturbX:
    import scvi

    from perturbx.data import simulate_drug_screen

    adata = simulate_drug_screen(n_cells=1500, n_genes=100, n_drugs=6, n_affected_genes=20)
    PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    scvi.settings.seed = 3
    return PerturbX(adata, **SMALL_ARCH)


def test_training_with_the_penalty_makes_the_decoder_more_linear():
    # Simulated drugs with real effects: their embeddings move far enough for the ReLU
    # decoder to bend between them (the toy screen's counts carry no effects at all).
    plain, penalised = _simulated_model(), _simulated_model()
    plain.train(max_epochs=30, seed=3, **QUIET)
    penalised.train(max_epochs=30, seed=3, plan_kwargs={"linearity_penalty": 10.0}, **QUIET)
    assert "linearity_penalty_train" in penalised.history
    assert "linearity_penalty_train" not in plain.history
    assert _penalty(penalised) < 0.5 * _penalty(plain)


def test_negative_linearity_penalty_is_rejected():
    model = _model()
    with pytest.raises(ValueError, match="linearity_penalty=-1"):
        model.train(max_epochs=1, plan_kwargs={"linearity_penalty": -1}, **QUIET)
