"""End to end on a real screen: LINCS L1000 A375, 8+ drugs held out by SMILES."""

import numpy as np
import pytest
import scvi

from perturbx import PerturbX
from perturbx.data import split_unseen_perturbations
from perturbx.datasets import lincs_a375


@pytest.fixture(scope="module")
def lincs(data_cache):
    return lincs_a375(cache_dir=data_cache)


def test_held_out_drugs_are_predicted_and_scored_with_baselines(lincs):
    adata = lincs.copy()
    split_unseen_perturbations(
        adata, "perturbation", dose_key="dose", n_held_out=8, require_key="has_smiles", seed=0
    )
    test = adata[adata.obs["split"] == "test"].copy()
    held_out = set(test.obs["perturbation"]) - {"control"}
    assert len(held_out) >= 8
    assert all(test.obs.loc[test.obs["perturbation"] != "control", "has_smiles"])
    assert not held_out & set(adata.obs.loc[adata.obs["split"] == "train", "perturbation"])

    scvi.settings.seed = 0
    PerturbX.setup_anndata(
        adata,
        perturbation_key="perturbation",
        dose_key="dose",
        smiles_key="smiles",
        control_value="control",
    )
    model = PerturbX(adata, likelihood="gaussian", n_latent=16, n_hidden=64, n_layers=1)
    model.train(max_epochs=5, batch_size=32, split_key="split", enable_progress_bar=False)
    result = model.evaluate(test, n_cells_per_target=10)

    table = result.per_condition
    assert set(table["method"]) >= {"PerturbX", "control_mean", "perturbed_centroid"}
    assert set(table["perturbation"]) == held_out
    n_conditions = test.obs.loc[test.obs["perturbation"] != "control", ["perturbation", "dose"]]
    assert table["condition"].nunique() == len(n_conditions.drop_duplicates())
    model_rows = table[table["method"] == "PerturbX"]
    assert np.isfinite(model_rows["weighted_mse"]).all()
    # One well per drug and dose: no positive control, reported as such.
    duplicate = table[table["method"] == "interpolated_duplicate"]
    assert duplicate.empty or duplicate["mse"].isna().all()
    assert {"median", "mean"} <= set(result.summary.columns)
