"""Featurisation rate of ``perturbx.chem.MorganFeaturizer``.

Usage::

    python benchmarks/bench_featurise.py                                  # LINCS SMILES table
    python benchmarks/bench_featurise.py /path/to/lincs_drugs_smiles.csv --n-distinct 10000
    python benchmarks/bench_featurise.py --json out.json

Two cases:

* **distinct** — ``--n-distinct`` different SMILES from the LINCS table (no header: BRD id,
  SMILES), each parsed, canonicalised and fingerprinted once (fresh featuriser, cold cache).
  Entries RDKit cannot parse are skipped and counted. Target: 10,000 SMILES in under 5 s.
* **repeated** — ``--n-strings`` strings drawn from ``--n-repeated-distinct`` molecules (a
  screen with many cells and few drugs): ``featurize_unique`` (deduplicate, then fingerprint
  each molecule once) and the full broadcast ``(n, n_bits)`` matrix at a small ``n_bits`` so
  it fits in memory. Both should be dominated by deduplication, not by RDKit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase

from perturbx.chem import MorganFeaturizer

DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs_drugs_smiles.csv"


def load_valid_smiles(path: Path) -> tuple[list[str], int]:
    """Distinct SMILES of the table that RDKit parses, and the number skipped as invalid."""
    table = pd.read_csv(path, header=None, names=["id", "smiles"], skipinitialspace=True)
    candidates = table["smiles"].dropna().astype(str).str.strip().drop_duplicates().tolist()
    valid = []
    with rdBase.BlockLogs():
        for smiles in candidates:
            if smiles and Chem.MolFromSmiles(smiles) is not None:
                valid.append(smiles)
    return valid, len(candidates) - len(valid)


def time_call(function, *args) -> tuple[float, float, object]:
    """Wall-clock and process CPU seconds of one call (CPU time is robust to a busy machine)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--n-distinct", type=int, default=10_000)
    parser.add_argument("--n-strings", type=int, default=1_000_000)
    parser.add_argument("--n-repeated-distinct", type=int, default=200)
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--n-bits", type=int, default=2048)
    parser.add_argument("--broadcast-n-bits", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    valid, n_invalid = load_valid_smiles(args.table)
    print(f"{args.table}: {len(valid) + n_invalid} distinct SMILES, {n_invalid} unparsable skipped")
    if len(valid) < args.n_distinct:
        parser.error(f"only {len(valid)} valid distinct SMILES, fewer than --n-distinct")
    rng = np.random.default_rng(args.seed)
    distinct = [valid[i] for i in rng.choice(len(valid), args.n_distinct, replace=False)]

    rows = []
    for counts in (False, True):
        featurize = MorganFeaturizer(radius=args.radius, n_bits=args.n_bits, counts=counts)
        seconds, cpu, matrix = time_call(featurize, distinct)
        assert matrix.shape == (args.n_distinct, args.n_bits)
        warm, warm_cpu, _ = time_call(featurize, distinct)  # every molecule cached now
        kind = "counts" if counts else "bits"
        rows.append((f"{args.n_distinct:,} distinct ({kind}), cold", args.n_distinct, seconds, cpu))
        rows.append(
            (f"{args.n_distinct:,} distinct ({kind}), cached", args.n_distinct, warm, warm_cpu)
        )

    library = distinct[: args.n_repeated_distinct]
    strings = [library[i] for i in rng.integers(0, len(library), args.n_strings)]
    label = f"{args.n_strings:,} strings / {len(library)} distinct"
    featurize = MorganFeaturizer(radius=args.radius, n_bits=args.n_bits)
    seconds, cpu, (unique_rows, codes) = time_call(featurize.featurize_unique, strings)
    assert unique_rows.shape[0] == len(library) and codes.shape == (args.n_strings,)
    rows.append((f"{label}, featurize_unique ({args.n_bits} bits)", args.n_strings, seconds, cpu))
    seconds, cpu, _ = time_call(pd.factorize, np.asarray(strings, dtype=object))
    rows.append((f"{label}, pandas.factorize alone", args.n_strings, seconds, cpu))
    small = MorganFeaturizer(radius=args.radius, n_bits=args.broadcast_n_bits)
    seconds, cpu, matrix = time_call(small, strings)
    assert matrix.shape == (args.n_strings, args.broadcast_n_bits)
    bits = args.broadcast_n_bits
    rows.append((f"{label}, full matrix ({bits} bits)", args.n_strings, seconds, cpu))

    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'wall s':>8}  {'CPU s':>8}  {'SMILES/s (wall)':>16}")
    for name, n, seconds, cpu in rows:
        print(f"{name:<{width}}  {seconds:8.3f}  {cpu:8.3f}  {n / seconds:16,.0f}")
    if args.json is not None:
        records = [
            {"case": c, "n": n, "wall_seconds": s, "cpu_seconds": cpu, "smiles_per_s": n / s}
            for c, n, s, cpu in rows
        ]
        payload = {"table": str(args.table), "n_invalid_skipped": n_invalid, "results": records}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
