"""``evaluate`` reduces predictions to per-condition means batch by batch.

It must score exactly what scoring the cells of ``predict_conditions`` gives, without ever
holding those cells.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX, PerturbXEnsemble
from perturbx.metrics import score
from perturbx.metrics._pseudobulk import group_means, log_normalise
from perturbx.model._evaluation import predicted_condition_means

HELD_OUT = ["control", "caffeine", "aspirin+caffeine"]
KEYS = ["condition", "perturbation", "dose", "cell_type"]


def _trained(likelihood: str, seed: int = 0) -> tuple[PerturbX, object]:
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata, likelihood=likelihood, **SMALL_ARCH)
    model.train(max_epochs=2, batch_size=64, seed=seed, enable_progress_bar=False)
    return model, adata


def _held_out(adata):
    return adata[adata.obs["drug"].isin(HELD_OUT)].copy()


def _means_of_cells(cells, means):
    """Means of the log-normalised predicted ``cells`` per condition, in the row order of
    ``means``, and the number of cells of each."""
    columns = ["drug", "dose", "cell_type"]
    logged, _ = log_normalise(cells.X, counts=True)
    codes, labels = pd.factorize(cells.obs[columns].astype(str).agg("|".join, axis=1))
    expected, n_cells = group_means(logged, codes, len(labels))
    order = means.obs[columns].astype(str).agg("|".join, axis=1)
    assert sorted(order) == sorted(labels)
    rows = [list(labels).index(label) for label in order]
    return expected[rows], n_cells[rows]


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_evaluate_equals_scoring_the_predicted_cells(likelihood):
    model, adata = _trained(likelihood)
    held = _held_out(adata)
    result = model.evaluate(held, n_cells_per_target=150, seed=3)
    cells = model.predict_conditions(held, n_cells_per_target=150, seed=3)
    cells.obs["method"] = "PerturbX"
    direct = score(
        cells,
        held,
        perturbation_key="drug",
        dose_key="dose",
        covariate_keys=["cell_type"],
        method_key="method",
        counts=likelihood == "nb",
        seed=3,
        centroid_reference=adata[model.train_indices],
    )
    got = result.per_condition.set_index(["method", *KEYS]).sort_index()
    want = direct.per_condition.set_index(["method", *KEYS]).sort_index()
    assert got.index.equals(want.index)
    assert set(got.index.get_level_values("method")) == {
        "PerturbX",
        "control_mean",
        "perturbed_centroid",
        "interpolated_duplicate",
    }
    # predicted cells per condition, not rows of the means (Gaussian: one expected value
    # per matching control, fewer than 150; counts: 150 draws)
    np.testing.assert_array_equal(got["n_obs_pred"], want["n_obs_pred"])
    if likelihood == "nb":
        assert (got.loc["PerturbX", "n_obs_pred"] == 150).all()
    for metric in result.metrics:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, atol=1e-6, err_msg=metric)
    assert np.isfinite(got.loc["PerturbX", "weighted_mse"]).all()
    assert "per-condition means of the predicted cells" in result.normalisation


def test_condition_means_are_the_means_of_the_log_normalised_cells():
    model, adata = _trained("nb")
    held = _held_out(adata)
    # several batches per condition (each batch draws with its own seed)
    means = predicted_condition_means([model], held, n_cells_per_target=40, seed=1, batch_size=16)
    cells = model.predict_conditions(held, n_cells_per_target=40, seed=1, batch_size=16)
    expected, n_cells = _means_of_cells(cells, means)
    np.testing.assert_allclose(means.X, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(means.obs["n_cells"], n_cells)
    assert (means.obs["n_cells"] == 40).all()


def test_ensemble_means_take_each_cell_from_its_member():
    adata = toy_screen()
    setup_toy(adata)
    ensemble = PerturbXEnsemble(adata, n_models=2, seed=1, **SMALL_ARCH)
    ensemble.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    models = ensemble.models
    held = _held_out(adata)
    means = predicted_condition_means(models, held, n_cells_per_target=31, seed=2, batch_size=15)
    # odd batch and condition sizes: batches start at odd and even cells
    cells = ensemble.predict_conditions(held, n_cells_per_target=31, seed=2, batch_size=15)
    expected, _ = _means_of_cells(cells, means)
    np.testing.assert_allclose(means.X, expected, rtol=1e-5, atol=1e-6)
    # and not what either member alone predicts
    alone = predicted_condition_means(
        models[:1], held, n_cells_per_target=31, seed=2, batch_size=15
    )
    assert not np.allclose(means.X, alone.X)


def test_evaluate_does_not_hold_the_predicted_cells():
    model, adata = _trained("nb")
    held = _held_out(adata)
    n_cells = 20_000  # per condition: 4 conditions x 20k cells x 50 genes = 16 MB as float32
    cells_bytes = 4 * n_cells * adata.n_vars * 4
    tracemalloc.start()
    try:
        result = model.evaluate(held, n_cells_per_target=n_cells, baselines=())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.per_condition["n_obs_pred"] == n_cells).all()
    assert peak < cells_bytes / 4, f"peak {peak / 2**20:.1f} MiB"


def test_progress_bar_only_for_work_that_lasts(capsys, monkeypatch):
    model, adata = _trained("nb")
    held = _held_out(adata)
    predicted_condition_means([model], held, n_cells_per_target=20, seed=0)
    assert "Predicting conditions" not in capsys.readouterr().err

    batches = model.decode_prediction

    def slow_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            time.sleep(0.7)
            yield batch

    monkeypatch.setattr(model, "decode_prediction", slow_batches)
    # 4 conditions x 20 cells in batches of 20: 4 batches, 2.8 s in all
    predicted_condition_means([model], held, n_cells_per_target=20, seed=0, batch_size=20)
    assert "Predicting conditions" in capsys.readouterr().err
