"""Print the README's quality table from ``bench_quality.py`` outputs.

Usage::

    python benchmarks/quality_table.py benchmarks/results/quality_simulator \
        benchmarks/results/quality_real
    python benchmarks/quality_table.py --by-dose benchmarks/results/quality_simulator

Each argument is an ``--out`` prefix of :mod:`bench_quality` (its ``.csv`` and
``_summary.csv`` are read). One row per dataset × method: medians of the headline metrics
and the share of held-out conditions (× seeds) on which PerturbX's weighted MSE is lower.
``--by-dose``: instead, one row per dataset × dose with each method's median weighted MSE
and weighted R² of deltas vs the centroid (drug screens; where the drugs barely act, every
method's deviation from the centroid is noise).
``--paired A B``: instead, method A against method B condition by condition: both medians,
the mean difference, the shares of conditions where A is better and where they tie, and
the p-value of the Wilcoxon signed-rank test (ties dropped), per dataset × metric.
"""

from __future__ import annotations

import argparse

import pandas as pd
from scipy.stats import wilcoxon

ORDER = [
    "PerturbX",
    "PerturbX (learned only)",
    "linear",
    "perturbed_centroid",
    "control_mean",
    "interpolated_duplicate",
]
NAMES = {
    "perturbed_centroid": "mean baseline (perturbed centroid)",
    "control_mean": "control mean",
    "interpolated_duplicate": "positive control (interpolated duplicate)",
    "linear": "linear (ridge / additive)",
}


def ordered(methods) -> list[str]:
    """Methods in table order; PerturbX variants ("PerturbX (ensemble of K)", "PerturbX
    (linear shift head, ...)") after PerturbX."""
    present = set(methods)
    variants = sorted(m for m in present if m.startswith("PerturbX (") and m not in ORDER)
    return [m for m in ORDER[:1] + variants + ORDER[1:] if m in present]


LOWER_IS_BETTER = {"weighted_mse"}
METRICS = [
    "weighted_mse",
    "weighted_r2_delta_centroid",
    "pearson_delta_centroid_top20",
    "centroid_accuracy",
]


def rows(prefix: str) -> list[str]:
    """Markdown rows of one benchmark output."""
    per_condition = pd.read_csv(f"{prefix}.csv")
    summary = pd.read_csv(f"{prefix}_summary.csv")
    out = []
    for dataset, part in summary.groupby("dataset", sort=False):
        wide = per_condition[per_condition["dataset"] == dataset].pivot_table(
            index=["seed", "condition"], columns="method", values="weighted_mse", dropna=False
        )
        ours = "PerturbX" if "PerturbX" in wide else "PerturbX (learned only)"
        for method in ordered(part["method"]):
            medians = part[part["method"] == method].set_index("metric")["median"]
            cells = ["—" if pd.isna(medians[m]) else f"{medians[m]:.3f}" for m in METRICS]
            both = wide[[ours, method]].dropna() if method != ours else None
            win = "—" if both is None or both.empty else f"{(both[ours] < both[method]).mean():.0%}"
            out.append(
                f"| {dataset} | {NAMES.get(method, method)} | " + " | ".join(cells) + f" | {win} |"
            )
    return out


def dose_rows(prefix: str) -> list[str]:
    """Markdown tables per dataset (one row per dose): median weighted MSE / weighted R² Δ.

    Each dataset gets its own table (with its own header), since datasets can differ in the
    methods scored.
    """
    per_condition = pd.read_csv(f"{prefix}.csv")
    out = []
    for dataset, part in per_condition.groupby("dataset", sort=False):
        doses = pd.to_numeric(part["dose"], errors="coerce")
        if doses.isna().any():
            continue  # combinations ("1+1"): no single dose axis
        medians = (
            part.assign(dose=doses)
            .groupby(["dose", "method"])[["weighted_mse", "weighted_r2_delta_centroid"]]
            .median()
        )
        methods = ordered(part["method"])
        if out:
            out.append("")
        out += [
            "| dataset | dose | " + " | ".join(NAMES.get(m, m) for m in methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        for dose in sorted(doses.unique()):
            cells = []
            for m in methods:
                mse, r2 = medians.loc[(dose, m)]
                cells.append("—" if pd.isna(mse) else f"{mse:.3f} / {r2:+.3f}")
            out.append(f"| {dataset} | {dose:g} | " + " | ".join(cells) + " |")
    return out


def paired_rows(prefix: str, first: str, second: str) -> list[str]:
    """Markdown rows comparing methods ``first`` and ``second`` on the same conditions."""
    per_condition = pd.read_csv(f"{prefix}.csv")
    out = []
    for dataset, part in per_condition.groupby("dataset", sort=False):
        if not {first, second} <= set(part["method"]):
            continue  # e.g. Norman has no fingerprint variants
        for metric in METRICS:
            wide = part.pivot_table(index=["seed", "condition"], columns="method", values=metric)
            if not {first, second} <= set(wide.columns):  # a metric undefined for a method
                out.append(f"| {dataset} | {metric} | — | — | — | — | — | — | 0 |")
                continue
            both = wide[[first, second]].dropna()
            difference = both[first] - both[second]
            better = -difference if metric in LOWER_IS_BETTER else difference
            p_value = wilcoxon(difference).pvalue if (difference != 0).any() else float("nan")
            out.append(
                f"| {dataset} | {metric} | {both[first].median():.3f} | "
                f"{both[second].median():.3f} | {difference.mean():+.4f} | "
                f"{(better > 0).mean():.0%} | {(better == 0).mean():.0%} | {p_value:.3g} | "
                f"{len(both)} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("prefixes", nargs="+", help="--out prefixes of bench_quality.py")
    parser.add_argument(
        "--by-dose", action="store_true", help="weighted MSE / weighted R² per dose instead"
    )
    parser.add_argument(
        "--paired",
        nargs=2,
        metavar=("A", "B"),
        help="method A against method B, condition by condition, instead",
    )
    args = parser.parse_args()
    if args.paired:
        first, second = args.paired
        print(
            f"| dataset | metric | median {first} | median {second} | mean difference | "
            "A better | tie | Wilcoxon p | conditions |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for prefix in args.prefixes:
            print("\n".join(paired_rows(prefix, first, second)))
        return
    if args.by_dose:
        for prefix in args.prefixes:
            print("\n".join(dose_rows(prefix)))
        return
    print(
        "| dataset | method | weighted MSE ↓ | weighted R² Δ vs centroid ↑ | "
        "Pearson Δ vs centroid, top-20 DE ↑ | centroid accuracy ↑ | PerturbX wins (wMSE) |"
    )
    print("|---|---|---|---|---|---|---|")
    for prefix in args.prefixes:
        print("\n".join(rows(prefix)))


if __name__ == "__main__":
    main()
