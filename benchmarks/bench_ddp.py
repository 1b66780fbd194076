"""Data-parallel (DDP) training throughput on CPU processes: 1 process vs N processes.

Usage::

    python benchmarks/bench_ddp.py                                   # 20k cells x 2000 genes
    python benchmarks/bench_ddp.py --n-cells 2000 --n-genes 200 --epochs 2 --json out.json

Each configuration runs in a fresh ``python`` process (Lightning's ``"ddp"`` strategy re-runs
that script once per extra process) with one torch thread per process. All configurations
train on the same simulated NB screen with the same *total* batch (``--batch-size`` split
evenly over the processes), so they take the same number of optimiser steps per epoch.
Throughput is training cells per second of the timed epochs (the first epoch is a warm-up);
an epoch is timed from its start to the end of its last training batch (5% of the cells
are held out for validation, which runs after that and is not timed).
``--per-process-batch`` adds rows in which every process keeps the full ``--batch-size``
(the effective batch grows with the number of processes). The load average before each run
is printed: figures taken on a busy machine are not the machine's capability.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """Train once (in every DDP process); global rank 0 writes the timings to ``--out``."""
    import torch

    torch.set_num_threads(args.threads)
    import scvi
    from lightning.pytorch.callbacks import Callback

    from perturbx import PerturbX
    from perturbx.data import simulate_drug_screen

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == trainer.num_training_batches - 1:
                self.seconds.append(time.perf_counter() - self._start)

    scvi.settings.seed = 0
    adata = simulate_drug_screen(
        n_cells=args.n_cells, n_genes=args.n_genes, n_drugs=args.n_drugs, seed=0
    )
    PerturbX.setup_anndata(
        adata, "drug", dose_key="dose", smiles_key="smiles", covariate_keys=["cell_type"]
    )
    model = PerturbX(adata)
    timer = EpochTimer()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.worker_batch,
        train_size=0.95,  # validation runs after the timed part of each epoch
        seed=0,
        accelerator="cpu",
        devices=args.worker_processes,
        strategy="ddp" if args.worker_processes > 1 else "auto",
        enable_progress_bar=False,
        callbacks=[timer],
    )
    if model.trainer.global_rank != 0:
        return
    Path(args.out).write_text(
        json.dumps(
            {
                "epoch_seconds": timer.seconds,
                "batches_per_epoch": model.trainer.num_training_batches,
                "n_train": len(model.train_indices),
            }
        )
    )


def run_configuration(args: argparse.Namespace, processes: int, batch: int) -> dict:
    """Run one configuration in a fresh process and return its measurements."""
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--worker-processes", str(processes),
            "--worker-batch", str(batch),
            "--out", str(out),
            "--n-cells", str(args.n_cells),
            "--n-genes", str(args.n_genes),
            "--n-drugs", str(args.n_drugs),
            "--epochs", str(args.epochs),
            "--threads", str(args.threads),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env["MKL_NUM_THREADS"] = str(args.threads)
        load = os.getloadavg()[0]
        # cwd: scvi writes lightning_logs/ to the working directory under DDP.
        done = subprocess.run(command, env=env, cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{processes} process(es), batch {batch} failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    timed = result["epoch_seconds"][1:] or result["epoch_seconds"]
    seconds = statistics.median(timed)
    return {
        "processes": processes,
        "batch_per_process": batch,
        "total_batch": batch * processes,
        "batches_per_epoch": result["batches_per_epoch"],
        "epoch_seconds": result["epoch_seconds"],
        "median_epoch_seconds": seconds,
        "cells_per_second": result["n_train"] / seconds,
        "load_average_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-drugs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256, help="total batch")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="the first is not timed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--per-process-batch", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    configurations = []
    for processes in args.processes:
        if args.batch_size % processes:
            parser.error(f"--batch-size {args.batch_size} is not divisible by {processes}")
        configurations.append((processes, args.batch_size // processes))
        if args.per_process_batch and processes > 1:
            configurations.append((processes, args.batch_size))
    rows = []
    for processes, batch in configurations:
        rows.append(run_configuration(args, processes, batch))
        print(f"done: {processes} process(es), batch {batch} per process", file=sys.stderr)

    baseline = next(
        (r for r in rows if r["processes"] == 1 and r["total_batch"] == args.batch_size), None
    )
    print(
        f"{args.n_cells} cells x {args.n_genes} genes, {args.n_drugs} drugs, "
        f"{args.threads} thread(s) per process, {args.epochs} epochs (first not timed), "
        f"{os.cpu_count()} CPUs"
    )
    header = (
        f"{'processes':>9} {'batch/proc':>10} {'total':>6} {'steps/ep':>8} {'epoch s':>8} "
        f"{'cells/s':>9} {'speed-up':>8} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        speed_up = row["cells_per_second"] / baseline["cells_per_second"] if baseline else math.nan
        row["speed_up"] = speed_up
        print(
            f"{row['processes']:>9} {row['batch_per_process']:>10} {row['total_batch']:>6} "
            f"{row['batches_per_epoch']:>8} {row['median_epoch_seconds']:>8.2f} "
            f"{row['cells_per_second']:>9.0f} {speed_up:>8.2f} "
            f"{row['load_average_before']:>5.1f}"
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith(("worker", "out"))}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
