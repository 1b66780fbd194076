"""How much of PerturbX's error on unseen drugs is the drug encoder's? A ceiling on the simulator.

Usage::

    python benchmarks/bench_embedding_ceiling.py                  # seeds 0 1 2, ~2 min each
    python benchmarks/bench_embedding_ceiling.py --seeds 0 --fit-dose-response

For each seed, a simulated screen with drugs held out (as in ``bench_quality.py``) trains a
default PerturbX. Then, with every other parameter frozen, the held-out drugs' embeddings
(the drug encoder's outputs) are replaced by free vectors fitted by maximum likelihood to a
fresh, ``--fresh-truth`` times larger sample of those drugs' cells (the simulator's truth
does not depend on the number of cells). Their dose-response parameters stay the
amortiser's unless ``--fit-dose-response``.

The fitted embeddings are what the drug encoder would have to output for the decoder and
the additive composition to reproduce the held-out drugs. Scored on the *test cells*, which
the fit never saw, next to the encoder's embeddings and the baselines of ``bench_quality``:
if the fitted embeddings beat ridge and the encoder's do not, the shortfall is in mapping a
new structure to its embedding, not in the decoder. Rows against the fresh sample are
in-sample for the fitted embeddings and only show how far the fit got.

Two more rows ask whether the decoder responds linearly between drug embeddings. Each
held-out drug gets ridge weights over the training drugs (linear kernel on the centred
fingerprints, penalty ``--interpolation-penalty`` × the kernel's mean diagonal); the same
weights combine either the model's own predictions for the training drugs at the same dose
and cell type ("interpolated effects") or the training drugs' embeddings, which are then
decoded ("interpolated embeddings"). If the first is far better than the second, an unseen
drug placed between training drugs in embedding space does not get the effect between
theirs.

Writes ``<out>.csv`` (per condition) and prints medians per truth and method.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from bench_quality import (
    KEY_METRICS,
    drug_features,
    fresh_simulator_truth,
    predict_held_out,
    simulator,
    train_model,
)
from tqdm.auto import tqdm

ENCODER = "PerturbX (encoder's embeddings)"


def embed_from_table(embedding, rows: torch.Tensor, vectors: torch.Tensor) -> None:
    """Read vocabulary ``rows`` (0-based) from the learned-embedding table, set to ``vectors``,
    instead of from the drug encoder (their dose responses stay as they are)."""
    with torch.no_grad():
        embedding.token_embedding.weight[rows + 1] = vectors.to(embedding.token_embedding.weight)
        embedding.has_structure[rows] = False


def fit_held_out_embeddings(
    model,
    cells: ad.AnnData,
    drugs: list[str],
    *,
    epochs: int,
    lr: float,
    fit_dose_response: bool,
) -> None:
    """Replace ``drugs``' encoder embeddings in ``model`` by vectors fitted to ``cells``.

    The drugs' vocabulary rows switch from the drug encoder to the learned-embedding table,
    initialised at the encoder's output; only those rows (and, with ``fit_dose_response``,
    their dose-response parameters) are optimised, on the ELBO of ``cells`` (counts).
    """
    module = model.module
    embedding, dose_response = module.perturbation_embedding, module.dose_response
    rows = torch.tensor([model.perturbations.index(d) for d in drugs])
    with torch.no_grad():
        embed_from_table(embedding, rows, embedding.drug_encoder(embedding.fingerprints[rows]))
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    trained = [embedding.token_embedding.weight]
    if fit_dose_response:
        with torch.no_grad():
            dose_response.params[rows + 1] = dose_response.parameters_for(rows + 1)
            dose_response.has_structure[rows] = False
        trained.append(dose_response.params)
    mask = torch.zeros(embedding.n_vocab + 1, 1)
    mask[rows + 1] = 1.0
    for parameter in trained:
        parameter.requires_grad_(True)
        parameter.register_hook(lambda grad: grad * mask)  # the other rows stay as trained
    optimiser = torch.optim.Adam(trained, lr=lr)
    module.eval()  # basal latent at its posterior mean, as in prediction
    loader = model._make_data_loader(
        adata=model._validate_anndata(cells), batch_size=512, shuffle=True
    )
    for _ in tqdm(range(epochs), desc="fitting held-out embeddings"):
        for batch in loader:
            _, _, loss = module(batch)
            optimiser.zero_grad()
            loss.loss.backward()
            optimiser.step()
    for parameter in trained:
        parameter.requires_grad_(False)


def ridge_weights(train_features: np.ndarray, query_features: np.ndarray, penalty: float):
    """``(n_query, n_train)`` weights of centred linear-kernel ridge regression.

    A query's prediction is ``weights @ Y`` for training targets ``Y``; each row sums to 1
    (the intercept is the training mean). ``penalty`` is relative to the kernel's mean
    diagonal.
    """
    centre = train_features.mean(0)
    x_train, x_query = train_features - centre, query_features - centre
    n = len(x_train)
    kernel = x_train @ x_train.T
    ridge = penalty * np.trace(kernel) / n
    centring = np.eye(n) - 1.0 / n
    solved = np.linalg.solve(kernel + ridge * np.eye(n), centring)
    return 1.0 / n + (x_query @ x_train.T) @ solved


def interpolate(model, setup, args, seed, test, train_drugs, held_out, weights):
    """Held-out drugs' predictions by the ridge ``weights`` over the training drugs: of the
    model's predictions (effect space) and of the embeddings, decoded (embedding space)."""
    from perturbx.metrics import log_normalise

    controls = test[test.obs["drug"].astype(str) == "control"].copy()
    doses = sorted(test.obs.loc[test.obs["drug"] != "control", "dose"].unique())
    cell_types = sorted(test.obs["cell_type"].astype(str).unique())
    grid = pd.MultiIndex.from_product([doses, cell_types], names=["dose", "cell_type"])
    targets = pd.DataFrame(
        [(d, x, c) for d in train_drugs for x, c in grid], columns=["drug", "dose", "cell_type"]
    )
    cells = model.predict(
        controls,
        target=targets,
        n_cells_per_target=args.n_source_cells,
        sample=True,
        repeat_sources=True,
        seed=seed,
    )
    matrix, _ = log_normalise(cells.X, counts=True)
    keys = pd.MultiIndex.from_frame(
        cells.obs[["drug", "dose", "cell_type"]].astype(
            {"drug": str, "dose": float, "cell_type": str}
        )
    )
    means = pd.DataFrame(np.asarray(matrix), index=keys).groupby(level=[0, 1, 2]).mean()
    rows, obs = [], []
    for i, drug in enumerate(held_out):
        for dose, cell_type in grid:
            trained = np.stack([means.loc[(d, dose, cell_type)].to_numpy() for d in train_drugs])
            rows.append(weights[i] @ trained)
            obs.append((drug, dose, cell_type))
    effects = ad.AnnData(
        np.stack(rows).astype(np.float32),
        obs=pd.DataFrame(
            obs,
            columns=["drug", "dose", "cell_type"],
            index=[f"interpolated_{k}" for k in range(len(obs))],
        ),
        var=test.var[[]].copy(),
    )
    effects.obs["method"] = "PerturbX (interpolated effects)"

    embedding = model.module.perturbation_embedding
    held_rows = torch.tensor([model.perturbations.index(d) for d in held_out])
    train_rows = torch.tensor([model.perturbations.index(d) for d in train_drugs])
    saved = embedding.token_embedding.weight.detach().clone()
    with torch.no_grad():
        trained = embedding.drug_encoder(embedding.fingerprints[train_rows])
        embed_from_table(embedding, held_rows, torch.as_tensor(weights).to(trained) @ trained)
    embeddings = predict_held_out(model, setup, args, seed, test)
    embeddings.obs["method"] = "PerturbX (interpolated embeddings)"
    with torch.no_grad():
        embedding.token_embedding.weight.copy_(saved)
        embedding.has_structure[held_rows] = True
    return [effects, embeddings]


