"""Perturbation embeddings: drug encoder for molecules, learned table otherwise, per batch."""

import pytest
import torch

from perturbx.module import PerturbationEmbedding

N_VOCAB, N_BITS, N_LATENT = 12, 16, 4


def _embedding(unseen_ridge: bool = False) -> PerturbationEmbedding:
    generator = torch.Generator().manual_seed(0)
    fingerprints = (torch.rand(N_VOCAB, N_BITS, generator=generator) > 0.5).float()
    has_structure = torch.arange(N_VOCAB) % 3 != 0  # indices 1, 4, 7, 10 are genetic
    return PerturbationEmbedding(
        fingerprints, has_structure, N_LATENT, n_hidden=8, n_layers=1, unseen_ridge=unseen_ridge
    ).eval()


def _expected(module: PerturbationEmbedding, index: torch.Tensor, extra: torch.Tensor | None):
    """Row by row: zero for the empty slot, the encoder (or the fitted ridge) for molecules."""
    ridge = module.unseen_ridge
    use_ridge = ridge is not None and bool(ridge.fitted)
    rows = []
    for i in index.flatten().tolist():
        if i == 0:
            rows.append(torch.zeros(N_LATENT))
        elif i > N_VOCAB:
            fp = extra[i - N_VOCAB - 1 : i - N_VOCAB]
            rows.append((ridge(fp) if use_ridge else module.drug_encoder(fp))[0])
        elif module.has_structure[i - 1]:
            fp = module.fingerprints[i - 1 : i]
            by_ridge = use_ridge and bool(ridge.applies_to[i - 1])
            rows.append((ridge(fp) if by_ridge else module.drug_encoder(fp))[0])
        else:
            rows.append(module.token_embedding.weight[i])
    return torch.stack(rows).reshape(*index.shape, N_LATENT)


INDEX = torch.tensor([[2, 0], [4, N_VOCAB + 2], [3, N_VOCAB + 1], [4, 4], [0, 0]])


@pytest.mark.parametrize("fitted_ridge", [False, True])
def test_embeddings_match_the_row_by_row_definition(fitted_ridge):
    module = _embedding(unseen_ridge=fitted_ridge)
    extra = (torch.rand(2, N_BITS, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    if fitted_ridge:
        molecules = module.has_structure.nonzero().squeeze(-1)
        applies_to = torch.zeros(N_VOCAB, dtype=torch.bool)
        applies_to[2] = True  # index 3: a molecule without training cells
        with torch.no_grad():
            module.unseen_ridge.fit(
                module.fingerprints[molecules], torch.randn(len(molecules), N_LATENT), applies_to
            )
    with torch.no_grad():
        got = module(INDEX, extra)
        want = _expected(module, INDEX, extra)
    assert got.shape == (5, 2, N_LATENT)
    torch.testing.assert_close(got, want)
    if fitted_ridge:  # the ridge and the encoder differ, so the check above saw the ridge
        assert not torch.allclose(got[2, 0], module.drug_encoder(module.fingerprints[2:3])[0])


def test_gradient_reaches_the_encoder_and_only_the_batch_table_rows():
    module = _embedding().train()
    module(torch.tensor([[2], [4], [0]])).sum().backward()
    touched = module.token_embedding.weight.grad.abs().sum(1).nonzero().squeeze(-1).tolist()
    assert touched == [4]  # genetic 4 only: molecule 2 comes from the encoder, 0 is zero
    assert module.drug_encoder[-1].weight.grad.abs().sum() > 0


def test_indices_beyond_the_vocabulary_need_fingerprints():
    module = _embedding()
    with pytest.raises(IndexError, match="extra_fingerprints"):
        module(torch.tensor([[N_VOCAB + 1]]))
    genetic_only = PerturbationEmbedding(
        torch.zeros(3, N_BITS), torch.zeros(3, dtype=torch.bool), N_LATENT
    )
    with pytest.raises(ValueError, match="no drug encoder"):
        genetic_only(torch.tensor([[4]]), torch.zeros(1, N_BITS))
