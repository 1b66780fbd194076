"""Hyperparameter search with Ray Tune (``perturbx.tune``), scored on validation conditions.

A two-trial search runs once for the module on a tiny simulated screen whose split holds out
whole perturbations for validation and for test (~20-30 s on 2 cores, most of it starting
Ray and importing torch in its worker). Each reported metric is checked against a model
trained here, in this process, with the plain PerturbX API and the trial's configuration.
"""

import math
import re
import sys

import numpy as np
import pytest

pytest.importorskip("ray.tune", reason='Ray Tune not installed (pip install "perturbx[tune]")')

import ray  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from perturbx import PerturbX  # noqa: E402
from perturbx.data import simulate_drug_screen, split_unseen_perturbations  # noqa: E402
from perturbx.tune import (  # noqa: E402
    default_search_space,
    run_search,
    search_space_keys,
)

SETUP = dict(
    perturbation_key="drug", dose_key="dose", smiles_key="smiles", covariate_keys=["cell_type"]
)
MAX_EPOCHS = 2
SEED = 0
# Sampled: one model, one plan and one train argument at least; the rest fixed and tiny.
SPACE = {
    "n_latent": tune.choice([4, 8, 16]),
    "dropout_rate": tune.choice([0.0, 0.1]),
    "lr": tune.loguniform(1e-3, 1e-2),
    "adversary_weight": tune.loguniform(1.0, 100.0),
    "adversary_every": tune.choice([2, 3]),
    "batch_size": tune.choice([64, 128]),
    "n_hidden": 32,
    "n_layers": 1,
    "drug_encoder_hidden": 32,
    "adversary_hidden": 16,
}
# How this test expects a configuration to reach the model (written out independently).
MODEL_ARGS = (
    "n_latent",
    "dropout_rate",
    "n_hidden",
    "n_layers",
    "drug_encoder_hidden",
    "adversary_hidden",
)
PLAN_ARGS = ("lr", "adversary_weight", "adversary_every")


def tiny_screen():
    adata = simulate_drug_screen(
        n_cells=600, n_genes=50, n_drugs=8, doses=(1.0, 10.0), n_affected_genes=10, seed=0
    )
    split_unseen_perturbations(
        adata,
        "drug",
        dose_key="dose",
        n_held_out=2,
        validation_unit="perturbation",
        validation_fraction=0.3,
        covariate_keys=["cell_type"],
    )
    return adata


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    adata = tiny_screen()
    obs_before, uns_before = adata.obs.copy(), set(adata.uns)
    result = run_search(
        adata,
        setup_kwargs=SETUP,
        split_key="split",
        search_space=SPACE,
        num_samples=2,
        max_epochs=MAX_EPOCHS,
        num_cpus=1,  # trials one after the other: never more than one torch thread busy
        seed=SEED,
        storage_path=str(tmp_path_factory.mktemp("ray_results")),
    )
    # The user's AnnData is neither set up nor changed, and the Ray started here is stopped.
    assert adata.obs.equals(obs_before) and set(adata.uns) == uns_before
    assert "_perturbx_perturbations" not in adata.obsm
    assert not ray.is_initialized()
    return adata, result


def config_of(row) -> dict:
    return {k[len("config/") :]: row[k] for k in row.index if k.startswith("config/")}


def retrain_and_score(adata, config: dict, cells: str) -> tuple[float, list[str]]:
    """Train with the plain PerturbX API and score the ``cells`` split's conditions.

    With one torch thread, as the trials ran (``num_cpus=1``): with two, sums are split
    differently and the metric can differ in the fifth digit.
    """
    adata = adata.copy()
    PerturbX.setup_anndata(adata, **SETUP)
    scvi.settings.seed = SEED
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = PerturbX(adata, **{k: config[k] for k in MODEL_ARGS})
        model.train(
            max_epochs=MAX_EPOCHS,
            batch_size=int(config["batch_size"]),
            split_key="split",
            plan_kwargs={k: config[k] for k in PLAN_ARGS},
            seed=SEED,
            enable_progress_bar=False,
        )
        evaluation = model.evaluate(
            adata[adata.obs["split"] == cells].copy(),
            baselines=("perturbed_centroid",),
            seed=SEED,
        )
    finally:
        torch.set_num_threads(threads)
    rows = evaluation.per_condition[evaluation.per_condition["method"] == "PerturbX"]
    return float(rows["weighted_mse"].median()), sorted(set(rows["perturbation"]))


