"""``linear_shift_head=True``: the perturbation shift enters the decoder's output linearly."""

from __future__ import annotations

import pytest
import scvi
import torch

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.train import PerturbXTrainingPlan


def _model(likelihood: str, linear_shift_head: bool) -> PerturbX:
    adata = toy_screen(n_cells=200)
    setup_toy(adata)
    scvi.settings.seed = 0
    model = PerturbX(
        adata, likelihood=likelihood, linear_shift_head=linear_shift_head, **SMALL_ARCH
    )
    model.module.eval()
    return model


def _decoder_output(model: PerturbX, members: list[str], doses: list[float]) -> torch.Tensor:
    """Decoder output ``(B, G)`` of 16 cells (both cell types) under one condition.

    NB: log-rates centred over genes (the softmax's per-cell constant removed); Gaussian:
    the mean.
    """
    module = model.module
    generator = torch.Generator().manual_seed(0)
    basal = torch.randn(16, module.n_latent, generator=generator)
    covariates = torch.arange(16).remainder(2).unsqueeze(1)
    vocabulary = model.perturbations
    # Slot 0 is empty (no perturbation, zero shift).
    index = torch.tensor(
        [[0 if m == "control" else vocabulary.index(m) + 1 for m in members]]
    ).expand(16, -1)
    dose = torch.tensor([doses]).expand(16, -1)
    library = torch.full((16, 1), 1e4)
    with torch.no_grad():
        out = module.generative(basal, library, index, dose, covariates)
    if "log_rate" in out:
        return out["log_rate"] - out["log_rate"].mean(-1, keepdim=True)
    return out["decoder_output"]


def _effect(model, members, doses):
    """Each cell's output under the perturbation minus its output unperturbed."""
    control = _decoder_output(model, ["control"] * len(members), doses)
    return _decoder_output(model, members, doses) - control


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_every_cell_gets_the_same_effect(likelihood):
    linear = _effect(_model(likelihood, True), ["aspirin"], [3.0])
    assert linear.abs().max() > 1e-3  # the drug does something
    torch.testing.assert_close(linear, linear[:1].expand_as(linear), atol=1e-5, rtol=1e-5)
    # The default decoder passes the shift through its hidden layers: cell-specific effects.
    default = _effect(_model(likelihood, False), ["aspirin"], [3.0])
    assert (default - default[:1]).abs().max() > 1e-3


def test_combination_effects_are_the_sum_of_the_members_effects():
    model = _model("gaussian", True)
    single = _effect(model, ["aspirin"], [1.0]) + _effect(model, ["caffeine"], [10.0])
    combination = _effect(model, ["aspirin", "caffeine"], [1.0, 10.0])
    torch.testing.assert_close(combination, single, atol=1e-5, rtol=1e-5)
    default = _model("gaussian", False)
    single = _effect(default, ["aspirin"], [1.0]) + _effect(default, ["caffeine"], [10.0])
    assert (_effect(default, ["aspirin", "caffeine"], [1.0, 10.0]) - single).abs().max() > 1e-4


def test_linearity_penalty_is_rejected_with_a_linear_shift_head():
    model = _model("nb", True)
    with pytest.raises(ValueError, match="linear_shift_head=True"):
        PerturbXTrainingPlan(model.module, linearity_penalty=1.0)
    with pytest.raises(ValueError, match="linear_shift_head=True"):
        model.module.embedding_linearity_penalty({})
