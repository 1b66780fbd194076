"""Training throughput (cells/s), peak RSS and achieved GFLOP/s of PerturbX.

Usage::

    python benchmarks/bench_training.py                      # CPA default architecture, batch 128
    python benchmarks/bench_training.py --batch-sizes 128 256 512 1024 --json out.json
    python benchmarks/bench_training.py --repeats 5       # median and range of 5 runs
    python benchmarks/bench_training.py --precision bf16-mixed   # bfloat16 autocast
    python benchmarks/bench_training.py --n-drugs 2000    # a large compound library

Throughput on a shared VM varies by up to ±20% from run to run (this VM has spells of a
~30% slower state: ``docs/notes/benchmark_notes.md``, "The VM has two speeds"), so compare
medians of several runs (``--repeats``), not single runs. Peak RSS is the process's maximum
so far, so with ``--repeats`` it covers all runs (models of earlier runs are not all
returned to the OS).

The data is a simulated NB drug screen (``perturbx.data.simulate_drug_screen``), stored as a
sparse CSR matrix, with the simulator's first 20 built-in drugs unless ``--n-drugs`` asks for
more: then the first ``--n-drugs`` valid structures of the LINCS SMILES table
(``lincs_drugs_smiles.csv`` via ``perturbx.datasets.fetch_file``: ``PERTURBX_DATA_DIR`` or a
download), to show how a step's cost grows with the compound library. Throughput counts
training cells processed per second of ``Trainer.fit`` over the timed epochs (the first epoch
is a warm-up and not timed). GFLOP/s is estimated from the dense layers' multiply-adds
(forward + backward ≈ 3× forward) and compared with the
machine's dense float32 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul rate of this machine (GFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def model_flops_per_cell(module: torch.nn.Module, adversary_every: int) -> float:
    """Average training FLOPs per cell (dense layers only).

    Autoencoder steps run the encoder, decoder and adversaries forward and backward
    (≈ 3× the forward multiply-adds); one in ``adversary_every`` batches is an adversary step:
    encoder forward only, adversaries forward + backward + the gradient penalty's double
    backward (≈ 5×). Drug encoders run once per distinct drug in a batch and are left out.
    """
    encoder = decoder = adversary = 0
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        macs = layer.in_features * layer.out_features
        if "adversar" in name:
            adversary += macs
        elif name.startswith("encoder"):
            encoder += macs
        elif name.startswith(("decoder", "scale_head", "mean_head", "dropout_head")):
            decoder += macs
    autoencoder_step = 3 * (encoder + decoder + adversary)
    adversary_step = encoder + 5 * adversary
    k = adversary_every
    return 2 * ((k - 1) * autoencoder_step + adversary_step) / k


class EpochTimer(Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


#: CPA's default architecture (cpa-tools 0.8.8): the set-up of the throughput target.
CPA_ARCHITECTURE = dict(
    n_latent=128, n_hidden=256, n_layers=3, adversary_hidden=64, adversary_layers=3
)

#: Drugs of the default screen (the simulator's built-in library); more come from LINCS.
DEFAULT_N_DRUGS = 20


def compound_library(n_drugs: int) -> pd.DataFrame:
    """The first ``n_drugs`` LINCS compounds whose SMILES RDKit parses (name, smiles)."""
    from rdkit import Chem, rdBase

    from perturbx.datasets import fetch_file

    table = pd.read_csv(
        fetch_file("lincs_drugs_smiles.csv"),
        header=None,
        names=["name", "smiles"],
        dtype=str,
        skipinitialspace=True,
    ).dropna()
    with rdBase.BlockLogs():
        valid = table[[Chem.MolFromSmiles(s) is not None for s in table["smiles"]]]
    valid = valid.drop_duplicates("smiles")
    if len(valid) < n_drugs:
        raise ValueError(f"--n-drugs {n_drugs}: the LINCS table has {len(valid)} valid SMILES.")
    return valid.iloc[:n_drugs].reset_index(drop=True)


def run(
    n_cells: int,
    n_genes: int,
    batch_size: int,
    epochs: int,
    arch: dict,
    seed: int = 0,
    precision: str = "32",
    n_drugs: int = DEFAULT_N_DRUGS,
):
    import perturbx

    smiles = compound_library(n_drugs) if n_drugs > DEFAULT_N_DRUGS else None
    adata = perturbx.data.simulate_drug_screen(
        n_cells=n_cells, n_genes=n_genes, n_drugs=n_drugs, smiles=smiles, seed=seed
    )
    perturbx.PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    model = perturbx.PerturbX(adata, **arch)
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        check_val_every_n_epoch=None,
        callbacks=[timer],
        enable_progress_bar=False,
        seed=seed,
        precision=precision,
    )
    timed = timer.times[1:] if len(timer.times) > 1 else timer.times
    cells_per_s = n_cells * len(timed) / sum(timed)
    flops = model_flops_per_cell(model.module, adversary_every=3) * cells_per_s / 1e9
    return cells_per_s, flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--n-drugs",
        type=int,
        default=DEFAULT_N_DRUGS,
        help=f"compound library size (above {DEFAULT_N_DRUGS}: LINCS structures)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="train this many times per batch size; report median and range",
    )
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help="JSON merged into the architecture, e.g. '{\"variational\": false}'",
    )
    parser.add_argument(
        "--precision",
        default="32",
        help='Lightning precision, e.g. "bf16-mixed" (bfloat16 matmuls under autocast)',
    )
    args = parser.parse_args()

    arch = {**CPA_ARCHITECTURE, **args.model_kwargs}
    peak_matmul = matmul_gflops()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"dense matmul {peak_matmul:.0f} GFLOP/s"
    )
    rows = []
    for batch_size in args.batch_sizes:
        runs = [
            run(
                args.n_cells,
                args.n_genes,
                batch_size,
                args.epochs,
                arch,
                precision=args.precision,
                n_drugs=args.n_drugs,
            )
            for _ in range(args.repeats)
        ]
        speeds = [cells_per_s for cells_per_s, _ in runs]
        median = float(np.median(speeds))
        gflops = float(np.median([g for _, g in runs]))
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(
            {
                "n_cells": args.n_cells,
                "n_genes": args.n_genes,
                "n_drugs": args.n_drugs,
                "batch_size": batch_size,
                "precision": args.precision,
                "cells_per_s": round(median),
                "cells_per_s_runs": [round(v) for v in speeds],
                "gflops": round(gflops, 1),
                "fraction_of_matmul": round(gflops / peak_matmul, 3),
                "peak_rss_gib": round(rss_gib, 2),
            }
        )
        print(rows[-1], flush=True)
    print(
        f"\n{'batch':>6} {'cells/s':>9} {'range':>13} {'GFLOP/s':>8} {'of matmul':>9} "
        f"{'peak RSS GiB':>12}"
    )
    for r in rows:
        spread = f"{min(r['cells_per_s_runs'])}-{max(r['cells_per_s_runs'])}"
        print(
            f"{r['batch_size']:>6} {r['cells_per_s']:>9} {spread:>13} {r['gflops']:>8} "
            f"{r['fraction_of_matmul']:>9.1%} {r['peak_rss_gib']:>12}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"matmul_gflops": peak_matmul, "architecture": arch, "runs": rows}, fh, indent=2
            )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
