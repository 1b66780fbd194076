"""perturbx.metrics.score on data where the answer is known: simulated counts, hand-built means."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import perturbx.metrics as pm
from perturbx.metrics import _de

N_GENES = 120


def simulate(
    seed: int = 0,
    n_eval: int = 8,
    n_train: int = 4,
    cells: int = 40,
    singles: int = 2,
    cell_lines=("x",),
) -> AnnData:
    """Poisson counts: controls, evaluated drugs E*, training drugs T*, single wells S*.

    Every drug shares a generic response (so the perturbed centroid resembles each of
    them) plus a drug-specific one (so it differs from each of them).
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, N_GENES) + 0.2
    shared = rng.normal(0.0, 0.8, N_GENES) * (rng.random(N_GENES) < 0.4)
    blocks, obs = [], []

    def add(drug, line, n, log_fold):
        library = rng.uniform(0.7, 1.3, (n, 1)) * 15
        blocks.append(rng.poisson(base * np.exp(log_fold) * library))
        obs.extend([(drug, line)] * n)

    for line in cell_lines:
        add("control", line, 100, np.zeros(N_GENES))
        for name, n in (
            [(f"E{i}", cells) for i in range(n_eval)]
            + [(f"T{i}", cells) for i in range(n_train)]
            + [(f"S{i}", 1) for i in range(singles)]
        ):
            specific = rng.normal(0.0, 1.0, N_GENES) * (rng.random(N_GENES) < 0.2)
            add(name, line, n, shared + specific)
    obs = pd.DataFrame(obs, columns=["drug", "cell_line"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = AnnData(np.vstack(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"gene{i:03d}" for i in range(N_GENES)]
    return adata


def evaluated(real: AnnData) -> AnnData:
    return real[real.obs["drug"].str.match(r"[ES]\d")].copy()


def rows(result, method):
    table = result.per_condition
    return table[table["method"] == method].set_index("condition")


@pytest.fixture(scope="module")
def real() -> AnnData:
    return simulate()


@pytest.fixture(scope="module")
def result(real):
    return pm.score(evaluated(real), real, perturbation_key="drug")


def test_simulated_baselines_and_perfect_prediction(result):
    neg = rows(result, "perturbed_centroid")
    # The mean baseline captures the generic response...
    assert neg["pearson_delta_control"].median() > 0.5
    # ...but nothing specific: its delta against the centroid is constant -> NaN, scored 0.
    assert neg["pearson_delta_centroid"].isna().all()
    norm = result.normalised[result.normalised["method"] == "perturbed_centroid"]
    finite = norm[result.metrics].to_numpy(float)
    np.testing.assert_allclose(finite[np.isfinite(finite)], 0.0, atol=1e-9)
    # The model here predicts the real cells themselves (all of them): close to perfect.
    model = rows(result, "model")
    assert (model["pearson_delta_centroid"] > 0.9).all()
    assert (model["centroid_accuracy"] == 1.0).all()
    assert (model["overlap_at_20"] > 0.7).all()
    # The positive control spans most of the range on the key metrics.
    for metric in (
        "mse",
        "pearson_delta_control",
        "pearson_delta_centroid",
        "r2",
        "weighted_mse",
        "centroid_accuracy",
    ):
        assert result.calibration.loc[metric, "median_drf"] > 0, metric
    assert result.calibration.loc["pearson_delta_centroid", "well_calibrated"]
    assert "normalised to 10000 per cell" in result.normalisation
    assert result.per_condition.attrs["normalisation"] == result.normalisation
    # The summary has one row per method x metric.
    assert len(result.summary) == 4 * len(result.metrics)
    summary = result.summary.set_index(["method", "metric"])
    assert summary.loc[("model", "mse"), "median"] == pytest.approx(model["mse"].median())


def test_single_sample_conditions_get_z_scores_and_no_positive_control(result, real):
    pos = rows(result, "interpolated_duplicate")
    for name in ("S0", "S1"):
        assert pos.loc[name, "de_test"] == "z-score"
        assert pos.loc[name, ["mse", "pearson_delta_centroid", "r2"]].isna().all()
        assert "single sample" in pos.loc[name, "note"]
        assert rows(result, "model").loc[name, "truth"] == "all_cells"
    assert pos.loc["E0", "de_test"] == "t-test_overestim_var"
    assert np.isfinite(pos.loc["E0", "mse"])
    # z-score = (x - mean_ctrl) / sd_ctrl on log-normalised data, computed here independently
    lognorm = np.log1p(real.X / real.X.sum(axis=1, keepdims=True) * 1e4)
    ctrl = lognorm[(real.obs["drug"] == "control").to_numpy()].astype(np.float64)
    well = lognorm[(real.obs["drug"] == "S0").to_numpy()][0]
    z = (well - ctrl.mean(0)) / ctrl.std(0, ddof=1)
    order = np.argsort(real.var_names)
    refs = result.references
    np.testing.assert_allclose(refs["S0"].layers["de_scores"][0], z[order], rtol=1e-4, atol=1e-4)


def test_truth_is_first_half_and_positive_control_formula(result, real):
    refs = result.references
    lognorm = np.log1p(real.X / real.X.sum(axis=1, keepdims=True) * 1e4)[
        :, np.argsort(real.var_names)
    ]
    full = lognorm[(real.obs["drug"] == "E3").to_numpy()].astype(np.float64).mean(0)
    row = refs["E3"]
    assert int(row.obs["n_cells_true"].iloc[0]) == 20
    # the two halves partition the cells: 20 * first + 20 * second == 40 * full mean
    np.testing.assert_allclose(
        20 * row.X[0] + 20 * row.layers["second_half"][0], 40 * full, rtol=1e-5
    )
    assert not np.allclose(row.X[0], full)
    p = row.layers["second_half_pvals_adj"][0]
    expected = (1 - p) * row.layers["second_half"][0] + p * row.layers["centroid"][0]
    centroid_rows = rows(result, "interpolated_duplicate")
    assert centroid_rows.loc["E3", "mse"] == pytest.approx(np.mean((expected - row.X[0]) ** 2))
    # control and unweighted centroid of the training drugs, computed independently
    train = [lognorm[(real.obs["drug"] == f"T{i}").to_numpy()].mean(0) for i in range(4)]
    np.testing.assert_allclose(row.layers["centroid"][0], np.mean(train, axis=0), rtol=1e-5)
    ctrl = lognorm[(real.obs["drug"] == "control").to_numpy()].mean(0)
    np.testing.assert_allclose(row.layers["control"][0], ctrl, rtol=1e-5)


def test_score_means_reproduces_score(result):
    refs = result.references
    model = rows(result, "model")
    pred = np.vstack([refs.X[i] for i in range(refs.n_obs)])  # truth as prediction
    again = pm.score_means(
        pred,
        refs.X,
        refs.layers["control"],
        refs.layers["centroid"],
        refs.layers["de_scores"],
        index=refs.obs_names,
    )
    assert (again["mse"] == 0).all() and (again["centroid_accuracy"] == 1).all()
    # scoring the control mean reproduces the control_mean rows
    ctrl = pm.score_means(
        refs.layers["control"],
        refs.X,
        refs.layers["control"],
        refs.layers["centroid"],
        refs.layers["de_scores"],
        index=refs.obs_names,
    )
    expected = rows(result, "control_mean").loc[refs.obs_names, "mse"]
    np.testing.assert_allclose(ctrl["mse"], expected)
    assert list(model.index) == list(refs.obs_names)


def test_perfect_and_centroid_predictions_as_pseudobulk_rows(result, real):
    refs = result.references
    obs = pd.DataFrame(
        {
            "drug": list(refs.obs["perturbation"]) * 2,
            "method": ["perfect"] * refs.n_obs + ["centroid"] * refs.n_obs,
        }
    )
    obs.index = [f"p{i}" for i in range(len(obs))]
    pred = AnnData(
        np.vstack([refs.X, refs.layers["centroid"]]),
        obs=obs,
        var=pd.DataFrame(index=refs.var_names),
    )
    out = pm.score(pred, real, perturbation_key="drug", method_key="method")
    perfect = rows(out, "perfect")
    info = pm.metric_info()
    for metric in out.metrics:
        best = info.loc[metric, "perfect_value"]
        np.testing.assert_allclose(perfect[metric], best, atol=1e-5, err_msg=metric)
    centroid = rows(out, "centroid")
    assert centroid["pearson_delta_centroid"].isna().all()
    norm = out.normalised[out.normalised["method"] == "centroid"][out.metrics]
    values = norm.to_numpy(float)
    np.testing.assert_allclose(values[np.isfinite(values)], 0.0, atol=1e-4)
    assert (
        np.isfinite(values).sum()
        > 0.8
        * np.isfinite(
            out.normalised[out.normalised["method"] == "perfect"][out.metrics].to_numpy(float)
        ).sum()
    )


def test_de_runs_once_per_dataset(monkeypatch):
    real = simulate(seed=3, n_eval=3, n_train=2, cells=10, singles=0, cell_lines=("x", "y"))
    calls = []
    original = _de._run_rank_genes_groups

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(_de, "_run_rank_genes_groups", counting)
    pm.clear_de_cache()
    kwargs = dict(perturbation_key="drug", covariate_keys=["cell_line"])
    pred = evaluated(real)
    first = pm.score(pred, real, **kwargs)
    assert len(calls) == 2  # one test per cell line, covering all its conditions
    assert len(calls[0]) == 3 + 3  # truth groups + second halves, in the same call
    pred.obs["method"] = np.where(np.arange(pred.n_obs) % 2, "a", "b")
    second = pm.score(pred, real, method_key="method", **kwargs)
    assert len(calls) == 2  # reused across methods and calls
    pd.testing.assert_series_equal(
        rows(first, "perturbed_centroid")["weighted_mse"],
        rows(second, "perturbed_centroid")["weighted_mse"],
    )
    pm.score(pred, real, seed=1, method_key="method", **kwargs)
    assert len(calls) == 4  # another split is another dataset


def test_invariant_to_order_of_cells_genes_and_conditions(real):
    pred = evaluated(real)
    base = pm.score(pred, real, perturbation_key="drug").per_condition
    rng = np.random.default_rng(5)
    real2 = real[rng.permutation(real.n_obs)][:, rng.permutation(real.n_vars)].copy()
    pred2 = pred[rng.permutation(pred.n_obs)][:, rng.permutation(pred.n_vars)].copy()
    other = pm.score(pred2, real2, perturbation_key="drug").per_condition
    key = ["method", "condition"]
    base, other = (
        base.sort_values(key).reset_index(drop=True),
        other.sort_values(key).reset_index(drop=True),
    )
    pd.testing.assert_frame_equal(base, other, rtol=1e-6, atol=1e-9)


def test_conditions_match_across_dose_formats_and_combination_order():
    rng = np.random.default_rng(0)
    drugs = ["control"] * 6 + ["A+B"] * 4 + ["C"] * 4 + ["D"] * 4
    doses = ["0"] * 6 + ["1+10"] * 4 + ["1"] * 4 + ["2"] * 4
    real = AnnData(
        rng.normal(size=(18, 5)),
        obs=pd.DataFrame({"drug": drugs, "dose": doses}, index=[f"r{i}" for i in range(18)]),
    )
    real.var_names = list("abcde")
    pred = AnnData(
        rng.normal(size=(2, 5)),
        obs=pd.DataFrame({"drug": ["B+A", "C"], "dose": ["10.0+1.0", "1.0"]}, index=["p0", "p1"]),
    )
    pred.var_names = list("edcba")
    out = pm.score(
        pred, real, perturbation_key="drug", dose_key="dose", baselines=("perturbed_centroid",)
    )
    model = rows(out, "model")
    assert sorted(model.index) == ["A+B @ 1.0+10.0", "C @ 1.0"]
    assert "D" not in set(out.per_condition["perturbation"])
    assert out.settings["n_training_conditions"] == 1  # D only
    # hand check: data are not counts, so means are used as given; genes matched by name
    truth = real.X[np.asarray(drugs) == "C"].mean(0)
    pred_c = pred.X[1, ::-1]
    assert model.loc["C @ 1.0", "mse"] == pytest.approx(np.mean((pred_c - truth) ** 2))
    mu = real.X[np.asarray(drugs) == "D"].mean(0)
    neg = rows(out, "perturbed_centroid")
    assert neg.loc["C @ 1.0", "mse"] == pytest.approx(np.mean((mu - truth) ** 2))
    assert "used as given" in out.normalisation
    assert out.calibration["median_drf"].isna().all()  # no positive control requested
    assert not out.calibration["well_calibrated"].any()


def test_centroid_is_unweighted_over_training_conditions_and_train_list():
    # T1 has 9 cells and T2 has 3: an unweighted centroid is the plain mean of their means.
    X = np.vstack(
        [
            np.zeros((4, 3)),
            np.ones((9, 3)) * [1, 2, 3],
            np.ones((3, 3)) * [5, 0, 1],
            np.ones((2, 3)) * [9, 9, 9],
            np.ones((2, 3)) * [2, 2, 2],
        ]
    )
    drugs = ["control"] * 4 + ["T1"] * 9 + ["T2"] * 3 + ["E"] * 2 + ["U"] * 2
    real = AnnData(
        X + np.linspace(0, 0.01, 3),
        obs=pd.DataFrame({"drug": drugs}, index=[f"c{i}" for i in range(len(drugs))]),
    )
    pred = real[real.obs["drug"] == "E"].copy()
    out = pm.score(
        pred,
        real,
        perturbation_key="drug",
        train_perturbations=["T1", "T2"],
        baselines=("perturbed_centroid",),
    )
    refs = out.references
    np.testing.assert_allclose(
        refs.layers["centroid"][0], np.array([3, 1, 2]) + np.linspace(0, 0.01, 3)
    )
    with pytest.raises(ValueError, match="'T9'"):
        pm.score(pred, real, perturbation_key="drug", train_perturbations=["T1", "T9"])


def test_lincs_like_bulk_screen_without_replicates():
    rng = np.random.default_rng(2)
    n_genes = 30
    ctrl = rng.normal(8, 0.3, (6, n_genes))
    wells = 8 + rng.normal(0, 1.0, (8, n_genes))
    drugs = ["DMSO"] * 6 + [f"d{i % 4}" for i in range(8)]
    doses = ["-666"] * 6 + ["0.04", "0.04", "0.04", "0.04", "10", "10", "10", "10"]
    real = AnnData(
        np.vstack([ctrl, wells]),
        obs=pd.DataFrame({"drug": drugs, "dose": doses}, index=[f"w{i}" for i in range(14)]),
    )
    real.var_names = [f"g{i}" for i in range(n_genes)]
    pred = real[[d.startswith("d0") or d.startswith("d1") for d in drugs]].copy()
    out = pm.score(
        pred, real, perturbation_key="drug", dose_key="dose", control_value="DMSO", top_k=(5,)
    )
    pos = rows(out, "interpolated_duplicate")
    assert len(pos) == 4 and pos["mse"].isna().all()
    assert pos["note"].str.contains("single sample").all()
    assert (out.per_condition["de_test"] == "z-score").all()
    assert out.normalised[out.metrics].isna().all().all()
    assert (rows(out, "model")["mse"] == 0).all()


def test_errors_name_the_culprit(real):
    pred = evaluated(real)
    with pytest.raises(KeyError, match="'drugz'"):
        pm.score(pred, real, perturbation_key="drugz")
    bad = pred.copy()
    bad.obs["drug"] = bad.obs["drug"].astype(str).replace("E1", "E99")
    with pytest.raises(ValueError, match="E99"):
        pm.score(bad, real, perturbation_key="drug")
    with pytest.raises(ValueError, match="gene000"):
        pm.score(pred[:, 1:].copy(), real, perturbation_key="drug")
    with pytest.raises(ValueError, match="no control cells"):
        pm.score(pred, real[real.obs["drug"] != "control"].copy(), perturbation_key="drug")
    named = pred.copy()
    named.obs["m"] = "control_mean"
    with pytest.raises(ValueError, match="reserved"):
        pm.score(named, real, perturbation_key="drug", method_key="m")
    with pytest.raises(ValueError, match="baselines"):
        pm.score(pred, real, perturbation_key="drug", baselines=("oracle",))
    with pytest.raises(ValueError, match="de_method"):
        pm.score(pred, real, perturbation_key="drug", de_method="magic")


def test_inputs_are_not_modified_and_control_rows_warn(real):
    pred = real[real.obs["drug"].isin(["control", "E0", "E1"])].copy()
    before_real, before_pred = real.X.copy(), pred.X.copy()
    obs_real, obs_pred = real.obs.copy(), pred.obs.copy()
    with pytest.warns(UserWarning, match="control rows"):
        out = pm.score(pred, real, perturbation_key="drug")
    assert set(out.per_condition["condition"]) == {"E0", "E1"}
    np.testing.assert_array_equal(real.X, before_real)
    np.testing.assert_array_equal(pred.X, before_pred)
    pd.testing.assert_frame_equal(real.obs, obs_real)
    pd.testing.assert_frame_equal(pred.obs, obs_pred)
    assert not math.isnan(rows(out, "model").loc["E0", "centroid_accuracy"])


def test_sparse_counts_in_a_layer_give_the_same_result(real):
    import scipy.sparse as sp

    pred = evaluated(real)
    dense = pm.score(pred, real, perturbation_key="drug").per_condition
    real2, pred2 = real.copy(), pred.copy()
    for adata in (real2, pred2):
        adata.layers["counts"] = sp.csr_matrix(adata.X)
        adata.X = np.zeros(adata.shape, dtype=np.float32) - 1.0  # not what is scored
    sparse = pm.score(pred2, real2, perturbation_key="drug", layer="counts").per_condition
    pd.testing.assert_frame_equal(dense, sparse, rtol=1e-6, atol=1e-9)
    with pytest.raises(KeyError, match="'counts'"):
        pm.score(pred, real, perturbation_key="drug", layer="counts")


def test_log_normalised_means_score_like_the_counts_they_summarise(real):
    cells = evaluated(simulate(seed=1))  # another draw as prediction: raw counts, several
    cells.obs_names = [f"pred{i}" for i in range(cells.n_obs)]  # cells per condition
    logged, _ = pm.log_normalise(cells.X, counts=True)
    codes, labels = pd.factorize(cells.obs["drug"])
    means = np.vstack([logged[codes == i].mean(0) for i in range(len(labels))])
    summary = AnnData(means, obs=pd.DataFrame({"drug": labels}, index=labels.astype(str)))
    summary.var_names = cells.var_names
    kw = dict(perturbation_key="drug", counts=True, baselines=("control_mean",))
    from_cells = rows(pm.score(cells, real, **kw), "model")
    from_means = rows(pm.score(summary, real, pred_counts=False, **kw), "model")
    for metric in ("weighted_mse", "pearson_delta_centroid_top20", "centroid_accuracy"):
        np.testing.assert_allclose(
            from_means[metric], from_cells[metric], rtol=1e-5, err_msg=metric
        )
    # read as counts (pred_counts defaults to counts), the means would be normalised again
    again = rows(pm.score(summary, real, **kw), "model")
    assert not np.allclose(again["weighted_mse"], from_cells["weighted_mse"], rtol=1e-3)


def test_centroid_reference_is_read_in_blocks_not_copied(real):
    import tracemalloc

    pred = evaluated(simulate(seed=3))
    without_training = real[~real.obs["drug"].str.startswith("T")].copy()
    n = 60_000
    rng = np.random.default_rng(0)
    reference = AnnData(
        rng.poisson(2.0, (n, real.n_vars)).astype(np.float32),
        obs=pd.DataFrame(
            {"drug": rng.choice(["T0", "T1", "T2"], n), "cell_line": "x"},
            index=[f"r{i}" for i in range(n)],
        ),
        var=pd.DataFrame(index=real.var_names),
    )
    kw = dict(perturbation_key="drug", baselines=("control_mean",))
    # imports and the DE test's cache are not what is measured
    pm.score(pred, without_training, centroid_reference=reference[:100].copy(), **kw)
    tracemalloc.start()
    try:
        result = pm.score(pred, without_training, centroid_reference=reference, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A copy of the reference, or its log-normalised copy, would alone reach 1x / 2x.
    assert peak < 2 * reference.X.nbytes, f"peak {peak / reference.X.nbytes:.2f} x"
    # and its cells did form the centroid: the mean of the three training conditions
    logged, _ = pm.log_normalise(reference.X, counts=True)
    labels = reference.obs["drug"].to_numpy()
    expected = np.mean(
        [logged[labels == t].mean(0, dtype=np.float64) for t in ("T0", "T1", "T2")], axis=0
    )
    centroid = result.references.layers["centroid"]
    np.testing.assert_allclose(centroid, np.broadcast_to(expected, centroid.shape), rtol=1e-5)
