"""Tests of the simulated drug screen and its ground truth."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import Ridge

from perturbx.chem import InvalidSmilesError, MorganFeaturizer, canonical_smiles
from perturbx.data._builtin_drugs import BUILTIN_DRUGS
from perturbx.data.simulate import (
    builtin_drug_smiles,
    simulate_drug_screen,
    true_condition_means,
    true_expected_counts,
    true_log_fold_change,
)

SMALL = dict(n_cells=600, n_genes=120, n_drugs=4, n_affected_genes=10)


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return simulate_drug_screen(**SMALL, seed=3)


@pytest.fixture(scope="module")
def sciplex_table(shared_data_dir) -> pd.DataFrame:
    path = shared_data_dir / "trapnell_drugs_smiles.csv"
    if not path.is_file():
        pytest.skip(f"sci-Plex SMILES table not found at {path}")
    return pd.read_csv(path, header=None)


def _empirical_lfc(adata: ad.AnnData, mask: np.ndarray, control: np.ndarray) -> np.ndarray:
    """log of mean counts, treated over control (library sizes do not depend on treatment)."""
    treated_mean = np.asarray(adata.X[mask].mean(axis=0)).ravel()
    control_mean = np.asarray(adata.X[control].mean(axis=0)).ravel()
    return np.log(treated_mean) - np.log(control_mean)


def test_builtin_library_is_valid_and_diverse():
    names = [n for n, _ in BUILTIN_DRUGS]
    assert len(names) >= 40 and len(set(names)) == len(names)
    canonical = [canonical_smiles(s, name=n) for n, s in BUILTIN_DRUGS]
    assert len(set(canonical)) == len(canonical)
    table = builtin_drug_smiles()
    assert table.columns.tolist() == ["name", "smiles"] and len(table) == len(names)


def test_shapes_dtypes_and_obs(small):
    adata = small
    assert adata.shape == (600, 120)
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    assert adata.var_names[0] == "gene_0000" and adata.var_names[-1] == "gene_0119"
    obs = adata.obs
    assert list(obs.columns) == ["drug", "dose", "smiles", "cell_type", "condition"]
    for column in ("drug", "smiles", "cell_type", "condition"):
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    assert obs["dose"].dtype == np.float64
    expected_drugs = [n for n, _ in BUILTIN_DRUGS[:4]]
    assert obs["drug"].cat.categories.tolist() == ["control", *expected_drugs]
    control = obs["drug"] == "control"
    assert control.sum() == 60  # control_fraction 0.1
    assert (obs.loc[control, "dose"] == 0).all() and (obs.loc[control, "smiles"] == "").all()
    assert set(obs.loc[~control, "dose"]) == {0.1, 1.0, 10.0}
    treated = obs[~control]
    for name, smiles in BUILTIN_DRUGS[:4]:
        assert (treated.loc[treated["drug"] == name, "smiles"] == canonical_smiles(smiles)).all()
    assert set(obs["cell_type"]) == {"cell_type_0", "cell_type_1"}
    row = treated.iloc[0]
    assert row["condition"] == f"{row['drug']}_{row['dose']:g}_{row['cell_type']}"
    assert obs.loc[control, "condition"].str.startswith("control_0_cell_type_").all()
    # Balanced design: 540 treated cells over 12 (drug, dose) pairs.
    assert treated.groupby(["drug", "dose"], observed=True).size().eq(45).all()


def test_counts_are_non_negative_integers(small):
    data = small.X.data
    assert np.all(data > 0) and np.array_equal(data, np.round(data))
    assert small.X.nnz > 0.1 * np.prod(small.shape)
    # Library sizes vary across cells.
    totals = np.asarray(small.X.sum(1)).ravel()
    assert totals.std() / totals.mean() > 0.2


def test_same_seed_same_data_and_different_seed_differs(small):
    again = simulate_drug_screen(**SMALL, seed=3)
    assert (small.X != again.X).nnz == 0
    pd.testing.assert_frame_equal(small.obs, again.obs)
    np.testing.assert_array_equal(
        small.uns["simulation"]["lfc_max"], again.uns["simulation"]["lfc_max"]
    )
    other = simulate_drug_screen(**SMALL, seed=4)
    assert (small.X != other.X).nnz > 0
    assert not np.array_equal(
        small.uns["simulation"]["lfc_max"], other.uns["simulation"]["lfc_max"]
    )


def test_ground_truth_does_not_depend_on_the_number_of_cells(small):
    # bench_quality.py scores held-out drugs against a larger screen with the same seed.
    larger = simulate_drug_screen(**{**SMALL, "n_cells": 10 * SMALL["n_cells"]}, seed=3)
    truth, larger_truth = small.uns["simulation"], larger.uns["simulation"]
    for key in ("lfc_max", "baseline_log_mean", "affected_genes", "nb_theta"):
        np.testing.assert_array_equal(truth[key], larger_truth[key], err_msg=key)
    for drug in truth["drug_names"]:
        np.testing.assert_array_equal(
            true_log_fold_change(small, drug, 1.0, "cell_type_0"),
            true_log_fold_change(larger, drug, 1.0, "cell_type_0"),
        )
    assert larger.n_obs == 10 * small.n_obs


def test_ground_truth_survives_h5ad(small, tmp_path):
    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    truth = back.uns["simulation"]
    assert truth["params"]["seed"] == 3
    assert list(truth["drug_names"]) == [n for n, _ in BUILTIN_DRUGS[:4]]
    assert truth["affected_genes"].shape == (4, 10)
    for drug in truth["drug_names"]:
        np.testing.assert_allclose(
            true_log_fold_change(back, drug, 1.0, "cell_type_1"),
            true_log_fold_change(small, drug, 1.0, "cell_type_1"),
        )


def test_truth_structure_and_hill_formula(small):
    truth = small.uns["simulation"]
    lfc_max = truth["lfc_max"]
    nonzero = [np.flatnonzero(row).tolist() for row in lfc_max]
    assert nonzero == truth["affected_genes"].tolist()
    assert np.isclose(np.abs(lfc_max[lfc_max != 0]).mean(), 1.0)  # effect_size
    # Hand-computed Hill response for one drug, dose and cell type.
    drug, d, c, dose = truth["drug_names"][2], 2, 0, 1.0
    ec50, h = truth["ec50_um"][d], truth["hill"][d]
    fraction = dose**h / (dose**h + ec50**h)
    expected = lfc_max[d] * truth["cell_type_multiplier"][d, c] * fraction
    np.testing.assert_allclose(true_log_fold_change(small, drug, dose, "cell_type_0"), expected)
    assert np.all(true_log_fold_change(small, "control", 0.0, "cell_type_0") == 0)
    assert np.all(true_log_fold_change(small, drug, 0.0, "cell_type_0") == 0)
    counts = true_expected_counts(small, drug, dose, "cell_type_0")
    np.testing.assert_allclose(np.log(counts), truth["baseline_log_mean"][0] + expected)
    with pytest.raises(KeyError, match="Unknown drug 'nope'"):
        true_log_fold_change(small, "nope", 1.0, "cell_type_0")
    with pytest.raises(KeyError, match="Unknown cell_type"):
        true_log_fold_change(small, drug, 1.0, "cell_type_9")


def test_true_condition_means(small):
    table = true_condition_means(small)
    assert set(table.index) == set(small.obs["condition"])
    assert table.columns.equals(small.var_names)
    truth = small.uns["simulation"]
    np.testing.assert_allclose(
        table.loc["control_0_cell_type_1"], np.exp(truth["baseline_log_mean"][1])
    )
    normalised = true_condition_means(small, normalize_to=1e4)
    np.testing.assert_allclose(normalised.sum(axis=1), 1e4)


def test_empirical_lfc_matches_truth_and_increases_with_dose():
    adata = simulate_drug_screen(
        n_cells=8000, n_genes=300, n_drugs=3, n_cell_types=1, n_affected_genes=30, seed=1
    )
    truth = adata.uns["simulation"]
    obs = adata.obs
    control = (obs["drug"] == "control").to_numpy()
    baseline = np.exp(truth["baseline_log_mean"][0])
    for d, drug in enumerate(truth["drug_names"]):
        genes = truth["affected_genes"][d]
        genes = genes[baseline[genes] > 0.5]  # skip genes too lowly expressed to measure
        projections = []
        for dose in (0.1, 1.0, 10.0):
            cells = ((obs["drug"] == drug) & (obs["dose"] == dose)).to_numpy()
            empirical = _empirical_lfc(adata, cells, control)[genes]
            expected = true_log_fold_change(adata, drug, dose, "cell_type_0")[genes]
            if dose == 10.0:
                assert np.corrcoef(empirical, expected)[0, 1] > 0.8
            direction = truth["lfc_max"][d, genes]
            projections.append(empirical @ direction / (direction @ direction))
        assert projections[0] < projections[1] < projections[2], (drug, projections)
        true_sizes = [
            np.abs(true_log_fold_change(adata, drug, x, "cell_type_0")).sum() for x in (0.1, 1, 10)
        ]
        assert true_sizes[0] < true_sizes[1] < true_sizes[2]


def test_cell_type_specificity():
    flat = simulate_drug_screen(**SMALL, cell_type_specificity=0.0)
    np.testing.assert_allclose(flat.uns["simulation"]["cell_type_multiplier"], 1.0)
    adata = simulate_drug_screen(
        n_cells=6000, n_genes=200, n_drugs=6, doses=(10.0,), n_affected_genes=20,
        cell_type_specificity=1.0, seed=2,
    )  # fmt: skip
    truth = adata.uns["simulation"]
    multiplier = truth["cell_type_multiplier"]
    np.testing.assert_allclose(np.prod(multiplier, axis=1), 1.0)  # geometric mean 1
    d = int(np.argmax(np.abs(np.log(multiplier[:, 0] / multiplier[:, 1]))))
    true_ratio = multiplier[d, 0] / multiplier[d, 1]
    assert abs(np.log(true_ratio)) > np.log(1.5)
    drug, genes = truth["drug_names"][d], truth["affected_genes"][d]
    obs = adata.obs
    slopes = []
    for c, cell_type in enumerate(["cell_type_0", "cell_type_1"]):
        in_type = (obs["cell_type"] == cell_type).to_numpy()
        cells = in_type & (obs["drug"] == drug).to_numpy()
        control = in_type & (obs["drug"] == "control").to_numpy()
        empirical = _empirical_lfc(adata, cells, control)[genes]
        keep = np.exp(truth["baseline_log_mean"][c, genes]) > 0.5
        direction = truth["lfc_max"][d, genes][keep]
        slopes.append(empirical[keep] @ direction / (direction @ direction))
    assert slopes[0] / slopes[1] == pytest.approx(true_ratio, rel=0.3)


def test_shared_component_is_small_relative_to_drug_specific():
    adata = simulate_drug_screen(n_cells=100, n_genes=500, n_drugs=40, seed=0)
    lfc = adata.uns["simulation"]["lfc_max"]
    mean_effect = lfc.mean(axis=0)
    specific = lfc - mean_effect
    assert np.linalg.norm(mean_effect) < 0.5 * np.linalg.norm(specific, axis=1).mean()


def _ridge_beats_training_mean(lfc: np.ndarray, features: np.ndarray, n_splits: int = 5):
    """Held-out MSE on affected genes: (ridge from fingerprints, mean of training drugs)."""
    rng = np.random.default_rng(0)
    n_drugs = len(lfc)
    n_train = int(round(0.75 * n_drugs))
    ridge_errors, mean_errors = [], []
    for _ in range(n_splits):
        order = rng.permutation(n_drugs)
        train, test = order[:n_train], order[n_train:]
        prediction = Ridge(alpha=1.0).fit(features[train], lfc[train]).predict(features[test])
        affected = lfc[test] != 0
        ridge_errors.append(np.mean((prediction - lfc[test])[affected] ** 2))
        mean_errors.append(np.mean((lfc[train].mean(0) - lfc[test])[affected] ** 2))
    return np.mean(ridge_errors), np.mean(mean_errors)


def test_effects_are_learnable_from_structure_sciplex(sciplex_table):
    adata = simulate_drug_screen(
        n_cells=100, n_genes=400, n_drugs=40, smiles=sciplex_table, n_affected_genes=30, seed=5
    )
    truth = adata.uns["simulation"]
    assert list(truth["drug_names"]) == sciplex_table[0].tolist()[:40]
    features = MorganFeaturizer()(list(truth["drug_smiles"]))
    ridge_mse, mean_mse = _ridge_beats_training_mean(truth["lfc_max"], features)
    assert ridge_mse < 0.95 * mean_mse, (ridge_mse, mean_mse)


def test_effects_are_learnable_from_structure_builtin():
    adata = simulate_drug_screen(n_cells=100, n_genes=400, n_drugs=40, seed=5)
    truth = adata.uns["simulation"]
    features = MorganFeaturizer()(list(truth["drug_smiles"]))
    ridge_mse, mean_mse = _ridge_beats_training_mean(truth["lfc_max"], features)
    assert ridge_mse < 0.95 * mean_mse, (ridge_mse, mean_mse)


def test_smiles_argument_forms(sciplex_table):
    named = sciplex_table.rename(columns={0: "name", 1: "smiles", 2: "pathway"})
    small = dict(n_cells=50, n_genes=30, n_drugs=3, n_affected_genes=5)
    from_named = simulate_drug_screen(**small, smiles=named)
    from_headerless = simulate_drug_screen(**small, smiles=sciplex_table)
    mapping = dict(zip(named["name"][:3], named["smiles"][:3], strict=True))
    from_mapping = simulate_drug_screen(**small, smiles=mapping)
    indexed = simulate_drug_screen(**small, smiles=named.set_index("name")[["smiles"]])
    for adata in (from_headerless, from_mapping, indexed):
        assert (adata.X != from_named.X).nnz == 0
        pd.testing.assert_frame_equal(adata.obs, from_named.obs)


def test_control_entries_of_the_library_are_not_drugs(sciplex_table):
    # The sci-Plex table ends with two "control" (DMSO vehicle) rows.
    assert (sciplex_table[0] == "control").sum() == 2
    n_real = int((sciplex_table[0] != "control").sum())
    adata = simulate_drug_screen(
        n_cells=2 * n_real, n_genes=20, n_drugs=n_real, n_affected_genes=2, smiles=sciplex_table
    )
    assert adata.obs["drug"].cat.categories.tolist()[0] == "control"
    assert len(adata.uns["simulation"]["drug_names"]) == n_real
    assert "control" not in list(adata.uns["simulation"]["drug_names"])
    with pytest.raises(ValueError, match=f"has only {n_real} drugs"):
        simulate_drug_screen(
            n_cells=50, n_genes=20, n_drugs=n_real + 1, n_affected_genes=2, smiles=sciplex_table
        )


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="n_drugs=100 but the drug library has only 58 drugs"):
        simulate_drug_screen(n_cells=50, n_genes=30, n_drugs=100, n_affected_genes=5)
    bad = {"good": "CCO", "broken drug": "C1CC"}
    with pytest.raises(InvalidSmilesError, match="broken drug.*C1CC"):
        simulate_drug_screen(n_cells=50, n_genes=30, n_drugs=2, n_affected_genes=5, smiles=bad)
    with pytest.raises(ValueError, match="Drug names must be unique"):
        simulate_drug_screen(
            n_cells=50, n_genes=30, n_drugs=2, n_affected_genes=5,
            smiles=pd.DataFrame({"name": ["a", "a"], "smiles": ["C", "N"]}),
        )  # fmt: skip
    with pytest.raises(ValueError, match="'smiles' column"):
        simulate_drug_screen(smiles=pd.DataFrame({"drug": ["a"], "structure": ["C"]}))
    with pytest.raises(ValueError, match="n_affected_genes=50 exceeds n_genes=30"):
        simulate_drug_screen(n_cells=50, n_genes=30)
    with pytest.raises(ValueError, match="doses must be positive"):
        simulate_drug_screen(n_cells=50, n_genes=60, doses=(0.0, 1.0))
    with pytest.raises(ValueError, match="control_fraction"):
        simulate_drug_screen(n_cells=50, n_genes=60, control_fraction=1.0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        simulate_drug_screen(n_cells=50, n_genes=60, seed=None)
    with pytest.raises(ValueError, match="n_drugs must be an integer >= 2"):
        simulate_drug_screen(n_cells=50, n_genes=60, n_drugs=1)


# ------------------------------------------------------------- the target-class world
def test_target_class_world_drugs_of_one_class_share_its_program():
    adata = simulate_drug_screen(
        n_cells=400, n_genes=300, n_drugs=40, seed=3, world="targets", idiosyncratic_effect=0.0
    )
    truth = adata.uns["simulation"]
    classes = truth["drug_class"]
    effect = truth["lfc_max"] - np.where(classes[:, None] >= 0, truth["shared_lfc"][None, :], 0)
    assert truth["params"]["world"] == "targets"
    assert (classes == -1).any() and len(set(classes[classes >= 0])) >= 3
    # inactive drugs: no effect at all without the idiosyncratic part
    np.testing.assert_array_equal(effect[classes == -1], 0.0)
    # active drugs of one class: proportional effects (one program, different potencies)
    for c in set(classes[classes >= 0]):
        rows = effect[classes == c]
        for row in rows[1:]:
            np.testing.assert_allclose(np.corrcoef(rows[0], row)[0, 1], 1.0, atol=1e-9)
    # drugs of different classes: different programs
    first = [effect[classes == c][0] for c in sorted(set(classes[classes >= 0]))[:2]]
    assert abs(np.corrcoef(*first)[0, 1]) < 0.5


def test_target_class_world_adds_an_idiosyncratic_program_and_keeps_the_linear_default():
    kw = dict(n_cells=400, n_genes=300, n_drugs=20, seed=1)
    pure = simulate_drug_screen(world="targets", idiosyncratic_effect=0.0, **kw)
    noisy = simulate_drug_screen(world="targets", idiosyncratic_effect=0.5, **kw)
    inactive = noisy.uns["simulation"]["drug_class"] == -1
    assert (np.abs(noisy.uns["simulation"]["lfc_max"][inactive]).sum(1) > 0).all()
    assert not np.allclose(pure.uns["simulation"]["lfc_max"], noisy.uns["simulation"]["lfc_max"])
    linear = simulate_drug_screen(**kw)
    assert linear.uns["simulation"]["params"]["world"] == "linear"
    assert (linear.uns["simulation"]["drug_class"] == -1).all()
    with pytest.raises(ValueError, match="world='nonlinear'"):
        simulate_drug_screen(world="nonlinear", **kw)
