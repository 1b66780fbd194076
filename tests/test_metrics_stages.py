"""The stages of ``perturbx.metrics.score``, each checked on its own with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import perturbx.metrics as pm
from perturbx.metrics._cells import real_cells
from perturbx.metrics._stages import de_statistics, match_conditions, real_means

KEYS = dict(
    perturbation_key="drug", dose_key=None, covariate_keys=["cell_type"], control_value="control"
)


def _real(seed: int = 0) -> AnnData:
    rng = np.random.default_rng(seed)
    drugs = np.repeat(["control", "A", "B", "C"], 24)
    cell_type = np.tile(np.repeat(["x", "y"], 12), 4)
    counts = rng.poisson(50.0, size=(len(drugs), 8)).astype(np.float32)
    counts[drugs == "A", 0] += 150  # A raises gene 0
    obs = pd.DataFrame(
        {"drug": drugs, "cell_type": cell_type}, index=[f"c{i}" for i in range(len(drugs))]
    )
    return AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(8)]))


def test_match_conditions_picks_evaluated_control_and_training_rows():
    real = _real()
    pred = real[real.obs["drug"] == "A"].copy()
    match = match_conditions(real.obs, pred.obs, train_perturbations=None, **KEYS)
    assert match.eval_table["perturbation"].tolist() == ["A", "A"]
    assert match.eval_table["cell_type"].tolist() == ["x", "y"]
    controls = match.real_table.iloc[list(match.control_rows.values())]
    assert controls["is_control"].all() and controls["cell_type"].tolist() == ["x", "y"]
    training = match.real_table.iloc[match.train_rows]
    assert sorted(set(training["perturbation"])) == ["B", "C"]
    with pytest.raises(ValueError, match="absent from real"):
        match_conditions(real.obs, pred.obs.assign(drug="D"), train_perturbations=None, **KEYS)


def test_real_means_are_the_log_normalised_means_of_the_right_cells():
    real = _real()
    pred = real[real.obs["drug"] == "A"].copy()
    match = match_conditions(real.obs, pred.obs, train_perturbations=None, **KEYS)
    genes = real.var_names.sort_values()
    means = real_means(
        real_cells(real, None),
        real.obs_names.to_numpy(),
        match,
        genes,
        counts=None,
        target_sum=1e4,
        use_duplicate=False,
        seed=0,
    )
    x = real.X / real.X.sum(1, keepdims=True) * 1e4
    logged = pd.DataFrame(np.log1p(x), index=real.obs_names, columns=real.var_names)[genes]
    obs = real.obs
    for e, cell_type in enumerate(["x", "y"]):
        truth = logged[(obs["drug"] == "A") & (obs["cell_type"] == cell_type)].mean()
        control = logged[(obs["drug"] == "control") & (obs["cell_type"] == cell_type)].mean()
        centroid = pd.concat(
            [
                logged[(obs["drug"] == d) & (obs["cell_type"] == cell_type)].mean(axis=0)
                for d in ("B", "C")
            ],
            axis=1,
        ).mean(axis=1)
        np.testing.assert_allclose(means.true_means[e], truth, rtol=1e-6)
        np.testing.assert_allclose(means.control[e], control, rtol=1e-6)
        np.testing.assert_allclose(means.centroid[e], centroid, rtol=1e-6)
    assert means.counts and (means.n_cells_true == 12).all() and not means.eligible.any()


def test_de_statistics_find_the_changed_gene_and_can_be_passed_back_in():
    real = _real()
    pred = real[real.obs["drug"].isin(["A", "B"])].copy()
    first = pm.score(pred, real, **KEYS)
    match = match_conditions(real.obs, pred.obs, train_perturbations=None, **KEYS)
    genes = real.var_names.sort_values()
    means = real_means(
        real_cells(real, None),
        real.obs_names.to_numpy(),
        match,
        genes,
        counts=None,
        target_sum=1e4,
        use_duplicate=True,
        seed=0,
    )
    de = de_statistics(means, match, genes, "t-test_overestim_var")
    a_rows = [i for i, c in enumerate(de.conditions) if c.startswith("A")]
    assert all(genes[np.argmax(np.abs(de.scores[i]))] == "g0" for i in a_rows)
    np.testing.assert_array_equal(de.scores, first.de_statistics.scores)
    # the statistics of the first call stand in for the DE tests of a second one
    pm.clear_de_cache()
    again = pm.score(pred, real, de_statistics=first.de_statistics, **KEYS)
    pd.testing.assert_frame_equal(again.per_condition, first.per_condition)
    with pytest.raises(ValueError, match="other conditions"):
        pm.score(
            pred[pred.obs["drug"] == "A"].copy(), real, de_statistics=first.de_statistics, **KEYS
        )
    with pytest.raises(ValueError, match="positive-control split"):
        pm.score(pred, real, de_statistics=first.de_statistics, seed=1, **KEYS)


def test_a_group_without_training_conditions_gets_the_other_groups_mean_delta():
    real = _real()
    obs = real.obs
    # group x keeps only its controls and the evaluated A: no training conditions of its own
    keep = ~((obs["cell_type"] == "x") & obs["drug"].isin(["B", "C"])).to_numpy()
    real = real[keep].copy()
    pred = real[(real.obs["drug"] == "A") & (real.obs["cell_type"] == "x")].copy()
    match = match_conditions(real.obs, pred.obs, train_perturbations=None, **KEYS)
    genes = real.var_names.sort_values()
    means = real_means(
        real_cells(real, None),
        real.obs_names.to_numpy(),
        match,
        genes,
        counts=None,
        target_sum=1e4,
        use_duplicate=False,
        seed=0,
    )
    x = real.X / real.X.sum(1, keepdims=True) * 1e4
    logged = pd.DataFrame(np.log1p(x), index=real.obs_names, columns=real.var_names)[genes]
    o = real.obs

    def mean_of(drug, cell_type):
        return logged[(o["drug"] == drug) & (o["cell_type"] == cell_type)].mean()

    deltas = [mean_of(d, "y") - mean_of("control", "y") for d in ("A", "B", "C")]
    expected = mean_of("control", "x") + pd.concat(deltas, axis=1).mean(axis=1)
    np.testing.assert_allclose(means.centroid[0], expected, rtol=1e-6)
    assert means.transferred_centroid.tolist() == [True]
    result = pm.score(pred, real, **KEYS)
    assert "the other groups' mean delta" in result.per_condition["note"].iloc[0]
    row = result.per_condition.set_index("method").loc["interpolated_duplicate"]
    assert np.isfinite(row["weighted_mse"])  # the positive control exists again
