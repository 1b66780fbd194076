"""perturbx.plotting: dose_response, training_history, latent_embedding, lfc_scatter.

Plots are rendered with the Agg backend (set in conftest.py) and checked against values
computed here by hand from the data: measured dose-response points, chance levels,
log-fold changes built into hand-made AnnDatas.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from matplotlib.collections import PathCollection

import perturbx
from perturbx.plotting import dose_response, latent_embedding, lfc_scatter, training_history

DRUG, COVARIATE, CELL_TYPE = "drug", "cell_type", "cell_type_0"


@pytest.fixture(scope="module")
def trained():
    # A model this small gains nothing from intra-op threads, and on a busy machine their
    # synchronisation makes training 10-100x slower; restored after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adata = perturbx.data.simulate_drug_screen(n_cells=1200, n_genes=60, n_drugs=4, seed=0)
    perturbx.PerturbX.setup_anndata(
        adata,
        perturbation_key=DRUG,
        dose_key="dose",
        smiles_key="smiles",
        control_value="control",
        covariate_keys=[COVARIATE],
    )
    model = perturbx.PerturbX(adata, n_latent=8, n_hidden=32, n_layers=1, adversary_hidden=16)
    model.train(max_epochs=3, batch_size=128, enable_progress_bar=False, seed=0)
    yield model, adata
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scatter(ax, label=None) -> PathCollection:
    """The scatter labelled ``label`` (``None``: the unlabelled one holding the points)."""
    found = [
        c
        for c in ax.collections
        if isinstance(c, PathCollection)
        and (c.get_label().startswith("_") if label is None else c.get_label() == label)
    ]
    assert len(found) == 1, [c.get_label() for c in ax.collections]
    return found[0]


def _line(ax, label):
    found = [line for line in ax.lines if line.get_label() == label]
    assert len(found) == 1, [line.get_label() for line in ax.lines]
    return found[0]


def _log_normalised(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


# ---------------------------------------------------------------------------- dose_response
def test_dose_response_measured_points_are_the_data(trained, tmp_path):
    model, adata = trained
    genes = list(adata.var_names[[1, 4, 9, 16, 25]])
    grid = [0.03, 0.3, 3.0, 30.0]
    path = tmp_path / "dose.png"
    axes = dose_response(
        model,
        adata,
        ["Aspirin", "Caffeine"],
        genes,
        covariates={COVARIATE: CELL_TYPE},
        doses=grid,
        score="mean_lfc",
        save=path,
    )
    assert path.stat().st_size > 0
    assert len(axes) == 2 and len(axes[0].get_figure().axes) == 2

    obs = adata.obs
    expression = _log_normalised(adata.X.toarray())[:, adata.var_names.get_indexer(genes)]
    in_type = (obs[COVARIATE] == CELL_TYPE).to_numpy()
    control_mean = expression[in_type & (obs[DRUG] == "control").to_numpy()].mean(axis=0)
    for ax, drug in zip(axes, ["Aspirin", "Caffeine"], strict=True):
        cells = in_type & (obs[DRUG] == drug).to_numpy()
        doses = np.unique(obs.loc[cells, "dose"])
        expected = [
            (expression[cells & (obs["dose"] == d).to_numpy()].mean(axis=0) - control_mean).mean()
            for d in doses
        ]
        points = _scatter(ax, "measured").get_offsets()
        assert len(points) == len(doses) == 3
        np.testing.assert_allclose(points[:, 0], doses)
        np.testing.assert_allclose(points[:, 1], expected, rtol=1e-5, atol=1e-6)
        predicted = _line(ax, "predicted")
        np.testing.assert_allclose(predicted.get_xdata(), grid)
        assert np.isfinite(predicted.get_ydata()).all()
        assert _line(ax, "control").get_ydata()[0] == 0.0
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "dose (log scale)"
        assert "mean log-fold change (5 genes)" in ax.get_ylabel()
        assert ax.get_title() == f"{drug} | {COVARIATE}={CELL_TYPE}"


def test_dose_response_defaults_one_panel_per_drug(trained):
    model, adata = trained
    axes = dose_response(model, adata, n_doses=7, show=False)
    drugs = sorted(set(adata.obs[DRUG]) - {"control"})
    assert [ax.get_title() for ax in axes] == drugs
    for ax, drug in zip(axes, drugs, strict=True):
        doses = np.unique(adata.obs.loc[adata.obs[DRUG] == drug, "dose"])
        grid = _line(ax, "predicted").get_xdata()
        assert len(grid) == 7
        np.testing.assert_allclose([grid[0], grid[-1]], [doses.min() / 2, doses.max() * 2])
        measured = _scatter(ax, "measured").get_offsets()
        assert len(measured) == len(doses)
        # signed score: at the highest dose every gene counts by |lfc|, so it is positive
        assert measured[-1, 1] > 0
        assert "top 20 genes" in ax.get_ylabel()


def test_dose_response_accepts_log_normalised_layer(trained):
    model, adata = trained
    kwargs = {"perturbations": "Paracetamol", "doses": [1.0, 10.0], "n_top_genes": 7}
    from_counts = _scatter(dose_response(model, adata, **kwargs)[0], "measured").get_offsets()
    adata.layers["lognorm"] = _log_normalised(adata.X.toarray())
    try:
        axes = dose_response(model, adata, layer="lognorm", layer_is_counts=False, **kwargs)
    finally:
        del adata.layers["lognorm"]
    np.testing.assert_allclose(
        _scatter(axes[0], "measured").get_offsets(), from_counts, rtol=1e-5, atol=1e-6
    )
    assert "top 7 genes" in axes[0].get_ylabel()


def test_dose_response_rejects_bad_input(trained):
    model, adata = trained
    with pytest.raises(ValueError, match="Nonexistin"):
        dose_response(model, adata, "Nonexistin")
    with pytest.raises(KeyError, match="donor"):
        dose_response(model, adata, "Aspirin", covariates={"donor": "d1"})
    with pytest.raises(ValueError, match="cell_type_9"):
        dose_response(model, adata, "Aspirin", covariates={COVARIATE: "cell_type_9"})
    with pytest.raises(ValueError, match="score"):
        dose_response(model, adata, "Aspirin", score="median")
    with pytest.raises(ValueError, match="doses"):
        dose_response(model, adata, "Aspirin", doses=[-1.0, 1.0])
    with pytest.raises(KeyError, match="not_a_gene"):
        dose_response(model, adata, "Aspirin", ["not_a_gene"])
    with pytest.raises(ValueError, match="n_top_genes"):
        dose_response(model, adata, "Aspirin", n_top_genes=0)


# ------------------------------------------------------------------------- training_history
def test_training_history_panels_lines_and_chance_levels(trained, tmp_path):
    model, adata = trained
    path = tmp_path / "history.pdf"
    axes = training_history(model, save=path)
    assert path.stat().st_size > 0
    # The default (variational) model has a KL term, plotted after the reconstruction loss.
    assert [ax.get_ylabel() for ax in axes] == [
        "reconstruction_loss",
        "kl_local",
        "adversary_loss",
        "accuracy",
    ]
    assert all(ax.get_xlabel() == "epoch" for ax in axes)
    recon = axes[0]
    for split in ("train", "validation"):
        line = _line(recon, split)
        history = model.history[f"reconstruction_loss_{split}"].iloc[:, 0]
        np.testing.assert_allclose(line.get_xdata(), history.index)
        np.testing.assert_allclose(line.get_ydata(), history.to_numpy(float))
    assert _line(recon, "validation").get_linestyle() == ":"

    kl = axes[1]
    np.testing.assert_allclose(
        _line(kl, "train").get_ydata(),
        model.history["kl_local_train"].iloc[:, 0].to_numpy(float),
    )
    accuracy = axes[3]
    assert len(accuracy.lines) == 6  # 2 adversaries x (train, validation) + 2 chance lines
    # chance = frequency of the most common label among the training cells
    train_obs = adata.obs.iloc[model.train_indices_]
    expected = {
        "perturbation": train_obs[DRUG].value_counts(normalize=True).max(),
        COVARIATE: train_obs[COVARIATE].value_counts(normalize=True).max(),
    }
    for name, level in expected.items():
        chance = _line(accuracy, f"{name} (chance)")
        assert chance.get_linestyle() == "--"
        assert chance.get_ydata()[0] == pytest.approx(level)
        np.testing.assert_allclose(
            _line(accuracy, f"{name} (train)").get_ydata(),
            model.history[f"adversary_accuracy_{name}_train"].iloc[:, 0].to_numpy(float),
        )
    assert accuracy.get_ylim() == pytest.approx((0.0, 1.02))


def test_training_history_custom_keys_and_chance_levels(trained):
    model, _ = trained
    axes = training_history(
        model,
        ["adversary_lambda", "elbo_validation", "adversary_accuracy"],
        chance_levels={"perturbation": 0.5},
        ncols=2,
    )
    assert len(axes) == 3 and len(axes[0].get_figure().axes) == 3
    assert [line.get_label() for line in axes[0].lines] == ["adversary_lambda"]
    assert [line.get_label() for line in axes[1].lines] == ["validation"]
    chance = [line for line in axes[2].lines if line.get_linestyle() == "--"]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == 0.5
    none = training_history(model, ["adversary_accuracy"], chance_levels=None)
    assert not any(line.get_linestyle() == "--" for line in none[0].lines)
    with pytest.raises(KeyError, match="nonsense"):
        training_history(model, ["nonsense"])
    with pytest.raises(ValueError, match="fraction"):
        training_history(model, chance_levels={"perturbation": 3.0})


# ------------------------------------------------------------------------- latent_embedding
def test_latent_embedding_two_panels_with_silhouette(trained, tmp_path):
    from sklearn.metrics import silhouette_score

    model, adata = trained
    indices = np.arange(0, adata.n_obs, 3)
    path = tmp_path / "latent.png"
    axes = latent_embedding(model, color=COVARIATE, basis="pca", indices=indices, save=path)
    assert path.stat().st_size > 0
    assert len(axes) == 2
    labels = adata.obs[COVARIATE].iloc[indices].to_numpy()
    for ax, kind in zip(axes, ("basal", "full"), strict=True):
        assert len(_scatter(ax).get_offsets()) == len(indices)
        assert ax.get_xlabel() == "PC1" and ax.get_ylabel() == "PC2"
        latent = model.get_latent_representation(indices=indices, kind=kind)
        expected = silhouette_score(latent, labels)
        assert ax.get_title() == f"{kind} latent\nsilhouette by {COVARIATE}: {expected:.2f}"
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == sorted(set(labels))


def test_latent_embedding_umap_default_colour_and_errors(trained):
    model, adata = trained
    indices = np.arange(120)
    axes = latent_embedding(model, indices=indices, n_neighbors=10, silhouette=False)
    assert [ax.get_title() for ax in axes] == ["basal latent", "full latent"]
    assert axes[0].get_xlabel() == "UMAP1"
    assert len(_scatter(axes[1]).get_offsets()) == len(indices)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == sorted(set(adata.obs[DRUG].iloc[indices]))  # perturbation key by default
    with pytest.raises(KeyError, match="donor"):
        latent_embedding(model, color="donor", basis="pca")
    with pytest.raises(ValueError, match="basis"):
        latent_embedding(model, basis="tsne")


# ------------------------------------------------------------------------------ lfc_scatter
def _lfc_data(n_genes=30, n_cells=6, pred_offset=0.0):
    """Log-normalised real and predicted cells with known log-fold changes.

    Real: controls at ``base``, ``D`` at dose 1 at ``base + delta``, ``D`` at dose 10 at
    ``base + 5 delta``. Pred: ``D`` at dose 1 at ``base + pred_offset + delta + wobble``,
    controls at ``base + pred_offset``.
    """
    genes = np.arange(n_genes)
    delta = 0.1 * (genes + 1) * (-1.0) ** genes  # |delta| grows with the gene index
    wobble = 0.05 * np.cos(genes)
    base = np.linspace(1.0, 2.0, n_genes)
    var = pd.DataFrame(index=[f"g{i}" for i in genes])

    def block(rows, drug, dose):
        obs = pd.DataFrame(
            {"drug": drug, "dose": dose, "cell_type": "T"},
            index=[f"{drug}{dose}_{i}" for i in range(n_cells)],
        )
        return np.tile(rows, (n_cells, 1)), obs

    parts = [
        block(base, "control", 0.0),
        block(base + delta, "D", 1.0),
        block(base + 5 * delta, "D", 10.0),
    ]
    real = AnnData(np.vstack([p[0] for p in parts]), obs=pd.concat([p[1] for p in parts]), var=var)
    parts = [
        block(base + pred_offset + delta + wobble, "D", "1.0"),
        block(base + pred_offset, "control", ""),
    ]
    pred = AnnData(
        np.vstack([p[0] for p in parts]),
        obs=pd.concat([p[1] for p in parts]),
        var=var.iloc[::-1].copy(),
    )  # another gene order: matched by name
    pred.X = pred.X[:, ::-1]
    return pred, real, delta, delta + wobble


def test_lfc_scatter_points_are_the_known_fold_changes(tmp_path):
    pred, real, true_lfc, pred_lfc = _lfc_data()
    path = tmp_path / "lfc.svg"
    ax = lfc_scatter(
        pred,
        real,
        {"drug": "D", "dose": 1},
        perturbation_key="drug",
        dose_key="dose",
        n_genes=8,
        real_counts=False,
        pred_counts=False,
        annotate=2,
        save=path,
    )
    assert path.stat().st_size > 0
    top = np.arange(29, 21, -1)  # the 8 largest |delta|, largest first
    points = _scatter(ax, "top 8 genes").get_offsets()
    assert len(points) == 8
    np.testing.assert_allclose(points[:, 0], true_lfc[top], atol=1e-6)
    np.testing.assert_allclose(points[:, 1], pred_lfc[top], atol=1e-6)
    r = np.corrcoef(true_lfc[top], pred_lfc[top])[0, 1]
    assert f"Pearson r = {r:.2f}" in ax.get_title() and "D @ 1" in ax.get_title()
    identity = _line(ax, "identity (y = x)")
    np.testing.assert_allclose(identity.get_xdata(), identity.get_ydata())
    assert ax.get_xlabel() == "true log-fold change vs control"
    assert [t.get_text() for t in ax.texts] == ["g29", "g28"]


def test_lfc_scatter_reference_control():
    pred, real, true_lfc, pred_lfc = _lfc_data(pred_offset=0.5)
    keys = {
        "perturbation_key": "drug",
        "dose_key": "dose",
        "real_counts": False,
        "pred_counts": False,
        "n_genes": 5,
    }
    condition = {"drug": "D", "dose": "1.0", "cell_type": "T"}
    against_real = _scatter(lfc_scatter(pred, real, condition, **keys), "top 5 genes")
    against_real = against_real.get_offsets()
    np.testing.assert_allclose(against_real[:, 1], pred_lfc[29:24:-1] + 0.5, atol=1e-6)
    ax = lfc_scatter(pred, real, condition, reference="pred_control", **keys)
    points = _scatter(ax, "top 5 genes").get_offsets()
    np.testing.assert_allclose(points[:, 1], pred_lfc[29:24:-1], atol=1e-6)
    assert ax.get_ylabel() == "predicted log-fold change vs pred control"


def test_lfc_scatter_counts_and_prediction_metadata():
    rng = np.random.default_rng(0)
    control_row, treated_row = rng.integers(1, 50, 12), rng.integers(1, 50, 12)
    real = AnnData(
        np.vstack([np.tile(control_row, (4, 1)), np.tile(treated_row, (4, 1))]).astype(np.float32),
        obs=pd.DataFrame({"drug": ["ctl"] * 4 + ["D"] * 4}, index=[f"c{i}" for i in range(8)]),
    )
    pred = real[4:].copy()
    pred.X = pred.X * 3.5  # expected counts at another library size: same after normalising
    pred.uns["perturbx_prediction"] = {
        "likelihood": "nb",
        "perturbation_key": "drug",
        "control_value": "ctl",
        "dose_key": None,
    }
    ax = lfc_scatter(pred, real, "D", n_genes=12)
    expected = (_log_normalised(treated_row[None]) - _log_normalised(control_row[None]))[0]
    points = _scatter(ax, "top 12 genes").get_offsets()
    np.testing.assert_allclose(np.sort(points[:, 0]), np.sort(expected), rtol=1e-5)
    np.testing.assert_allclose(points[:, 0], points[:, 1], rtol=1e-5)
    assert "Pearson r = 1.00" in ax.get_title()


def test_lfc_scatter_wilcoxon_finds_the_changed_genes():
    rng = np.random.default_rng(1)
    n_genes, changed = 40, [3, 11, 17, 25, 33]
    values = rng.normal(2.0, 0.3, (80, n_genes))
    values[40:, changed] += 2.0
    obs = pd.DataFrame({"drug": ["control"] * 40 + ["D"] * 40}, index=[f"c{i}" for i in range(80)])
    real = AnnData(values, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    ax = lfc_scatter(
        real[40:].copy(),
        real,
        "D",
        perturbation_key="drug",
        n_genes=5,
        rank_by="wilcoxon",
        real_counts=False,
        pred_counts=False,
        annotate=5,
    )
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"g{g}" for g in changed)
    assert "by wilcoxon" in ax.get_title()


def test_lfc_scatter_rejects_bad_input():
    pred, real, _, _ = _lfc_data()
    keys = {"perturbation_key": "drug", "real_counts": False, "pred_counts": False}
    with pytest.raises(ValueError, match="control"):
        lfc_scatter(pred, real, "control", **keys)
    with pytest.raises(ValueError, match="no real cells match 'E'"):
        lfc_scatter(pred, real, "E", **keys)
    with pytest.raises(KeyError, match="donor"):
        lfc_scatter(pred, real, {"drug": "D", "donor": "x"}, **keys)
    with pytest.raises(ValueError, match="n_genes"):
        lfc_scatter(pred, real, "D", n_genes=31, **keys)
    with pytest.raises(ValueError, match="perturbation_key"):
        lfc_scatter(pred, real, "D")


def test_lfc_scatter_on_model_predictions(trained):
    model, adata = trained
    condition = {DRUG: "Ibuprofen", "dose": 10.0, COVARIATE: CELL_TYPE}
    pred = model.predict(target=condition, n_cells_per_target=50)
    ax = lfc_scatter(pred, adata, condition, n_genes=15)
    assert len(_scatter(ax, "top 15 genes").get_offsets()) == 15
    assert ax.get_title().startswith(f"Ibuprofen @ 10.0 | {COVARIATE}={CELL_TYPE}")