def run(seed: int, args) -> pd.DataFrame:
    """Per-condition metrics of the encoder's and the fitted embeddings and the baselines."""
    from perturbx.baselines import linear_baseline
    from perturbx.metrics import score

    adata, setup, model_kwargs = simulator(args, seed)
    setup = {**setup, "smiles_key": "smiles"}
    train = adata[adata.obs["split"] == "train"].copy()
    test = adata[adata.obs["split"] == "test"].copy()
    model, _ = train_model(adata, setup, model_kwargs, args, seed)
    encoder = predict_held_out(model, setup, args, seed, test)
    encoder.obs["method"] = ENCODER

    fresh = fresh_simulator_truth(args, seed, test)
    held_out = sorted(set(test.obs["drug"].astype(str)) - {"control"})
    train_drugs = sorted(set(train.obs["drug"].astype(str)) - {"control"})
    features = drug_features(model.featurizer, train, test, "drug")
    weights = ridge_weights(
        np.stack([features[d] for d in train_drugs]).astype(np.float64),
        np.stack([features[d] for d in held_out]).astype(np.float64),
        args.interpolation_penalty,
    )
    interpolated = interpolate(model, setup, args, seed, test, train_drugs, held_out, weights)
    fit_held_out_embeddings(
        model,
        fresh[fresh.obs["drug"].astype(str).isin(held_out).to_numpy()].copy(),
        held_out,
        epochs=args.fit_epochs,
        lr=args.fit_lr,
        fit_dose_response=args.fit_dose_response,
    )
    fitted = predict_held_out(model, setup, args, seed, test)
    fitted_what = "embeddings and dose responses" if args.fit_dose_response else "embeddings"
    fitted.obs["method"] = f"PerturbX (fitted {fitted_what}: ceiling)"

    common = dict(perturbation_key="drug", dose_key="dose", covariate_keys=["cell_type"])
    targets = encoder.obs[["drug", "dose", "cell_type"]].drop_duplicates()
    linear = linear_baseline(train, targets, features, method="linear", **common)
    predicted = ad.concat([encoder, fitted, *interpolated, linear], join="inner")
    tables = []
    for truth_label, truth in [("test cells", test), (f"fresh ×{args.fresh_truth}", fresh)]:
        result = score(
            predicted, truth, method_key="method", centroid_reference=train, seed=seed, **common
        )
        table = result.per_condition.copy()
        table.insert(0, "seed", seed)
        table.insert(0, "scored_against", truth_label)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-held-out", type=int, default=10)
    parser.add_argument("--n-drugs", type=int, default=40)
    parser.add_argument("--sim-cells", type=int, default=12_000)
    parser.add_argument("--sim-genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=40, help="PerturbX training epochs")
    parser.add_argument("--fresh-truth", type=int, default=10)
    parser.add_argument("--fit-epochs", type=int, default=15)
    parser.add_argument("--fit-lr", type=float, default=3e-2)
    parser.add_argument(
        "--fit-dose-response",
        action="store_true",
        help="also fit the held-out drugs' dose-response parameters",
    )
    parser.add_argument(
        "--interpolation-penalty",
        type=float,
        default=0.03,
        help="ridge penalty of the interpolation weights (× mean kernel diagonal)",
    )
    parser.add_argument("--n-source-cells", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/embedding_ceiling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    # What bench_quality's helpers read from its own arguments.
    args.epochs, args.current = {"simulator": args.epochs}, "simulator"
    args.model_kwargs, args.plan_kwargs, args.batch_size = {}, {}, None

    per_condition = pd.concat([run(seed, args) for seed in args.seeds], ignore_index=True)
    metrics = KEY_METRICS[:4]
    medians = per_condition.groupby(["scored_against", "method"], sort=False)[metrics].median()
    with pd.option_context("display.width", 200, "display.max_columns", 10):
        print(medians.round(3).to_string())
        by_dose = per_condition[per_condition["scored_against"] == "test cells"]
        print(by_dose.groupby(["method", "dose"])[metrics[:2]].median().round(3).to_string())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_condition.to_csv(f"{out}.csv", index=False)


if __name__ == "__main__":
    main()