def test_two_trials_with_different_configurations_from_the_space(search):
    _, result = search
    table = result.results
    assert len(table) == 2
    assert table["error"].isna().all()
    configs = [config_of(row) for _, row in table.iterrows()]
    assert configs[0] != configs[1]
    for config in configs:
        assert config["n_latent"] in (4, 8, 16) and config["adversary_every"] in (2, 3)
        assert 1e-3 <= config["lr"] <= 1e-2 and 1.0 <= config["adversary_weight"] <= 100.0
        assert config["n_hidden"] == 32  # constants pass through unchanged
    assert np.isfinite(table["weighted_mse"].astype(float)).all()
    assert (table["n_conditions"] > 0).all()


def test_best_configuration_has_the_minimum_metric(search):
    _, result = search
    table = result.results
    assert result.metric == "weighted_mse" and result.mode == "min"  # mode from metric_info
    best = table["weighted_mse"].astype(float).idxmin()
    assert result.best_metrics["weighted_mse"] == table.loc[best, "weighted_mse"]
    assert result.best_config == config_of(table.loc[best])


def test_reported_metric_is_that_of_the_validation_conditions(search):
    adata, result = search
    info = adata.uns["perturbx_splits"]["split"]
    validation, test = info["validation_perturbations"], info["held_out"]
    assert validation and test and not set(validation) & set(test)
    for _, row in result.results.iterrows():
        assert row["perturbations"].split(";") == sorted(validation)
        value, perturbations = retrain_and_score(adata, config_of(row), "validation")
        assert perturbations == sorted(validation)
        assert math.isclose(row["weighted_mse"], value, rel_tol=1e-6)


def test_default_search_space_is_documented_and_routable():
    space = default_search_space()
    assert set(space) == {
        "n_latent",
        "dropout_rate",
        "dose_response",
        "lr",
        "dose_lr",
        "dispersion_lr",
        "adversary_lr",
        "adversary_weight",
        "adversary_every",
    }
    known = {k for keys in search_space_keys().values() for k in keys}
    assert set(space) <= known
    assert "adversary_weight" in search_space_keys()["plan"]
    assert "n_latent" in search_space_keys()["model"]


def test_unknown_search_space_key_is_named():
    adata = tiny_screen()
    with pytest.raises(ValueError, match="n_latnet"):
        run_search(
            adata,
            setup_kwargs=SETUP,
            search_space={"n_latnet": tune.choice([8, 16])},
            num_samples=1,
        )
    assert not ray.is_initialized()


def test_split_without_validation_cells_is_rejected():
    adata = tiny_screen()
    adata.obs["split"] = adata.obs["split"].astype(str).replace("validation", "train")
    with pytest.raises(ValueError, match="no 'validation' cells"):
        run_search(adata, setup_kwargs=SETUP, search_space=SPACE, num_samples=1)
    with pytest.raises(KeyError, match="my_split"):
        run_search(adata, setup_kwargs=SETUP, split_key="my_split", num_samples=1)
    assert not ray.is_initialized()


def test_missing_ray_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=re.escape('pip install "perturbx[tune]"')):
        run_search(tiny_screen(), setup_kwargs=SETUP, num_samples=1)


def test_unknown_metric_and_bad_setup_are_rejected_before_ray_starts():
    adata = tiny_screen()
    with pytest.raises(ValueError, match="weighted_mae"):
        run_search(adata, setup_kwargs=SETUP, metric="weighted_mae", num_samples=1)
    with pytest.raises(KeyError, match="dosage"):
        run_search(adata, setup_kwargs={**SETUP, "dose_key": "dosage"}, num_samples=1)
    assert not ray.is_initialized()
