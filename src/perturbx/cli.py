"""Command line: ``perturbx demo`` trains on a simulated screen and scores unseen drugs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUMMARY_METRICS = (
    "weighted_mse",
    "weighted_r2_delta_centroid",
    "pearson_delta_centroid_top20",
    "pearson_delta_control_top20",
    "centroid_accuracy",
)


def demo(args: argparse.Namespace) -> None:
    """Simulate a drug screen, hold out whole drugs, train, predict them from controls, score."""
    import numpy as np
    import scvi

    import perturbx
    from perturbx.data import simulate_drug_screen, split_unseen_perturbations

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scvi.settings.seed = args.seed
    print(f"Simulating {args.n_cells} cells x {args.n_genes} genes, {args.n_drugs} drugs ...")
    adata = simulate_drug_screen(
        n_cells=args.n_cells, n_genes=args.n_genes, n_drugs=args.n_drugs, seed=args.seed
    )
    split_unseen_perturbations(
        adata, "drug", dose_key="dose", n_held_out=args.held_out, seed=args.seed
    )
    held_out = sorted(set(adata.obs.loc[adata.obs["split"] == "test", "drug"]) - {"control"})
    print(f"Held-out drugs (never seen in training, predicted from SMILES): {held_out}")
    perturbx.PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    model = perturbx.PerturbX(adata)
    model.train(max_epochs=args.epochs, split_key="split", seed=args.seed)
    test = adata[adata.obs["split"] == "test"].copy()
    result = model.evaluate(test, seed=args.seed)
    table = result.summary.reset_index()
    table = table[table["metric"].isin(SUMMARY_METRICS)].pivot(
        index="method", columns="metric", values="median"
    )[list(SUMMARY_METRICS)]
    print(f"\nMedian over {result.per_condition['condition'].nunique()} held-out conditions:")
    print(table.round(3).to_string())
    print(f"\n{result.normalisation}")
    result.per_condition.to_csv(out / "per_condition.csv", index=False)
    table.to_csv(out / "summary.csv")
    figure = out / "evaluation_summary.png"
    perturbx.plotting.evaluation_summary(result, list(SUMMARY_METRICS), show=False, save=figure)
    model.save(out / "model", overwrite=True)
    print(f"\nWrote {out / 'summary.csv'}, {out / 'per_condition.csv'}, {figure} and the model.")
    np.seterr(all="warn")


def main(argv: list[str] | None = None) -> None:
    """Run the ``perturbx`` command line (``perturbx demo``); ``argv`` defaults to sys.argv."""
    parser = argparse.ArgumentParser(prog="perturbx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="simulate a screen, train, score held-out drugs")
    run.add_argument("--n-cells", type=int, default=20_000)
    run.add_argument("--n-genes", type=int, default=2_000)
    run.add_argument("--n-drugs", type=int, default=40)
    run.add_argument("--held-out", type=int, default=8, help="drugs held out of training")
    run.add_argument("--epochs", type=int, default=30)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default="perturbx_demo", help="output folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)


if __name__ == "__main__":
    sys.exit(main())
