"""``unseen_molecules="ridge"``: molecules without training cells embedded by a ridge."""

from __future__ import annotations

import numpy as np
import pytest
import scvi
import torch

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.data import simulate_drug_screen
from perturbx.module import RIDGE_PENALTY, FingerprintRidge

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)
# Not among the simulator's drugs: a molecule given by SMILES only.
NEW_MOLECULE = "CN[C@H]1CC[C@@H](c2ccc(Cl)c(Cl)c2)c2ccccc21"


def test_ridge_recovers_a_linear_map_and_predicts_the_mean_at_the_centroid():
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(60, 6)).astype(np.float32)
    coef = rng.normal(size=(6, 3))
    y = x @ coef + np.array([1.0, -2.0, 0.5])
    applies_to = torch.tensor([True, False, True, False])
    ridge = FingerprintRidge(n_vocab=4, n_bits=6, n_out=3)
    ridge.fit(torch.from_numpy(x), torch.from_numpy(y), applies_to)
    assert bool(ridge.fitted)
    assert torch.equal(ridge.applies_to, applies_to)
    spread = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert float(ridge.penalty) == pytest.approx(RIDGE_PENALTY * spread, rel=1e-5)
    query = rng.poisson(1.0, size=(10, 6)).astype(np.float32)
    predicted = ridge(torch.from_numpy(query)).numpy()
    np.testing.assert_allclose(predicted, query @ coef + [1.0, -2.0, 0.5], atol=0.02)
    # A ridge with intercept predicts the targets' mean at the fingerprints' centroid.
    centroid = ridge(torch.from_numpy(x.mean(0, keepdims=True))).numpy()[0]
    np.testing.assert_allclose(centroid, y.mean(0), atol=1e-4)
    ridge.reset()
    assert not bool(ridge.fitted)


def test_ridge_needs_two_molecules():
    ridge = FingerprintRidge(n_vocab=1, n_bits=4, n_out=2)
    with pytest.raises(ValueError, match="at least 2 molecules, got 1"):
        ridge.fit(torch.ones(1, 4), torch.ones(1, 2), torch.tensor([True]))


@pytest.fixture(scope="module")
def ridge_model():
    adata = simulate_drug_screen(n_cells=2000, n_genes=60, n_drugs=10, seed=0)
    names = list(adata.uns["simulation"]["drug_names"])
    held_out = names[:3]
    adata.obs["split"] = np.where(adata.obs["drug"].isin(held_out), "test", "train")
    PerturbX.setup_anndata(
        adata, "drug", dose_key="dose", smiles_key="smiles", covariate_keys=["cell_type"]
    )
    scvi.settings.seed = 0
    model = PerturbX(adata, linear_shift_head=True, unseen_molecules="ridge", **SMALL_ARCH)
    model.train(max_epochs=3, split_key="split", seed=0, **QUIET)
    return model, held_out, names[3:]


def _encoder_embeddings(model, perturbations):
    """Embeddings with the ridge switched off (what the drug encoder gives)."""
    module = model.module
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module.reset_unseen_molecule_ridge()
    try:
        return model.get_perturbation_embeddings(perturbations)
    finally:
        module.load_state_dict(saved)


def test_ridge_embeds_only_molecules_without_training_cells(ridge_model):
    model, held_out, seen = ridge_model
    ridge = model.module.perturbation_embedding.unseen_ridge
    assert bool(ridge.fitted)
    vocabulary = model.perturbations
    applies = {vocabulary[i] for i in np.flatnonzero(ridge.applies_to.numpy())}
    assert applies == set(held_out)
    queries = [*seen, *held_out, NEW_MOLECULE]
    with_ridge = model.get_perturbation_embeddings(queries)
    encoder = _encoder_embeddings(model, queries)
    np.testing.assert_array_equal(with_ridge.loc[seen].to_numpy(), encoder.loc[seen].to_numpy())
    unseen = [*held_out, NEW_MOLECULE]
    assert not np.allclose(with_ridge.loc[unseen].to_numpy(), encoder.loc[unseen].to_numpy())
    # The ridge's prediction, computed by hand from its coefficients and the fingerprints.
    fingerprints = model.featurizer(
        [
            *(model.perturbation_registry["smiles"][vocabulary.index(d)] for d in held_out),
            NEW_MOLECULE,
        ]
    )
    by_hand = fingerprints @ ridge.coef.numpy() + ridge.intercept.numpy()
    np.testing.assert_allclose(with_ridge.loc[unseen].to_numpy(), by_hand, rtol=1e-5, atol=1e-5)


