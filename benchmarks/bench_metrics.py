"""Benchmark: scoring precomputed pseudobulk means with perturbx.metrics.score_means.

Target: 1,000 conditions x 5,000 genes (all metrics, incl. centroid accuracy over all
pairs of conditions) in under 10 s on a 2-core machine.

    PYTHONPATH=src python benchmarks/bench_metrics.py [--n-conditions 1000] [--n-genes 5000]
        [--n-groups 1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from perturbx.metrics import metric_info, score_means
from perturbx.metrics._calibration import calibrate


def make_means(n_conditions: int, n_genes: int, n_groups: int, seed: int = 0):
    """Random log-normalised means with a shared response and condition-specific effects."""
    rng = np.random.default_rng(seed)
    control = rng.gamma(2.0, 1.0, n_genes)
    shared = rng.normal(0, 0.5, n_genes)
    true = control + shared + rng.normal(0, 0.5, (n_conditions, n_genes))
    pred = true + rng.normal(0, 0.3, (n_conditions, n_genes))
    positive = true + rng.normal(0, 0.1, (n_conditions, n_genes))
    centroid = control + shared
    de_scores = (true - control) * 10 + rng.normal(0, 1, (n_conditions, n_genes))
    groups = rng.integers(0, n_groups, n_conditions)
    return pred, positive, true, control, centroid, de_scores, groups


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-conditions", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=5000)
    parser.add_argument(
        "--n-groups",
        type=int,
        default=1,
        help="covariate groups (centroid accuracy is computed within groups)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    pred, positive, true, control, centroid, de, groups = make_means(
        args.n_conditions, args.n_genes, args.n_groups
    )
    info = metric_info()
    timings: dict[str, list[float]] = {"model": [], "3 methods + calibration": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        score_means(pred, true, control, centroid, de, groups=groups)
        timings["model"].append(time.perf_counter() - start)

        start = time.perf_counter()
        tables = {
            name: score_means(p, true, control, centroid, de, groups=groups)
            for name, p in (
                ("model", pred),
                ("neg", np.broadcast_to(centroid, true.shape)),
                ("pos", positive),
            )
        }
        values = pd.concat([t[list(info.index)] for t in tables.values()], ignore_index=True)
        methods = pd.Series(np.repeat(list(tables), args.n_conditions))
        conditions = pd.Series(np.tile(np.arange(args.n_conditions).astype(str), len(tables)))
        calibrate(values, methods, conditions, info, negative="neg", positive="pos")
        timings["3 methods + calibration"].append(time.perf_counter() - start)

    print(
        f"score_means: {args.n_conditions} conditions x {args.n_genes} genes, "
        f"{args.n_groups} covariate group(s), {len(info)} metrics, {args.repeats} repeats"
    )
    print(f"{'step':<26}{'best (s)':>10}{'median (s)':>12}")
    figures = {}
    for step, values in timings.items():
        figures[step] = {"best_s": min(values), "median_s": float(np.median(values))}
        print(f"{step:<26}{min(values):>10.2f}{np.median(values):>12.2f}")
    verdict = "PASS" if figures["model"]["best_s"] < 10 else "FAIL"
    print(f"target: model scoring < 10 s -> {verdict}")
    result = {
        "n_conditions": args.n_conditions,
        "n_genes": args.n_genes,
        "n_groups": args.n_groups,
        "timings": figures,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
