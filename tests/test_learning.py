"""The model learns on a simulated screen with known ground truth.

One model is trained once for the module on seen drugs (held-out *cells* of every condition
are used for evaluation); slow-ish (~30 s on 2 cores) but the core claim of the package.
"""

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

from perturbx import PerturbX
from perturbx.data import simulate_drug_screen, true_expected_counts, true_log_fold_change


@pytest.fixture(scope="module")
def screen():
    scvi.settings.seed = 0
    adata = simulate_drug_screen(
        n_cells=5000,
        n_genes=200,
        n_drugs=6,
        doses=(1.0, 3.0, 10.0),
        n_affected_genes=25,
        seed=1,
        shared_effect=1.0,  # a systematic response common to all drugs, as in real screens
    )
    rng = np.random.default_rng(0)
    adata.obs["split"] = rng.choice(["train", "validation", "test"], adata.n_obs, p=[0.7, 0.1, 0.2])
    PerturbX.setup_anndata(
        adata, "drug", dose_key="dose", smiles_key="smiles", covariate_keys=["cell_type"]
    )
    model = PerturbX(adata, n_latent=32, n_hidden=128, n_layers=2)
    model.train(
        max_epochs=25,
        batch_size=128,
        split_key="split",
        seed=0,
        enable_progress_bar=False,
        plan_kwargs={"n_epochs_adversary_warmup": 5},
    )
    return model, adata


def test_counterfactuals_beat_the_control_mean_on_affected_genes(screen):
    model, adata = screen
    truth = adata.uns["simulation"]

    def normalised_log(expected: np.ndarray) -> np.ndarray:
        return np.log1p(expected / expected.sum() * 1e4)

    errors = []
    for drug in truth["drug_names"]:
        for dose in (1.0, 3.0, 10.0):
            for cell_type in ("cell_type_0", "cell_type_1"):
                affected = np.flatnonzero(true_log_fold_change(adata, drug, dose, cell_type))
                pred = model.predict(
                    target={"drug": drug, "dose": dose, "cell_type": cell_type}, library_size=1e4
                )
                predicted = np.log1p(np.asarray(pred.X).mean(0))
                real = normalised_log(true_expected_counts(adata, drug, dose, cell_type))
                control = normalised_log(true_expected_counts(adata, "control", 0.0, cell_type))
                errors.append(
                    [np.mean((v[affected] - real[affected]) ** 2) for v in (predicted, control)]
                )
    errors = np.array(errors)
    # Conditions with a visible effect (at 0.1 µM most drugs barely act: the control is right).
    errors = errors[errors[:, 1] > 0.01]
    assert len(errors) >= 20
    assert (errors[:, 0] < errors[:, 1]).mean() >= 0.9
    assert errors[:, 0].mean() < 0.5 * errors[:, 1].mean()


def test_learned_dispersion_reaches_the_simulated_one(screen):
    model, adata = screen
    learned = model.module.log_dispersion.exp().detach().numpy()
    true = adata.uns["simulation"]["nb_theta"]
    # From its start at 1 the inverse dispersion must travel to the simulated ~5. At the
    # autoencoder's learning rate it gets about a quarter of the way in this run (ratio 0.27
    # with dispersion_lr=1e-3), which makes sampled cells too noisy, their log-means too low.
    assert 0.6 < np.median(learned / true) < 1.5


def _post_hoc_accuracy(latent, adata, model, key: str) -> tuple[float, float]:
    """Validation accuracy of a logistic regression fitted on the training cells' ``latent``
    to predict ``obs[key]``, and chance (the most common validation label's frequency)."""
    from sklearn.linear_model import LogisticRegression

    label = adata.obs[key].astype(str).to_numpy()
    train = np.zeros(adata.n_obs, bool)
    train[model.train_indices] = True
    validation = np.zeros(adata.n_obs, bool)
    validation[model.validation_indices] = True
    classifier = LogisticRegression(max_iter=2000).fit(latent[train], label[train])
    chance = pd.Series(label[validation]).value_counts(normalize=True).max()
    return classifier.score(latent[validation], label[validation]), chance


def _sampled_basal_latent(model, adata) -> np.ndarray:
    """Basal latents sampled from q(z_b | x), as the decoder receives them in training."""
    module = model.module
    module.train()
    try:
        with torch.no_grad():
            x = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
            return module.inference(x)["basal_latent"].numpy()
    finally:
        module.eval()


@pytest.mark.parametrize("key", ["drug", "cell_type"])
def test_sampled_basal_latent_does_not_reveal_drug_or_cell_type(screen, key):
    # A classifier fitted after training (not the adversary, whose accuracy during training
    # oscillates as encoder and adversary chase each other) on what the decoder receives.
    model, adata = screen
    accuracy, chance = _post_hoc_accuracy(_sampled_basal_latent(model, adata), adata, model, key)
    assert accuracy < chance + 0.1, (accuracy, chance)


def test_posterior_mean_does_not_reveal_the_drug(screen):
    # What get_latent_representation() returns. The adversaries are trained on it, and the
    # autoencoder minimises their confusion; with samples and −cross-entropy instead, a
    # linear classifier read the drug at 0.44 against chance 0.17.
    model, adata = screen
    accuracy, chance = _post_hoc_accuracy(model.get_latent_representation(), adata, model, "drug")
    assert accuracy < chance + 0.1, (accuracy, chance)


@pytest.mark.xfail(
    strict=True,
    reason="Known limitation (docs: architecture, 'The basal latent'): the posterior mean "
    "keeps the cell "
    "type, which a linear classifier reads at 0.98-0.99 validation accuracy against chance "
    "0.54, although the adversary on the same mean stays at chance during training.",
)
def test_posterior_mean_does_not_reveal_the_cell_type(screen):
    model, adata = screen
    accuracy, chance = _post_hoc_accuracy(
        model.get_latent_representation(), adata, model, "cell_type"
    )
    assert accuracy < chance + 0.1, (accuracy, chance)


def test_evaluate_separates_model_from_mean_baseline(screen):
    model, adata = screen
    test = adata[adata.obs["split"] == "test"].copy()
    result = model.evaluate(test, n_cells_per_target=200)
    table = result.per_condition
    assert set(table["method"]) == {
        "PerturbX",
        "control_mean",
        "perturbed_centroid",
        "interpolated_duplicate",
    }
    median = table.groupby("method")[
        [
            "pearson_delta_control",
            "pearson_delta_control_top20",
            "pearson_delta_centroid_top20",
            "weighted_mse",
            "centroid_accuracy",
        ]
    ].median()
    # The mean baseline looks good against the control (on DE genes; all genes are dominated
    # by the noise of ~13 truth cells per condition) but carries no condition signal.
    assert median.loc["perturbed_centroid", "pearson_delta_control_top20"] > 0.6
    assert median.loc["perturbed_centroid", "pearson_delta_control"] > 0.3
    centroid_vs_centroid = table.loc[
        table["method"] == "perturbed_centroid", "pearson_delta_centroid"
    ]
    assert centroid_vs_centroid.isna().all() or centroid_vs_centroid.abs().max() < 1e-6
    assert median.loc["PerturbX", "weighted_mse"] < median.loc["perturbed_centroid", "weighted_mse"]
    assert (
        median.loc["PerturbX", "centroid_accuracy"]
        > median.loc["perturbed_centroid", "centroid_accuracy"]
    )
    assert median.loc["PerturbX", "pearson_delta_centroid_top20"] > 0.3
