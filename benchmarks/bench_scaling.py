"""How training and prediction cost grow with cells and genes; peak memory up to 1M cells.

Usage::

    python benchmarks/bench_scaling.py                        # 10k, 100k, 1M cells x 2,000 genes
    python benchmarks/bench_scaling.py --cells 10000 100000 --genes 1000 2000 4000 --json s.json

Each size runs in its own process (so that its peak RSS is its own) on sparse CSR Poisson
counts built in chunks (:func:`bench_scale.screen`; never dense as a whole), with CPA's
default architecture (latent 128, encoder/decoder 3 × 256, adversaries 3 × 64), batch 128 and
an NB likelihood. Reported per size:

- ``train_cells_per_s``: training cells per second of ``Trainer.fit`` over ``--epochs``
  epochs (for the largest sizes, one epoch is ~8,000 minibatches: warm-up is negligible);
- ``gflops``: the dense layers' achieved rate (see :func:`bench_training.model_flops_per_cell`)
  against ``matmul_gflops``, this machine's dense float32 matmul rate measured here;
- ``peak_rss_gib``: the process's peak RSS (data included), and ``train_added_gib``: the
  peak during training minus the RSS before it (what training added on top of the data);
  with glibc's default malloc, which keeps freed blocks, so these overstate memory in use
  (``--fixed-mmap-threshold`` measures it exactly but slows training);
- ``predict_cells_per_s``: ``model.predict`` of one target from up to 100,000 control cells
  (expected counts, batch 1,024);
- ``seconds_per_million_cells``: training time normalised by cells, which stays flat if the
  cost is linear in cells; the fitted exponent of time vs cells is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_training import CPA_ARCHITECTURE

HERE = Path(__file__).resolve().parent


def child(
    n_cells: int,
    n_genes: int,
    epochs: int,
    batch_size: int,
    threads: int,
    fixed_mmap_threshold: bool,
) -> dict:
    """One size, in this process: build, set up, train, predict; returns the figures."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_scale import _status_kib, fix_mmap_threshold, reset_peak, screen
    from bench_training import EpochTimer, model_flops_per_cell

    from perturbx import PerturbX

    torch.set_num_threads(threads)
    if fixed_mmap_threshold:
        fix_mmap_threshold()
    adata = screen(n_cells, n_genes)
    PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    model = PerturbX(adata, **CPA_ARCHITECTURE)
    before = _status_kib("VmRSS") / 2**20
    reset_peak()
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        check_val_every_n_epoch=None,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        seed=0,
    )
    train_peak = _status_kib("VmHWM") / 2**20
    cells_per_s = n_cells * epochs / sum(timer.times)

    controls = np.flatnonzero(adata.obs["drug"].to_numpy() == "control")[:100_000]
    start = time.perf_counter()
    model.predict(adata[controls], target={"drug": "aspirin", "dose": 1.0}, batch_size=1024)
    predict_seconds = time.perf_counter() - start
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "epochs": epochs,
        "train_seconds": round(sum(timer.times), 1),
        "train_cells_per_s": round(cells_per_s),
        "seconds_per_million_cells": round(1e6 / cells_per_s, 1),
        "gflops": round(model_flops_per_cell(model.module, 3) * cells_per_s / 1e9, 1),
        "rss_before_train_gib": round(before, 2),
        "train_added_gib": round(train_peak - before, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "predict_cells_per_s": round(len(controls) / predict_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--genes", type=int, nargs="+", default=[2_000])
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: enough for >= 200,000 cells, at least 1"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="glibc mmap threshold fixed at 64 KiB (RSS then reflects memory in use, but every "
        "minibatch tensor is a fresh mmap: training runs slower; see bench_scale.py)",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n_cells, n_genes, epochs = args.child
        print(
            json.dumps(
                child(
                    n_cells,
                    n_genes,
                    epochs,
                    args.batch_size,
                    args.threads,
                    args.fixed_mmap_threshold,
                )
            )
        )
        return

    import torch

    sys.path.insert(0, str(HERE))
    from bench_training import matmul_gflops

    torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), dense matmul {peak:.0f} GFLOP/s",
        flush=True,
    )
    rows = []
    sizes = [(c, g) for g in args.genes for c in args.cells]
    for n_cells, n_genes in sizes:
        epochs = args.epochs or max(1, 200_000 // n_cells)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n_cells),
                str(n_genes),
                str(epochs),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                *(["--fixed-mmap-threshold"] if args.fixed_mmap_threshold else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{n_cells} x {n_genes} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["fraction_of_matmul"] = round(row["gflops"] / peak, 3)
        rows.append(row)
        print(row, flush=True)

    columns = [
        "n_cells",
        "n_genes",
        "epochs",
        "train_cells_per_s",
        "seconds_per_million_cells",
        "gflops",
        "fraction_of_matmul",
        "rss_before_train_gib",
        "train_added_gib",
        "peak_rss_gib",
        "predict_cells_per_s",
    ]
    print("\n" + " | ".join(columns))
    for r in rows:
        print(" | ".join(str(r[c]) for c in columns))
    for n_genes in args.genes:
        part = [r for r in rows if r["n_genes"] == n_genes]
        if len(part) >= 2:
            cells = np.log([r["n_cells"] * r["epochs"] for r in part])
            seconds = np.log([r["train_seconds"] for r in part])
            print(f"{n_genes} genes: training time ∝ cells^{np.polyfit(cells, seconds, 1)[0]:.2f}")
    for n_cells in args.cells:
        part = [r for r in rows if r["n_cells"] == n_cells]
        if len(part) >= 2:
            genes = np.log([r["n_genes"] for r in part])
            per_cell = np.log([r["seconds_per_million_cells"] for r in part])
            print(f"{n_cells} cells: time per cell ∝ genes^{np.polyfit(genes, per_cell, 1)[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": peak, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