def test_ridge_gives_unseen_molecules_dose_responses(ridge_model):
    model, held_out, seen = ridge_model
    dose_ridge = model.module.dose_response.unseen_ridge
    assert bool(dose_ridge.fitted)
    doses = [0.1, 1.0, 10.0]
    fingerprint = model.featurizer([NEW_MOLECULE])
    slope, offset = (fingerprint @ dose_ridge.coef.numpy() + dose_ridge.intercept.numpy())[0]
    expected = 1 / (1 + np.exp(-(slope * np.log1p(doses) + offset)))  # amortised logsigm
    np.testing.assert_allclose(model.get_dose_response(NEW_MOLECULE, doses), expected, rtol=1e-5)


def test_ridge_is_not_used_while_training(ridge_model):
    model, held_out, _ = ridge_model
    embedding = model.module.perturbation_embedding
    index = torch.tensor([[model.perturbations.index(held_out[0]) + 1]])
    fingerprint = embedding.fingerprints[index[0] - 1]
    model.module.train()
    try:
        with torch.no_grad():
            training = embedding(index)[0, 0]
    finally:
        model.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(training, embedding.drug_encoder(fingerprint)[0])
        torch.testing.assert_close(embedding(index)[0, 0], embedding.unseen_ridge(fingerprint)[0])


def test_save_load_keeps_the_ridge_and_the_shift_head(ridge_model, tmp_path):
    model, held_out, _ = ridge_model
    model.save(tmp_path / "model", overwrite=True)
    loaded = PerturbX.load(tmp_path / "model", adata=model.adata)
    assert loaded.module.shift_head is not None
    assert bool(loaded.module.perturbation_embedding.unseen_ridge.fitted)
    target = {"drug": held_out[0], "dose": 1.0, "cell_type": "cell_type_0"}
    before = model.predict(target=target, n_cells_per_target=20)
    after = loaded.predict(target=target, n_cells_per_target=20)
    np.testing.assert_allclose(after.X, before.X, rtol=1e-5)


def test_training_again_refits_the_ridge(ridge_model):
    model, held_out, _ = ridge_model
    coef = model.module.perturbation_embedding.unseen_ridge.coef.clone()
    model.train(max_epochs=1, split_key="split", seed=1, **QUIET)
    ridge = model.module.perturbation_embedding.unseen_ridge
    assert bool(ridge.fitted)
    assert not torch.equal(ridge.coef, coef)  # the encoder moved, so did its ridge


def test_unknown_unseen_molecules_mode_is_named():
    adata = toy_screen(n_cells=200)
    setup_toy(adata)
    with pytest.raises(ValueError, match="unseen_molecules='nearest'"):
        PerturbX(adata, unseen_molecules="nearest", **SMALL_ARCH)


def test_ridge_without_smiles_is_an_error():
    adata = toy_screen(n_cells=200)
    setup_toy(adata, smiles_key=None)
    with pytest.raises(ValueError, match="no perturbation has a SMILES"):
        PerturbX(adata, unseen_molecules="ridge", **SMALL_ARCH)


def test_too_few_training_molecules_warn_and_keep_the_encoder():
    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    # Caffeine (alone and in the combination) only in the test cells: one training molecule.
    adata.obs["split"] = np.where(adata.obs["drug"].str.contains("caffeine"), "test", "train")
    model = PerturbX(adata, unseen_molecules="ridge", **SMALL_ARCH)
    with pytest.warns(UserWarning, match="the training cells hold 1"):
        model.train(max_epochs=1, split_key="split", **QUIET)
    assert not bool(model.module.perturbation_embedding.unseen_ridge.fitted)
