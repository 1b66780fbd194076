"""PerturbXEnsemble: members, mixing of predictions, evaluation, save/load, bad input."""

import numpy as np
import pytest
import torch

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX, PerturbXEnsemble
from perturbx.metrics import score

TARGETS = [{"drug": "caffeine", "dose": 3.0}, {"drug": "CCO", "dose": 1.0}]


@pytest.fixture(scope="module")
def ensemble():
    adata = toy_screen()
    setup_toy(adata)
    ens = PerturbXEnsemble(adata, n_models=3, seed=5, **SMALL_ARCH)
    ens.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return ens, adata


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])


def test_members_differ_but_share_their_training_cells(ensemble):
    ens, adata = ensemble
    assert len(ens) == 3 and ens.is_trained and ens.adata is adata
    first = ens.models[0]
    assert 0 < len(first.validation_indices) < adata.n_obs
    for member in ens.models[1:]:
        assert not torch.equal(_weights(member), _weights(first))
        np.testing.assert_array_equal(member.train_indices, first.train_indices)
        np.testing.assert_array_equal(member.validation_indices, first.validation_indices)
        assert len(member.history["reconstruction_loss_validation"]) == 2


def test_one_member_is_the_plain_model_with_the_same_seed():
    import scvi

    adata = toy_screen()
    setup_toy(adata)
    ens = PerturbXEnsemble(adata, n_models=1, seed=3, **SMALL_ARCH)
    ens.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    scvi.settings.seed = 3
    plain = PerturbX(adata, **SMALL_ARCH)
    plain.train(max_epochs=1, batch_size=64, seed=3, enable_progress_bar=False)
    assert torch.equal(_weights(ens.models[0]), _weights(plain))


def test_expected_values_are_the_members_mean(ensemble):
    ens, _ = ensemble
    pred = ens.predict(target=TARGETS, n_cells_per_target=12, seed=1)
    members = [m.predict(target=TARGETS, n_cells_per_target=12, seed=1) for m in ens.models]
    np.testing.assert_allclose(pred.X, np.mean([m.X for m in members], axis=0), rtol=1e-6)
    assert pred.obs.equals(members[0].obs)
    assert "ensemble_member" not in pred.obs
    assert pred.uns["perturbx_prediction"]["ensemble_size"] == 3
    # the mean differs from every single member
    assert all(not np.allclose(pred.X, m.X) for m in members)


def test_sampled_cells_come_from_the_members_in_turn(ensemble):
    ens, _ = ensemble
    pred = ens.predict(target=TARGETS, n_cells_per_target=12, sample=True, seed=2)
    members = [
        m.predict(target=TARGETS, n_cells_per_target=12, sample=True, seed=2) for m in ens.models
    ]
    member = pred.obs["ensemble_member"].to_numpy()
    np.testing.assert_array_equal(member, np.arange(pred.n_obs) % 3)
    for k, m in enumerate(members):
        np.testing.assert_array_equal(pred.X[member == k], m.X[member == k])
    assert np.all(pred.X == np.round(pred.X))  # counts


def test_evaluate_scores_the_ensembles_predictions(ensemble):
    ens, adata = ensemble
    held = adata[adata.obs["drug"].isin(["control", "caffeine", "aspirin+caffeine"])].copy()
    result = ens.evaluate(held, n_cells_per_target=20, baselines=("control_mean",), seed=0)
    pred = ens.predict_conditions(held, n_cells_per_target=20, seed=0)
    single = ens.models[0].predict_conditions(held, n_cells_per_target=20, seed=0)
    assert pred.obs.drop(columns="ensemble_member").equals(single.obs)
    pred.obs["method"] = "mine"
    direct = score(
        pred,
        held,
        perturbation_key="drug",
        dose_key="dose",
        covariate_keys=["cell_type"],
        method_key="method",
        counts=True,
        baselines=("control_mean",),
        seed=0,
        centroid_reference=adata[ens.models[0].train_indices],
    )
    table = result.per_condition
    name = "PerturbX (ensemble of 3)"
    assert set(table["method"]) == {name, "control_mean"}
    got = table[table["method"] == name].set_index("condition")["weighted_mse"]
    want = direct.per_condition
    want = want[want["method"] == "mine"].set_index("condition")["weighted_mse"]
    assert len(got) == 4 and np.isfinite(got).all()
    np.testing.assert_allclose(got.sort_index(), want.sort_index(), rtol=1e-6)


def test_save_and_load_round_trip(ensemble, tmp_path):
    ens, adata = ensemble
    before = ens.predict(target=TARGETS, n_cells_per_target=10)
    ens.save(tmp_path / "ens", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == [
        "member_0",
        "member_1",
        "member_2",
        "perturbx_ensemble.json",
    ]
    for loaded in (
        PerturbXEnsemble.load(tmp_path / "ens", adata=adata),
        PerturbXEnsemble.load(tmp_path / "ens"),  # with the AnnData saved in member_0
    ):
        assert len(loaded) == 3 and loaded.seed == 5
        after = loaded.predict(target=TARGETS, n_cells_per_target=10)
        np.testing.assert_array_equal(before.X, after.X)
    with pytest.raises(ValueError, match="overwrite=True"):
        ens.save(tmp_path / "ens")
    ens.save(tmp_path / "ens", overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="perturbx_ensemble.json"):
        PerturbXEnsemble.load(tmp_path / "empty")


def test_bad_input_is_a_clear_error(ensemble):
    ens, adata = ensemble
    with pytest.raises(ValueError, match="n_models=0"):
        PerturbXEnsemble(adata, n_models=0)
    with pytest.raises(TypeError, match="n_models"):
        PerturbXEnsemble(adata, n_models="3")
    with pytest.raises(TypeError, match="takes no seed"):
        ens.train(max_epochs=1, seed=1)
    with pytest.raises(ValueError, match="at least one"):
        PerturbXEnsemble.from_models([])
    with pytest.raises(TypeError, match=r"models\[1\]"):
        PerturbXEnsemble.from_models([ens.models[0], "model"])

    fewer_genes = toy_screen(n_genes=40)
    setup_toy(fewer_genes)
    with pytest.raises(ValueError, match=r"models\[1\] differs .*genes"):
        PerturbXEnsemble.from_models([ens.models[0], PerturbX(fewer_genes, **SMALL_ARCH)])

    # A fresh copy of the screen: loading a saved ensemble with its AnnData (an earlier test)
    # re-registers the fixture's AnnData id in scvi, which then refuses the original object.
    same_screen = toy_screen()
    setup_toy(same_screen)
    other_split = PerturbX(same_screen, **SMALL_ARCH)
    other_split.train(max_epochs=1, batch_size=64, seed=99, enable_progress_bar=False)
    with pytest.raises(ValueError, match="different cells"):
        PerturbXEnsemble.from_models([ens.models[0], other_split])
    untrained = PerturbXEnsemble.from_models([ens.models[0], PerturbX(same_screen, **SMALL_ARCH)])
    assert not untrained.is_trained and "1 trained" in repr(untrained)
