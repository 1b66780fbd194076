"""Drugs never seen in training are predicted from their structure (the acceptance test).

On a simulated screen whose drug effects are a function of the drugs' fingerprints, ten of
the 58 built-in drugs are held out entirely; their conditions, predicted from control cells, must be
closer to the ground truth (on the affected genes) than the control mean and the mean of
the training drugs' effects. One model is trained per configuration (~30 s each on 2 cores):
the default, and the linear shift head with ridge embeddings of unseen molecules.
"""

import numpy as np
import pytest
import scvi

from perturbx import PerturbX
from perturbx.chem import canonical_smiles
from perturbx.data import (
    builtin_drug_smiles,
    simulate_drug_screen,
    true_expected_counts,
    true_log_fold_change,
)

N_DRUGS = 58
N_HELD_OUT = 10
DOSES = (1.0, 10.0)
TARGET_SUM = 1e4


def log_normalised_mean(counts) -> np.ndarray:
    """log1p of the mean over cells of counts normalised to 1e4 per cell."""
    dense = np.asarray(counts.toarray(), dtype=np.float64)
    return np.log1p((dense / dense.sum(1, keepdims=True) * TARGET_SUM).mean(0))


@pytest.fixture(
    scope="module",
    params=[{}, {"linear_shift_head": True, "unseen_molecules": "ridge"}],
    ids=["default", "linear-shift-head-ridge"],
)
def unseen_screen(request):
    scvi.settings.seed = 0
    # Radius 0: effects follow atom-environment counts, learnable from 48 drugs (radius 1,
    # the simulator's default, is harder: see benchmarks/bench_unseen_drugs.py).
    adata = simulate_drug_screen(
        n_cells=10_000,
        n_genes=200,
        n_drugs=N_DRUGS,
        doses=DOSES,
        n_affected_genes=25,
        structure_radius=0,
        seed=0,
    )
    rng = np.random.default_rng(0)
    held_out = sorted(rng.choice(adata.uns["simulation"]["drug_names"], N_HELD_OUT, replace=False))
    split = np.where(rng.random(adata.n_obs) < 0.9, "train", "validation").astype(object)
    split[adata.obs["drug"].astype(str).isin(held_out).to_numpy()] = "test"
    adata.obs["split"] = split
    PerturbX.setup_anndata(
        adata,
        "drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
        fingerprint_counts=True,
    )
    model = PerturbX(adata, n_latent=32, n_hidden=128, n_layers=2, **request.param)
    model.train(
        max_epochs=20,
        batch_size=128,
        split_key="split",
        seed=0,
        enable_progress_bar=False,
        plan_kwargs={"adversary_weight": 100.0},
    )
    return model, adata, [str(d) for d in held_out]


def test_held_out_drugs_beat_control_and_perturbed_mean(unseen_screen):
    model, adata, held_out = unseen_screen
    assert not (adata.obs.loc[adata.obs["split"] != "test", "drug"].isin(held_out)).any()
    train = adata[adata.obs["split"] != "test"]
    drug = train.obs["drug"].astype(str).to_numpy()
    dose = train.obs["dose"].to_numpy()
    cell_type = train.obs["cell_type"].astype(str).to_numpy()
    training_drugs = sorted(set(drug) - {"control"})
    assert len(training_drugs) == N_DRUGS - N_HELD_OUT

    errors = []  # rows: model, control mean, perturbed mean
    for c in ("cell_type_0", "cell_type_1"):
        control = log_normalised_mean(train.X[(drug == "control") & (cell_type == c)])
        for k in DOSES:
            perturbed = np.mean(
                [
                    log_normalised_mean(train.X[(drug == d) & (dose == k) & (cell_type == c)])
                    for d in training_drugs
                ],
                axis=0,
            )
            pred = model.predict(
                target=[{"drug": d, "dose": k, "cell_type": c} for d in held_out],
                library_size=TARGET_SUM,
                n_cells_per_target=200,
            )
            for d in held_out:
                predicted = np.log1p(np.asarray(pred[pred.obs["drug"] == d].X).mean(0))
                expected = true_expected_counts(adata, d, k, c)
                real = np.log1p(expected / expected.sum() * TARGET_SUM)
                affected = true_log_fold_change(adata, d, k, c) != 0
                errors.append(
                    [
                        np.mean((v[affected] - real[affected]) ** 2)
                        for v in (predicted, control, perturbed)
                    ]
                )
    errors = np.array(errors)
    assert len(errors) == N_HELD_OUT * len(DOSES) * 2
    mean_model, mean_control, mean_perturbed = errors.mean(0)
    assert mean_model < mean_control and mean_model < mean_perturbed
    assert mean_model < 0.8 * min(mean_control, mean_perturbed)
    wins = (errors[:, 0] < errors[:, 1]) & (errors[:, 0] < errors[:, 2])
    # 40 conditions of 10 drugs. Without structure information a prediction beats both
    # baselines in well under half of them (learned embeddings: ~30% in the benchmark).
    assert wins.mean() >= 0.7


def test_two_unseen_molecules_get_different_predictions(unseen_screen):
    model, _, _ = unseen_screen
    # Loratadine and sertraline: not in the simulated library, given by SMILES.
    new_molecules = [
        "CCOC(=O)N1CCC(=C2c3ccc(Cl)cc3CCc3cccnc32)CC1",
        "CN[C@H]1CC[C@@H](c2ccc(Cl)c(Cl)c2)c2ccccc21",
    ]
    library = set(builtin_drug_smiles()["smiles"].map(canonical_smiles))
    assert not {canonical_smiles(m) for m in new_molecules} & library
    targets = [{"drug": m, "dose": 10.0, "cell_type": "cell_type_0"} for m in new_molecules]
    pred = model.predict(target=targets, library_size=TARGET_SUM)
    first, second = (np.asarray(pred.X[pred.obs["drug"] == t["drug"]]) for t in targets)
    # Same source cells, so any difference comes from the molecules.
    np.testing.assert_array_equal(
        pred.obs.loc[pred.obs["drug"] == targets[0]["drug"], "source_cell"].to_numpy(),
        pred.obs.loc[pred.obs["drug"] == targets[1]["drug"], "source_cell"].to_numpy(),
    )
    difference = np.abs(np.log1p(first.mean(0)) - np.log1p(second.mean(0)))
    assert difference.max() > 0.05
    embeddings = model.get_perturbation_embeddings([t["drug"] for t in targets])
    assert not np.allclose(embeddings.iloc[0], embeddings.iloc[1], atol=1e-3)
