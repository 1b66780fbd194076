"""perturbx.plotting.evaluation_summary draws what the result holds."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from anndata import AnnData  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

import perturbx.metrics as pm  # noqa: E402
from perturbx.plotting import evaluation_summary  # noqa: E402

METRICS = ["mse", "pearson_delta_centroid", "centroid_accuracy"]


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _data(seed=0, n_genes=60):
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, n_genes) + 0.2
    shared = rng.normal(0, 0.8, n_genes) * (rng.random(n_genes) < 0.4)
    blocks, drugs = [], []
    for name, n in (
        [("control", 60)] + [(f"E{i}", 16) for i in range(4)] + [(f"T{i}", 16) for i in range(3)]
    ):
        fold = (
            0.0
            if name == "control"
            else shared + rng.normal(0, 1, n_genes) * (rng.random(n_genes) < 0.2)
        )
        blocks.append(rng.poisson(base * np.exp(fold) * 15, (n, n_genes)))
        drugs += [name] * n
    real = AnnData(
        np.vstack(blocks).astype(np.float32),
        obs=pd.DataFrame({"drug": drugs}, index=[f"c{i}" for i in range(len(drugs))]),
    )
    real.var_names = [f"g{i}" for i in range(n_genes)]
    pred = real[real.obs["drug"].str.startswith("E")].copy()
    # a noisy model: real cells plus noise
    pred.X = rng.poisson(pred.X + 2.0).astype(np.float32)
    return pred, real


@pytest.fixture(scope="module")
def result():
    pred, real = _data()
    return pm.score(pred, real, perturbation_key="drug", top_k=(10,))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_normalised_panel_has_bars_lines_and_labels(result):
    ax = evaluation_summary(result, METRICS, show=False)
    assert len(ax.get_figure().axes) == 1
    assert [t.get_text().rstrip("*") for t in ax.get_xticklabels()] == METRICS
    # bars: the model and the control-mean baseline; the controls are the 0 and 1 lines
    assert [c.get_label() for c in _bars(ax)] == ["model", "control_mean"]
    assert all(len(c.patches) == len(METRICS) for c in _bars(ax))
    norm = result.normalised
    expected = norm[norm["method"] == "model"][METRICS].median().to_numpy()
    heights = [p.get_height() for p in _bars(ax)[0].patches]
    np.testing.assert_allclose(heights, np.nan_to_num(expected))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("mean baseline" in t for t in legend)
    assert any("positive control" in t for t in legend)
    levels = sorted(
        line.get_ydata()[0]
        for line in ax.lines
        if line.get_label().startswith(("mean baseline", "positive control"))
    )
    assert levels == [0.0, 1.0]
    assert "normalised" in ax.get_ylabel()


def test_poorly_calibrated_metrics_are_starred(result):
    calibration = result.calibration.copy()
    calibration["well_calibrated"] = True
    calibration.loc["mse", "well_calibrated"] = False
    flagged = dataclasses.replace(result, calibration=calibration)
    ax = evaluation_summary(flagged, METRICS, show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mse*", *METRICS[1:]]


def test_raw_mode_without_positive_control_shows_baselines_as_bars(tmp_path):
    pred, real = _data(seed=1)
    raw = pm.score(
        pred,
        real,
        perturbation_key="drug",
        top_k=(10,),
        baselines=("control_mean", "perturbed_centroid"),
    )
    fig, given_ax = plt.subplots()
    path = tmp_path / "summary.png"
    ax = evaluation_summary(raw, METRICS, ax=given_ax, save=path)
    assert ax is given_ax and path.stat().st_size > 0
    assert [c.get_label() for c in _bars(ax)] == ["model", "control_mean", "perturbed_centroid"]
    assert _bars(ax)[2].patches[0].get_hatch() == "//"
    assert _bars(ax)[0].patches[0].get_hatch() is None
    expected = raw.per_condition.query("method == 'perturbed_centroid'")["mse"].median()
    assert _bars(ax)[2].patches[0].get_height() == pytest.approx(expected)
    assert "metric value" in ax.get_ylabel()


def test_default_metrics_and_errors(result):
    ax = evaluation_summary(result, show=False)
    labels = [t.get_text().rstrip("*") for t in ax.get_xticklabels()]
    assert labels[0] == "mse" and "overlap_at_10" in labels and set(labels) <= set(result.metrics)
    with pytest.raises(ValueError, match="nonsense"):
        evaluation_summary(result, ["nonsense"], show=False)
