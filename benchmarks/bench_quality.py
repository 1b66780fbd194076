"""Prediction quality on held-out perturbations: PerturbX against honest baselines.

Usage::

    python benchmarks/bench_quality.py                                   # all three, seeds 0 1 2
    python benchmarks/bench_quality.py --datasets lincs --seeds 0 1 2 3 4
    python benchmarks/bench_quality.py --datasets simulator --plan-kwargs '{"adversary_weight": 10}'

Datasets (real ones from the pooch cache, ``PERTURBX_DATA_DIR``):

- ``simulator``: :func:`perturbx.data.simulate_drug_screen` (NB counts, drug effects a
  function of the Morgan fingerprint), ``--n-held-out`` of ``--n-drugs`` drugs held out.
- ``lincs``: :func:`perturbx.datasets.lincs_a375` (L1000 level 3, A375, 6 doses per drug),
  ``--n-held-out`` drugs *with SMILES* held out per seed (Gaussian likelihood).
- ``norman``: :func:`perturbx.datasets.norman_mcfaline_devel` (K562 CRISPRa), every double
  perturbation whose two genes are also perturbed alone held out (Gaussian likelihood).

Each seed draws a new split (simulator: a new screen too) and trains the models with that
seed. Methods, side by side on the same held-out conditions:

- ``PerturbX``: drug embeddings from the Morgan fingerprint (genes: learned embeddings).
- ``PerturbX (ensemble of K)`` and ``PerturbX (linear shift head, ridge for unseen; ensemble
  of K)`` (``--ensemble K``, drug screens): a :class:`perturbx.PerturbXEnsemble` of K models
  of that variant trained with seeds ``seed, seed + 1000, ...`` (the first is the single
  model's); each predicted cell is sampled from one member in turn, so a condition's
  prediction is the mixture of the K models'.
- ``PerturbX (linear shift head, ridge for unseen)`` (``--linear-head``, drug screens):
  ``PerturbX(linear_shift_head=True, unseen_molecules="ridge")``, the perturbation shift
  decoded linearly and held-out drugs embedded by ridge regressions from the fingerprint
  fitted on the training drugs' encoder outputs.
- ``PerturbX (learned only)``: set up without SMILES (drugs): an unseen drug has an untrained
  embedding, so this is the floor of what a non-chemical model can do; on Norman the genes
  are seen in training and this is the only PerturbX variant.
- ``linear``: ridge regression (penalty by leave-one-out CV) from fingerprint × log-dose
  features to the training conditions' deltas (:func:`perturbx.baselines.linear_baseline`);
  on combinations, the additive baseline (control + the two singles' measured deltas,
  :func:`perturbx.baselines.additive_baseline`).
- ``kernel ridge (MinMax)`` (drug screens): kernel ridge with a MinMax (Tanimoto) kernel on
  Morgan count fingerprints times a dose kernel (:func:`perturbx.baselines.kernel_ridge_baseline`).
- On ``glioblastoma`` (a held-out patient), ``linear`` is the transferred mean response: the
  patient's controls plus the other patients' mean response
  (:func:`perturbx.baselines.transferred_response_baseline`); the perturbed centroid of the
  held-out patient is undefined (it has no training perturbations), so the metrics against
  it are NaN there.
- ``control_mean``, ``perturbed_centroid`` (mean baseline), ``interpolated_duplicate``
  (positive control; unavailable on LINCS, which has one well per condition).

Scoring: :func:`perturbx.metrics.score` with the training cells as the centroid reference.
On the simulator the same predictions are also scored against a fresh, ``--fresh-truth``
times larger sample of the held-out conditions and controls (rows ``simulator, fresh truth
×K``): with ~23 test cells per condition the test split's means are noisy (the positive
control's R² Δ centroid is ~0.15), and the fresh sample shows what the methods predict
without that noise.
Reported: median and interquartile range over all held-out conditions of all seeds, the
median normalised score (0 = mean baseline, 1 = positive control), the median of the
per-seed medians' spread, and win rates against the mean baseline, the control mean and the
linear baseline. Writes ``<out>.csv`` (per condition), ``<out>_summary.csv`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

KEY_METRICS = [
    "weighted_mse",
    "weighted_r2_delta_centroid",
    "pearson_delta_centroid_top20",
    "centroid_accuracy",
    "pearson_delta_control",
    "mse",
]
LOWER_IS_BETTER = {"weighted_mse", "mse"}
PERTURBX, LEARNED, LINEAR = "PerturbX", "PerturbX (learned only)", "linear"
KERNEL_RIDGE = "kernel ridge (MinMax)"
LINEAR_HEAD = "PerturbX (linear shift head, ridge for unseen)"
LINEAR_HEAD_KWARGS = {"linear_shift_head": True, "unseen_molecules": "ridge"}


# ------------------------------------------------------------------------------ datasets
def simulator(args, seed):
    """A simulated screen, drugs held out; returns the AnnData and its description."""
    from perturbx.data import simulate_drug_screen, split_unseen_perturbations

    adata = simulate_drug_screen(
        n_cells=args.sim_cells, n_genes=args.sim_genes, n_drugs=args.n_drugs, seed=seed
    )
    split_unseen_perturbations(
        adata,
        "drug",
        dose_key="dose",
        n_held_out=args.n_held_out,
        covariate_keys=["cell_type"],
        seed=seed,
    )
    setup = dict(perturbation_key="drug", dose_key="dose", covariate_keys=["cell_type"])
    return adata, setup, {"likelihood": "nb"}


def lincs(args, seed):
    """LINCS A375, drugs with SMILES held out."""
    from perturbx.data import split_unseen_perturbations
    from perturbx.datasets import lincs_a375

    adata = lincs_a375()
    split_unseen_perturbations(
        adata,
        "perturbation",
        dose_key="dose",
        n_held_out=args.n_held_out,
        require_key="has_smiles",
        covariate_keys=["cell_type"],
        seed=seed,
    )
    setup = dict(perturbation_key="perturbation", dose_key="dose", covariate_keys=["cell_type"])
    return adata, setup, {"likelihood": "gaussian"}


def norman(args, seed):
    """Norman CRISPRa devel subset, the doubles whose singles are measured held out."""
    from perturbx.data import parse_condition, split_unseen_combinations
    from perturbx.datasets import norman_mcfaline_devel

    adata = norman_mcfaline_devel()
    adata = adata[adata.obs["cell_type"] == "k562"].copy()
    names = {c: parse_condition(c)[0] for c in adata.obs["perturbation"].astype(str).unique()}
    singles = {n[0] for n in names.values() if len(n) == 1}
    doubles = [c for c, n in names.items() if len(n) == 2 and set(n) <= singles]
    split_unseen_combinations(
        adata,
        "perturbation",
        dose_key="dose",
        held_out=doubles,
        covariate_keys=["cell_type"],
        seed=seed,
    )
    setup = dict(perturbation_key="perturbation", dose_key="dose", covariate_keys=["cell_type"])
    return adata, setup, {"likelihood": "gaussian"}


def glioblastoma(args, seed):
    """Zhao 2021 glioblastoma: one patient's panobinostat response held out (seed -> patient).

    The held-out patient's treated cells and 10% of every patient's controls are the test
    split (the held-out patient's other controls stay in train, so the model knows its basal
    state); PerturbX predicts the treated cells from the patient's held-out controls.
    """
    from perturbx.data import split_unseen_cell_types
    from perturbx.datasets import zhao2021_glioblastoma

    adata = zhao2021_glioblastoma()
    patients = sorted(adata.obs["patient"].astype(str).unique())
    split_unseen_cell_types(
        adata,
        "perturbation",
        "patient",
        held_out_cell_type=patients[seed % len(patients)],
        dose_key="dose",
        seed=seed,
    )
    setup = dict(perturbation_key="perturbation", dose_key="dose", covariate_keys=["patient"])
    return adata, setup, {"likelihood": "nb"}


DATASETS = {"simulator": simulator, "lincs": lincs, "norman": norman, "glioblastoma": glioblastoma}
#: Datasets whose held-out unit is a covariate group (patient), not a perturbation.
COVARIATE_TRANSFER = {"glioblastoma": "patient"}


def fresh_simulator_truth(args, seed, test):
    """A fresh, ``args.fresh_truth`` times larger sample of the simulated held-out conditions.

    The simulator's ground truth (effects, dispersions) does not depend on ``n_cells``, so a
    larger screen with the same seed has the same conditions with more cells each. Scored
    against it, the held-out conditions' means carry ~1/``fresh_truth`` of the test split's
    sampling noise: the positive control approaches its ceiling, and differences between
    methods are differences in what they predict, not noise in the truth.
    """
    from perturbx.data import simulate_drug_screen

    large = simulate_drug_screen(
        n_cells=args.sim_cells * args.fresh_truth,
        n_genes=args.sim_genes,
        n_drugs=args.n_drugs,
        seed=seed,
    )
    keep = large.obs["drug"].astype(str).isin(set(test.obs["drug"].astype(str)))
    return large[keep.to_numpy()].copy()


# ------------------------------------------------------------------------------- methods
def ensemble_name(variant: str, n_models: int) -> str:
    """Method label of an ensemble of ``n_models`` models of ``variant``."""
    if variant.endswith(")"):  # "PerturbX (linear shift head, ...)" -> "...; ensemble of K)"
        return f"{variant[:-1]}; ensemble of {n_models})"
    return f"{variant} (ensemble of {n_models})"


def train_model(adata, setup, model_kwargs, args, seed):
    """Train a PerturbX on the split's training cells; the model and its training seconds."""
    import scvi

    from perturbx import PerturbX

    adata = adata.copy()
    PerturbX.setup_anndata(adata, **setup)
    scvi.settings.seed = seed  # the initial weights too
    model = PerturbX(adata, **{**model_kwargs, **args.model_kwargs})
    start = time.perf_counter()
    model.train(
        max_epochs=args.epochs[args.current],
        split_key="split",
        seed=seed,
        enable_progress_bar=False,
        plan_kwargs=args.plan_kwargs or None,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    return model, time.perf_counter() - start


def predict_held_out(model, setup, args, seed, test):
    """Log-normalised predictions of the test conditions by a PerturbX or PerturbXEnsemble."""
    from perturbx.metrics import log_normalise

    if "smiles_key" not in setup and "smiles" in test.obs:
        # Without a drug encoder the held-out drugs are vocabulary entries (untrained).
        test = test.copy()
        del test.obs["smiles"]
    pred = model.predict_conditions(test, n_cells_per_target=args.n_source_cells, seed=seed)
    counts = pred.uns["perturbx_prediction"]["likelihood"] != "gaussian"
    matrix, _ = log_normalise(pred.X, counts=counts)
    return ad.AnnData(np.asarray(matrix), obs=pred.obs.copy(), var=pred.var.copy())


def drug_features(featurizer, train, test, perturbation_key) -> dict[str, np.ndarray]:
    """Fingerprint of every single drug with SMILES in ``train`` or ``test`` (for the ridge)."""
    columns = [perturbation_key, "smiles"]
    smiles = pd.concat([train.obs[columns].dropna(), test.obs[columns].dropna()]).astype(str)
    smiles = smiles.drop_duplicates(perturbation_key).set_index(perturbation_key)["smiles"]
    smiles = smiles[~smiles.str.contains(r"\+", regex=True) & (smiles != "")]
    return dict(zip(smiles.index, featurizer(smiles.tolist()), strict=True))


def run(dataset: str, seed: int, args) -> tuple[pd.DataFrame, dict]:
    """Per-condition metrics of every method on one split of one dataset."""
    from perturbx.baselines import additive_baseline, kernel_ridge_baseline, linear_baseline
    from perturbx.chem import MorganFeaturizer
    from perturbx.metrics import score

    args.current = dataset
    adata, setup, model_kwargs = DATASETS[dataset](args, seed)
    train = adata[adata.obs["split"] == "train"].copy()
    test = adata[adata.obs["split"] == "test"].copy()
    pkey, dkey, ckeys = setup["perturbation_key"], setup["dose_key"], setup["covariate_keys"]
    predictions, seconds = [], {}
    is_drug_screen = "smiles" in adata.obs.columns
    variants = {PERTURBX: {**setup, "smiles_key": "smiles"}} if is_drug_screen else {}
    if args.learned_only or not is_drug_screen:
        variants[LEARNED] = setup
    variant_kwargs = {}
    if args.linear_head and is_drug_screen:
        variants[LINEAR_HEAD] = variants[PERTURBX]
        variant_kwargs[LINEAR_HEAD] = LINEAR_HEAD_KWARGS
    models = {}
    for name, variant_setup in variants.items():
        models[name], seconds[name] = train_model(
            adata, variant_setup, {**model_kwargs, **variant_kwargs.get(name, {})}, args, seed
        )
        pred = predict_held_out(models[name], variant_setup, args, seed, test)
        pred.obs["method"] = name
        predictions.append(pred)
    ensembled = [n for n in (PERTURBX, LINEAR_HEAD) if n in models] if args.ensemble > 1 else []
    for name in ensembled:
        from perturbx import PerturbXEnsemble

        members = [models[name]]
        for k in range(1, args.ensemble):
            member, member_seconds = train_model(
                adata,
                variants[name],
                {**model_kwargs, **variant_kwargs.get(name, {})},
                args,
                seed + 1000 * k,
            )
            members.append(member)
            seconds[name] += member_seconds
        ensemble = PerturbXEnsemble.from_models(members, seed=seed)
        pred = predict_held_out(ensemble, variants[name], args, seed, test)
        pred.obs["method"] = ensemble_name(name, args.ensemble)
        predictions.append(pred)

    targets = predictions[0].obs[[pkey, dkey, *ckeys]].drop_duplicates()
    common = dict(perturbation_key=pkey, dose_key=dkey, covariate_keys=ckeys)
    if dataset in COVARIATE_TRANSFER:
        from perturbx.baselines import transferred_response_baseline

        linear = transferred_response_baseline(
            train, targets, transfer_key=COVARIATE_TRANSFER[dataset], method=LINEAR, **common
        )
    elif is_drug_screen:
        features = drug_features(models[PERTURBX].featurizer, train, test, pkey)
        linear = linear_baseline(train, targets, features, method=LINEAR, **common)
        counts = drug_features(MorganFeaturizer(counts=True), train, test, pkey)
        predictions.append(
            kernel_ridge_baseline(train, targets, counts, method=KERNEL_RIDGE, **common)
        )
    else:
        linear = additive_baseline(train, targets, method=LINEAR, **common)
    predictions.append(linear)

    truths = {dataset: test}
    if dataset == "simulator" and args.fresh_truth:
        truths[f"simulator, fresh truth ×{args.fresh_truth}"] = fresh_simulator_truth(
            args, seed, test
        )
    predicted = ad.concat(predictions, join="inner")
    tables, calibration = [], {}
    for label, truth in truths.items():
        result = score(
            predicted,
            truth,
            method_key="method",
            centroid_reference=train,
            seed=seed,
            **common,
        )
        per_condition = result.per_condition.copy()
        normalised = result.normalised[["method", "condition", *result.metrics]]
        normalised = normalised.rename(columns={m: f"{m}__normalised" for m in result.metrics})
        per_condition = pd.concat(
            [
                per_condition.reset_index(drop=True),
                normalised.drop(columns=["method", "condition"]).reset_index(drop=True),
            ],
            axis=1,
        )
        per_condition.insert(0, "seed", seed)
        per_condition.insert(0, "dataset", label)
        tables.append(per_condition)
        calibration[label] = result.calibration["median_drf"].to_dict()
    per_condition = pd.concat(tables, ignore_index=True)
    info = {
        "dataset": dataset,
        "seed": seed,
        "train_seconds": seconds,
        "n_held_out_conditions": int(per_condition["condition"].nunique()),
        "calibration": calibration,
    }
    return per_condition, info


# ------------------------------------------------------------------------------ summary
def summarise(per_condition: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Median, IQR, normalised median, seed spread and win rates per dataset × method."""
    rows = []
    keys = ["dataset", "seed", "condition"]
    for (dataset, method), part in per_condition.groupby(["dataset", "method"], sort=False):
        everything = per_condition[per_condition["dataset"] == dataset]
        for metric in metrics:
            values = part[metric]
            wide = everything.pivot_table(index=keys, columns="method", values=metric, dropna=False)
            sign = -1 if metric in LOWER_IS_BETTER else 1
            row = {
                "dataset": dataset,
                "method": method,
                "metric": metric,
                "median": values.median(),
                "q25": values.quantile(0.25),
                "q75": values.quantile(0.75),
                "seed_medians_sd": part.groupby("seed")[metric].median().std(),
                "normalised_median": part[f"{metric}__normalised"].median(),
                "n": int(values.notna().sum()),
            }
            for reference in ("perturbed_centroid", "control_mean", LINEAR):
                if reference in wide and reference != method:
                    both = wide[[method, reference]].dropna()
                    row[f"beats_{reference}"] = (
                        (sign * (both[method] - both[reference]) > 0).mean()
                        if len(both)
                        else np.nan
                    )
            rows.append(row)
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, metrics: list[str]) -> str:
    """A README table: median [IQR] per dataset × method × metric."""
    lines = []
    for dataset, part in summary.groupby("dataset", sort=False):
        lines += [
            f"**{dataset}**",
            "",
            "| method | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.set_index("metric")
            cells = []
            for m in metrics:
                r = rows.loc[m]
                cell = f"{r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}]"
                if np.isfinite(r["normalised_median"]):
                    cell += f" ({r['normalised_median']:+.2f})"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-held-out", type=int, default=10, help="held-out drugs per seed")
    parser.add_argument("--n-drugs", type=int, default=40, help="simulator drugs")
    parser.add_argument("--sim-cells", type=int, default=12_000)
    parser.add_argument("--sim-genes", type=int, default=500)
    parser.add_argument("--epochs-simulator", type=int, default=None)
    parser.add_argument("--epochs-lincs", type=int, default=None)
    parser.add_argument("--epochs-norman", type=int, default=None)
    parser.add_argument("--epochs-glioblastoma", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="default: PerturbX's")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON")
    parser.add_argument("--plan-kwargs", type=json.loads, default={}, help="JSON")
    parser.add_argument(
        "--learned-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train PerturbX without SMILES on drug screens (--no-learned-only: skip)",
    )
    parser.add_argument(
        "--linear-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train PerturbX with linear_shift_head=True, unseen_molecules='ridge' on "
        "drug screens (--no-linear-head: skip)",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="also score ensembles of this many models of each fingerprint variant (drug "
        "screens; 1: none)",
    )
    parser.add_argument(
        "--n-source-cells",
        type=int,
        default=3000,
        help="predicted cells per held-out condition (counts models: NB draws, whose mean "
        "carries Monte-Carlo error ~ 1/sqrt(n))",
    )
    parser.add_argument(
        "--fresh-truth",
        type=int,
        default=10,
        help="simulator: also score against a fresh sample this many times larger (0: off)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()
    if args.n_held_out < 8:
        parser.error("--n-held-out must be >= 8.")
    torch.set_num_threads(args.threads)
    # Metrics undefined for a method (e.g. correlations of a constant delta) are NaN.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    args.epochs = {
        "simulator": args.epochs_simulator,
        "lincs": args.epochs_lincs,
        "norman": args.epochs_norman,
        "glioblastoma": args.epochs_glioblastoma,
    }

    start = time.perf_counter()
    tables, infos = [], []
    for dataset in args.datasets:
        for seed in args.seeds:
            table, info = run(dataset, seed, args)
            tables.append(table)
            infos.append(info)
            timing = ", ".join(f"{k} {v:.0f} s" for k, v in info["train_seconds"].items())
            print(
                f"{dataset} seed {seed}: {info['n_held_out_conditions']} held-out "
                f"conditions, training {timing}",
                flush=True,
            )
    per_condition = pd.concat(tables, ignore_index=True)
    summary = summarise(per_condition, KEY_METRICS)
    wall = time.perf_counter() - start

    del args.current
    settings = {k: v for k, v in vars(args).items()}
    print(f"\nsettings: {json.dumps(settings)}; wall {wall:.0f} s\n")
    with pd.option_context(
        "display.width", 220, "display.max_columns", 20, "display.max_rows", 500
    ):
        print(summary.round(3).to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_condition.to_csv(f"{out}.csv", index=False)
    summary.to_csv(f"{out}_summary.csv", index=False)
    # Quoted as a shell would need it (JSON arguments contain spaces and quotes).
    command = shlex.join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]])
    header = (
        f"Command: `{command}`"
        f" (wall {wall / 60:.0f} min, {args.threads} thread(s)). Median [IQR] over "
        "held-out conditions × seeds; in brackets the median normalised score "
        "(0 = mean baseline, 1 = positive control).\n\n"
    )
    Path(f"{out}.md").write_text(header + markdown(summary, KEY_METRICS))
    Path(f"{out}.json").write_text(
        json.dumps({"settings": settings, "runs": infos}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
