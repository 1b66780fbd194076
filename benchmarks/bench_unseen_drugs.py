"""Drugs never seen in training: PerturbX vs the control-mean and perturbed-mean baselines.

Usage::

    python benchmarks/bench_unseen_drugs.py                        # radius 0 and 1, seeds 0 1
    python benchmarks/bench_unseen_drugs.py --structure-radius 1 --seeds 0 1 2 --json out.json
    python benchmarks/bench_unseen_drugs.py --library trapnell --n-drugs 120 --n-held-out 20

On each simulated screen (:func:`perturbx.data.simulate_drug_screen`, whose drug effects are a
fixed function of the drugs' Morgan fingerprints of radius ``--structure-radius``) ``--n-held-out``
drugs are held out entirely: none of their cells is trained on. Each held-out condition
(drug × dose × cell type) is then predicted from control cells and scored against the
simulator's *ground truth*: the mean squared error, over the drug's affected genes, of
``log1p`` of expression normalised to 10,000 counts per cell (the model's expected counts at
library size 1e4, averaged over source cells; the truth's expected counts, normalised).

Methods (one row each):

- ``PerturbX (fingerprints)``: drug embeddings from the Morgan fingerprint (``smiles_key``).
- ``PerturbX (learned embeddings)``: set up without SMILES; the held-out drugs are in the
  vocabulary but their embeddings are never trained, so it cannot generalise (a floor).
- ``control mean``: the training control cells of the cell type (no effect).
- ``perturbed mean``: mean over the training drugs of their condition means at the same dose
  and cell type (the shared response).
- ``ridge on fingerprints``: a reference that is not a cell model,
  :func:`perturbx.baselines.linear_baseline` (ridge regression, penalty by leave-one-out
  cross-validation, per cell type, from the registered fingerprint × log-dose features to
  the training drugs' condition means minus the control mean).

Baselines and the ridge use the training cells' ``log1p`` of mean normalised expression, the
space of the truth: the ridge is fitted on those condition means (one row each, passed with
``counts=False``), not on single cells, whose average of ``log1p`` would sit below it.
``visible`` rows keep the conditions whose true effect is visible (the control mean's error
is at least ``--visible-threshold``; at doses far below EC50 all methods are ~equal).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

TARGET_SUM = 1e4


def log_normalised_mean(counts) -> np.ndarray:
    """``log1p`` of the mean over cells of counts normalised to 1e4 per cell, ``(n_genes,)``."""
    dense = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, np.float64)
    dense = dense / np.maximum(dense.sum(1, keepdims=True), 1.0) * TARGET_SUM
    return np.log1p(dense.mean(0))


def simulate(args: argparse.Namespace, seed: int, structure_radius: int):
    """A simulated screen with ``n_held_out`` drugs marked ``"test"`` in ``obs["split"]``."""
    from perturbx.data import simulate_drug_screen

    smiles = None
    if args.library == "trapnell":
        table = pd.read_csv(args.trapnell_csv, header=None, names=["name", "smiles", "pathway"])
        smiles = table[["name", "smiles"]]
    adata = simulate_drug_screen(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_drugs=args.n_drugs,
        doses=tuple(args.doses),
        n_affected_genes=args.n_affected_genes,
        smiles=smiles,
        structure_radius=structure_radius,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    names = list(adata.uns["simulation"]["drug_names"])
    held_out = sorted(rng.choice(names, args.n_held_out, replace=False).tolist())
    split = np.where(rng.random(adata.n_obs) < 0.9, "train", "validation").astype(object)
    split[adata.obs["drug"].astype(str).isin(held_out).to_numpy()] = "test"
    adata.obs["split"] = split
    return adata, held_out


def train_model(adata, args: argparse.Namespace, seed: int, fingerprints: bool):
    """A PerturbX on the non-test cells; with the fingerprint encoder or learned embeddings."""
    from perturbx import PerturbX

    adata = adata.copy()
    setup = dict(perturbation_key="drug", dose_key="dose", covariate_keys=["cell_type"])
    if fingerprints:
        setup.update(smiles_key="smiles", fingerprint_counts=args.fingerprint_counts)
    PerturbX.setup_anndata(adata, **setup)
    model = PerturbX(
        adata,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        drug_encoder_layers=args.drug_encoder_layers,
        drug_encoder_hidden=args.drug_encoder_hidden,
    )
    model.train(
        max_epochs=args.epochs,
        batch_size=128,
        split_key="split",
        seed=seed,
        enable_progress_bar=False,
        plan_kwargs={"adversary_weight": args.adversary_weight},
    )
    return model


def predicted_profiles(model, targets: list[dict], n_cells: int) -> list[np.ndarray]:
    """``log1p`` of the mean predicted normalised expression of each target, from controls."""
    pred = model.predict(target=targets, library_size=TARGET_SUM, n_cells_per_target=n_cells)
    values = np.asarray(pred.X, np.float64)
    # Targets come back in order, n_cells source cells each (fewer if a cell type has fewer).
    bounds = np.cumsum([0, *pred.obs.groupby("condition", observed=True, sort=False).size()])
    return [np.log1p(values[a:b].mean(0)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def ridge_profiles(adata, means, control, targets: list[dict], featurizer) -> np.ndarray:
    """:func:`perturbx.baselines.linear_baseline` on the training condition means.

    ``means`` maps ``(drug, dose, cell type)`` and ``control`` maps cell type to ``log1p`` of
    mean normalised expression; they go in as one already log-normalised row per condition,
    so that the ridge works in the same space as the truth. Returns ``(n_targets, n_genes)``.
    """
    import anndata

    from perturbx.baselines import linear_baseline

    conditions = [dict(drug=d, dose=k, cell_type=c) for d, k, c in means]
    conditions += [dict(drug="control", dose=0.0, cell_type=c) for c in control]
    condition_means = anndata.AnnData(
        np.vstack([*means.values(), *control.values()]),
        obs=pd.DataFrame(conditions, index=[str(i) for i in range(len(conditions))]),
    )
    truth = adata.uns["simulation"]
    fingerprints = featurizer(list(truth["drug_smiles"]))
    features = dict(zip(truth["drug_names"], fingerprints, strict=True))
    predicted = linear_baseline(
        condition_means,
        pd.DataFrame(targets),
        features,
        perturbation_key="drug",
        dose_key="dose",
        covariate_keys=["cell_type"],
        counts=False,
    )
    return np.asarray(predicted.X, np.float64)


def evaluate_world(args: argparse.Namespace, seed: int, structure_radius: int) -> pd.DataFrame:
    """Per held-out condition errors of every method on one simulated screen (tidy table)."""
    from perturbx.data import true_expected_counts, true_log_fold_change

    adata, held_out = simulate(args, seed, structure_radius)
    truth = adata.uns["simulation"]
    doses = [float(d) for d in truth["params"]["doses"]]
    cell_types = [str(c) for c in truth["cell_type_names"]]
    obs = adata.obs
    drug = obs["drug"].astype(str).to_numpy()
    train = (obs["split"] != "test").to_numpy()
    train_drugs = [str(d) for d in truth["drug_names"] if d not in held_out]

    def cells(name, dose, cell_type):
        mask = train & (drug == name) & (obs["cell_type"].astype(str).to_numpy() == cell_type)
        if name != "control":
            mask &= obs["dose"].to_numpy() == dose
        return adata.X[np.flatnonzero(mask)]

    control = {c: log_normalised_mean(cells("control", 0.0, c)) for c in cell_types}
    means = {
        (d, k, c): log_normalised_mean(cells(d, k, c))
        for d in train_drugs
        for k in doses
        for c in cell_types
    }
    perturbed = {
        (k, c): np.mean([means[(d, k, c)] for d in train_drugs], 0)
        for k in doses
        for c in cell_types
    }
    targets = [
        dict(drug=d, dose=k, cell_type=c) for d in held_out for k in doses for c in cell_types
    ]

    start = time.perf_counter()
    fingerprint_model = train_model(adata, args, seed, fingerprints=True)
    embedding_model = train_model(adata, args, seed, fingerprints=False)
    train_seconds = time.perf_counter() - start
    predictions = {
        "PerturbX (fingerprints)": predicted_profiles(
            fingerprint_model, targets, args.n_source_cells
        ),
        "PerturbX (learned embeddings)": predicted_profiles(
            embedding_model, targets, args.n_source_cells
        ),
    }
    ridge = ridge_profiles(adata, means, control, targets, fingerprint_model.featurizer)

    rows = []
    for i, t in enumerate(targets):
        key = (t["drug"], t["dose"], t["cell_type"])
        expected = true_expected_counts(adata, *key)
        real = np.log1p(expected / expected.sum() * TARGET_SUM)
        affected = true_log_fold_change(adata, *key) != 0
        candidates = {name: values[i] for name, values in predictions.items()}
        candidates["control mean"] = control[t["cell_type"]]
        candidates["perturbed mean"] = perturbed[(t["dose"], t["cell_type"])]
        candidates["ridge on fingerprints"] = ridge[i]
        for method, profile in candidates.items():
            rows.append(
                {
                    "structure_radius": structure_radius,
                    "seed": seed,
                    "drug": t["drug"],
                    "dose": t["dose"],
                    "cell_type": t["cell_type"],
                    "method": method,
                    "mse": float(np.mean((profile[affected] - real[affected]) ** 2)),
                    "train_seconds": train_seconds,
                }
            )
    return pd.DataFrame(rows)


def summarise(per_condition: pd.DataFrame, visible_threshold: float) -> pd.DataFrame:
    """Median / mean error and win fractions per method, over all and over visible conditions."""
    keys = ["structure_radius", "seed", "drug", "dose", "cell_type"]
    wide = per_condition.pivot_table(index=keys, columns="method", values="mse")
    visible = wide["control mean"] >= visible_threshold
    rows = []
    for subset, mask in (("all", np.ones(len(wide), bool)), ("visible", visible.to_numpy())):
        for radius, part in wide[mask].groupby(level="structure_radius"):
            for method in part.columns:
                errors = part[method]
                rows.append(
                    {
                        "structure_radius": radius,
                        "conditions": subset,
                        "method": method,
                        "n": len(errors),
                        "median_mse": errors.median(),
                        "mean_mse": errors.mean(),
                        "beats_control": (errors < part["control mean"]).mean(),
                        "beats_perturbed_mean": (errors < part["perturbed mean"]).mean(),
                        "beats_both": (
                            (errors < part["control mean"]) & (errors < part["perturbed mean"])
                        ).mean(),
                    }
                )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--structure-radius", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--library", choices=["builtin", "trapnell"], default="builtin")
    parser.add_argument("--trapnell-csv", default="../shared/data/trapnell_drugs_smiles.csv")
    parser.add_argument("--n-drugs", type=int, default=40)
    parser.add_argument("--n-held-out", type=int, default=10)
    parser.add_argument("--n-cells", type=int, default=12_000)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--n-affected-genes", type=int, default=30)
    parser.add_argument("--doses", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-latent", type=int, default=32)
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--drug-encoder-layers", type=int, default=2)
    parser.add_argument("--drug-encoder-hidden", type=int, default=256)
    parser.add_argument("--adversary-weight", type=float, default=100.0)
    parser.add_argument(
        "--fingerprint-counts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Morgan count fingerprints (--no-fingerprint-counts: bits)",
    )
    parser.add_argument("--n-source-cells", type=int, default=200, help="control cells per target")
    parser.add_argument("--visible-threshold", type=float, default=0.05)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--json", default=None, help="write the summary and per-condition errors here"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n_held_out < 8:
        parser.error("--n-held-out must be >= 8 so that chance cannot pass.")

    start = time.perf_counter()
    per_condition = pd.concat(
        [evaluate_world(args, seed, r) for r in args.structure_radius for seed in args.seeds],
        ignore_index=True,
    )
    summary = summarise(per_condition, args.visible_threshold)
    print(
        f"{args.n_held_out} of {args.n_drugs} {args.library} drugs held out, seeds {args.seeds}, "
        f"{args.epochs} epochs, adversary_weight {args.adversary_weight}, "
        f"fingerprint_counts {args.fingerprint_counts}; wall {time.perf_counter() - start:.0f} s"
    )
    print("MSE on affected genes of log1p(normalised expression) vs ground truth\n")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.round(3).to_string(index=False))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "arguments": vars(args),
                    "summary": summary.to_dict(orient="records"),
                    "per_condition": per_condition.to_dict(orient="records"),
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
