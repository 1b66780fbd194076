"""Silent wrong results found by probing the API (issue 31), and order invariance.

Each test here failed on the code before the fix (see the closing note of issue 31); the
bad-input cases with clear errors are in ``test_bad_input.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import perturbx.metrics as pm
from _toy import SMALL_ARCH, TOY_SMILES, setup_toy, toy_screen
from perturbx import PerturbX

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
RUXOLITINIB = "N#CC[C@H](C1CCCC1)n1cc(-c2ncnc3[nH]ccc23)cn1"
S_RUXOLITINIB = "N#CC[C@@H](C1CCCC1)n1cc(-c2ncnc3[nH]ccc23)cn1"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata = toy_screen(n_cells=400)
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"], categories=["a", "b"])
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=2, batch_size=64, seed=0, **QUIET)
    path = tmp_path_factory.mktemp("model") / "m"
    model.save(path)
    return model, adata, path


def _reordered_categories(adata):
    other = adata.copy()
    other.obs["cell_type"] = other.obs["cell_type"].cat.reorder_categories(["b", "a"])
    return other


# ------------------------------------------------------ 1. categories in another order
def test_covariate_categories_in_another_order_are_coded_by_value(trained):
    model, adata, path = trained
    other = _reordered_categories(adata)
    controls = adata[adata.obs["drug"] == "control"].copy()
    other_controls = other[other.obs["drug"] == "control"].copy()
    target = [{"drug": "aspirin", "cell_type": "a"}, {"drug": "caffeine"}]
    expected = model.predict(controls, target=target, seed=0)
    got = model.predict(other_controls, target=target, seed=0)
    np.testing.assert_array_equal(got.X, expected.X)
    pd.testing.assert_frame_equal(got.obs, expected.obs)
    for kind in ("basal", "full"):
        np.testing.assert_array_equal(
            model.get_latent_representation(other, kind=kind),
            model.get_latent_representation(adata, kind=kind),
        )
    np.testing.assert_array_equal(model.reconstruct(other).X, model.reconstruct(adata).X)
    loaded = PerturbX.load(path, adata=_reordered_categories(adata))
    np.testing.assert_array_equal(
        loaded.get_latent_representation(kind="full"),
        model.get_latent_representation(adata, kind="full"),
    )
    kw = dict(n_cells_per_target=20, baselines=("perturbed_centroid",))
    pd.testing.assert_frame_equal(
        model.evaluate(other, **kw).per_condition, model.evaluate(adata.copy(), **kw).per_condition
    )


# ------------------------------------------------------------ 2. non-finite in score
def _score_inputs():
    real = toy_screen(n_cells=300, seed=2)

    pred = real[real.obs["drug"].isin(["aspirin", "caffeine"])].copy()
    return pred, real


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        ("pred", np.nan, r"pred\.X has a non-finite value \(nan\) at row"),
        ("real", np.nan, r"real\.X has a non-finite value \(nan\)"),
        ("real", np.inf, r"real\.X has a non-finite value \(inf\)"),
    ],
)
def test_score_rejects_non_finite_values_naming_row_condition_and_gene(where, value, match):
    pred, real = _score_inputs()
    target = pred if where == "pred" else real
    dense = target.X.toarray()
    row = int(np.flatnonzero(target.obs["drug"] == "caffeine")[0])
    dense[row, 7] = value
    target.X = dense
    with pytest.raises(ValueError, match=match) as error:
        pm.score(pred, real, perturbation_key="drug", dose_key="dose", baselines=())
    message = str(error.value)
    assert repr(target.obs_names[row]) in message and "'g7'" in message
    assert "drug='caffeine'" in message


def test_score_of_a_perfect_prediction_is_still_perfect():
    pred, real = _score_inputs()
    result = pm.score(pred, real, perturbation_key="drug", dose_key="dose", baselines=())
    summary = result.summary.set_index(["method", "metric"])
    assert summary.loc[("model", "mse"), "median"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------- 3 and 8. doses
def test_dose_queries_reject_missing_negative_and_miscounted_doses(trained):
    model, _, _ = trained
    for doses in ([1.0, np.nan], [-1.0], [np.inf]):
        with pytest.raises(ValueError, match="doses contains"):
            model.get_dose_response("aspirin", doses)
        with pytest.raises(ValueError, match="doses contains"):
            model.get_perturbation_embeddings(["aspirin"], doses=doses[-1:])
    with pytest.raises(ValueError, match="doses has 2 values for 3 perturbations"):
        model.get_perturbation_embeddings(doses=[1.0, 2.0])


def test_dose_zero_is_no_perturbation(trained):
    model, adata, _ = trained
    controls = adata[adata.obs["drug"] == "control"].copy()
    np.testing.assert_array_equal(model.get_dose_response("aspirin", [0.0]), [0.0])
    assert model.get_dose_response("CCO", [0.0, 1.0])[1] != 0  # a new molecule too
    zero = model.predict(controls, target={"drug": "aspirin", "dose": 0.0})
    control = model.predict(controls, target={"drug": "control"})
    np.testing.assert_allclose(zero.X, control.X, rtol=1e-6)
    assert not np.allclose(
        model.predict(controls, target={"drug": "aspirin", "dose": 3.0}).X, control.X
    )


def test_a_target_dict_without_a_dose_means_dose_one(trained):
    model, adata, _ = trained
    kw = dict(n_cells_per_target=10, seed=0)
    omitted = model.predict(target=[{"drug": "aspirin"}, {"drug": "caffeine", "dose": 3.0}], **kw)
    explicit = model.predict(
        target=[{"drug": "aspirin", "dose": 1.0}, {"drug": "caffeine", "dose": 3.0}], **kw
    )
    np.testing.assert_array_equal(omitted.X, explicit.X)


# ---------------------------------------------------------- 4. names read as SMILES
def _gene_screen(smiles: bool):
    adata = toy_screen(n_cells=240)
    adata.obs["drug"] = adata.obs["drug"].replace("KLF1", "CNN1")
    if not smiles:
        adata.obs["drug"] = adata.obs["drug"].replace(
            {"aspirin": "KLF1", "caffeine": "TP53", "aspirin+caffeine": "KLF1+TP53"}
        )
    setup_toy(adata, **({} if smiles else {"smiles_key": None}))
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, seed=0, **QUIET)
    return model


def test_a_typo_of_a_gene_is_not_read_as_a_molecule():
    genetic = _gene_screen(smiles=False)
    # "CNN" parses as a SMILES (methylamine-like), but the model has no drug encoder
    with pytest.raises(
        ValueError, match="'CNN' is not known.*did you mean 'CNN1'.*no drug encoder"
    ):
        genetic.predict(target="CNN")
    with pytest.raises(ValueError, match="'CCO' is not known.*no drug encoder.*SMILES"):
        genetic.predict(target={"drug": "CCO", "smiles": "CCO"})
    mixed = _gene_screen(smiles=True)
    with pytest.raises(
        ValueError,
        match="'CNN' is not known.*did you mean 'CNN1'.*with its SMILES in a 'smiles' column",
    ):
        mixed.predict(target="CNN")
    # given as a SMILES on purpose, it is a new molecule
    pred = mixed.predict(target={"drug": "CNN", "smiles": "CNN"}, n_cells_per_target=5)
    assert set(pred.obs["smiles"]) == {"CNN"}
    # a string far from every name that parses as SMILES still is a new molecule
    assert set(mixed.predict(target="CCCCO", n_cells_per_target=5).obs["smiles"]) == {"CCCCO"}


# -------------------------------------------------------------- 6. look-alike molecules
def _two_names_screen(smiles_a: str, smiles_b: str):
    adata = toy_screen(n_cells=200)
    adata.obs["smiles"] = adata.obs["smiles"].str.replace(
        TOY_SMILES["aspirin"], smiles_a, regex=False
    )
    adata.obs["smiles"] = adata.obs["smiles"].str.replace(
        TOY_SMILES["caffeine"], smiles_b, regex=False
    )
    adata.obs["drug"] = adata.obs["drug"].replace(
        {
            "aspirin": "ruxolitinib",
            "caffeine": "S-ruxolitinib",
            "aspirin+caffeine": "ruxolitinib+S-ruxolitinib",
        }
    )
    return adata


def test_setup_warns_about_molecules_the_model_cannot_tell_apart():
    adata = _two_names_screen(RUXOLITINIB, S_RUXOLITINIB)
    with pytest.warns(
        UserWarning,
        match=r"\['S-ruxolitinib', 'ruxolitinib'\] \(different "
        r"molecules\).*fingerprint_chirality=True",
    ):
        setup_toy(adata)
    same = _two_names_screen(RUXOLITINIB, RUXOLITINIB)
    with pytest.warns(UserWarning, match=r"\(one molecule\).*merge the names"):
        setup_toy(same)
    chiral = _two_names_screen(RUXOLITINIB, S_RUXOLITINIB)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        setup_toy(chiral, fingerprint_chirality=True)
    model = PerturbX(chiral, **SMALL_ARCH)
    fingerprints = model.module.perturbation_embedding.fingerprints.numpy()
    assert model.featurizer.chirality and model.perturbation_registry["fingerprint"]["chirality"]
    assert not np.array_equal(fingerprints[0], fingerprints[1])


def test_one_molecule_written_two_ways_is_one_smiles():
    adata = toy_screen(n_cells=200)
    kekule = "CC(=O)OC1=CC=CC=C1C(=O)O"  # aspirin with Kekulé rings
    rows = np.flatnonzero(adata.obs["drug"] == "aspirin")[:3]
    adata.obs["smiles"] = adata.obs["smiles"].astype(object)
    adata.obs.iloc[rows, adata.obs.columns.get_loc("smiles")] = kekule
    setup_toy(adata)
    state = PerturbX(adata, **SMALL_ARCH).perturbation_registry
    assert state["smiles"][state["vocabulary"].index("aspirin")] == "CC(=O)Oc1ccccc1C(=O)O"


# ------------------------------------------------- doses written two ways in adata_eval
def test_doses_written_two_ways_are_one_condition(trained):
    model, adata, _ = trained
    held = adata.copy()
    aspirin = np.flatnonzero(held.obs["drug"] == "aspirin")
    held.obs["dose"] = held.obs["dose"].astype(object)
    held.obs.iloc[aspirin[::2], held.obs.columns.get_loc("dose")] = "3"
    pred = model.predict_conditions(held, n_cells_per_target=20)
    conditions = pred.obs.groupby(["drug", "dose", "cell_type"], observed=True).size()
    assert (conditions == 20).all()
    assert len(conditions.loc["aspirin"]) == 2  # one per cell type, not two per dose spelling


# ---------------------------------------------------------- order invariance (property)
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.randoms(use_true_random=False), st.booleans(), st.booleans(), st.booleans())
def test_predictions_and_scores_do_not_depend_on_category_obs_or_gene_order(
    trained, rng, shuffle_categories, shuffle_obs, shuffle_genes
):
    model, adata, path = trained
    other = adata.copy()
    if shuffle_categories:
        for key in ("cell_type", "drug"):
            categories = list(pd.Categorical(other.obs[key]).categories)
            rng.shuffle(categories)
            other.obs[key] = pd.Categorical(other.obs[key].astype(str), categories=categories)
    if shuffle_obs:
        order = list(range(other.n_obs))
        rng.shuffle(order)
        other = other[order].copy()
    if shuffle_genes:
        genes = list(other.var_names)
        rng.shuffle(genes)
        other = other[:, genes].copy()
    # predict: every control cell under a drug, keyed by its source cell
    expected = model.predict(adata.copy(), target="aspirin")
    got = model.predict(other, target="aspirin")
    expected_by_cell = pd.DataFrame(np.asarray(expected.X), index=expected.obs["source_cell"])
    got_by_cell = pd.DataFrame(
        np.asarray(got.X), index=got.obs["source_cell"], columns=range(got.n_vars)
    )
    # (batches of other cells: float32 matrix products round differently, by ~1e-7)
    np.testing.assert_allclose(
        got_by_cell.loc[expected_by_cell.index].to_numpy(),
        expected_by_cell.to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    # evaluate: the same scores
    kw = dict(n_cells_per_target=20, baselines=("perturbed_centroid",))
    np.testing.assert_array_equal(
        model.evaluate(other.copy(), **kw).per_condition.select_dtypes("number").to_numpy(),
        model.evaluate(adata.copy(), **kw).per_condition.select_dtypes("number").to_numpy(),
    )
    # load: the same latent for the same cells
    loaded = PerturbX.load(path, adata=other.copy())
    latent = pd.DataFrame(
        loaded.get_latent_representation(kind="full"), index=loaded.adata.obs_names
    )
    reference = pd.DataFrame(
        model.get_latent_representation(adata, kind="full"), index=adata.obs_names
    )
    np.testing.assert_allclose(
        latent.loc[reference.index].to_numpy(), reference.to_numpy(), rtol=1e-5, atol=1e-6
    )
