"""Out-of-core training: peak memory and cells/s, backed h5ad vs in memory.

Usage::

    python benchmarks/bench_out_of_core.py                         # 200k cells x 2,000 genes
    python benchmarks/bench_out_of_core.py --n-cells 1000000 --json ooc.json

A sparse NB-count screen is written chunk by chunk to an h5ad file (no dense matrix is ever
built; each chunk is a random row permutation of one block of NB draws). Each mode then
trains PerturbX in its own subprocess, so that every peak RSS (``VmHWM``) is that run's
own:

- ``backed``: ``anndata.read_h5ad(path, backed="r")``; minibatches are read from the file;
- ``memory``: ``anndata.read_h5ad(path)``; the CSR matrix is loaded into memory.

Reported per mode: peak RSS of the process, its growth from after the imports, throughput
of training (cells/s over the timed minibatches of one epoch; the first minibatches are a
warm-up) and, for reference, raw random-minibatch read throughput (``X[sorted random
cells]`` densified, as scvi-tools' data loader does). Then ``evaluate`` scores 2,000
held-out cells (in memory) against the model, whose training cells, read from its AnnData,
form the perturbed centroid: its time and how far its own peak RSS rose above the RSS
before it are reported. Dense float32 size and CSR size of the matrix are printed for
comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_training import CPA_ARCHITECTURE

WRITE_CHUNK = 10_000
WARMUP_BATCHES = 20
EVAL_CELLS = 2_000  # held-out cells (in memory) given to evaluate


def write_screen(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> int:
    """Write a sparse NB-count screen to ``path`` chunk by chunk; return its CSR bytes."""
    import pandas as pd

    from perturbx.data import write_counts_h5ad

    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "drug": rng.choice(["control", "drug_a", "drug_b", "drug_c"], n_cells),
            "dose": rng.choice(["0.1", "1.0", "10.0"], n_cells),
            "cell_type": rng.choice(["A549", "K562", "MCF7"], n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return write_counts_h5ad(path, obs, n_genes, seed=seed, chunk_size=WRITE_CHUNK)


def _peak_rss_gib(field: str = "VmHWM") -> float:
    """Peak RSS of this process: ``VmHWM`` on Linux, else ``ru_maxrss`` (``field="VmRSS"``:
    the current RSS, Linux only).

    A subprocess's ``ru_maxrss`` starts at its parent's RSS at the fork on Linux; ``VmHWM``
    belongs to the process's own memory map.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def read_throughput(matrix, n_cells: int, batch_size: int, seconds: float = 3.0) -> float:
    """Cells/s of reading random sorted minibatches of ``matrix`` as dense arrays."""
    rng = np.random.default_rng(0)
    start, n_read = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        cells = np.sort(rng.choice(n_cells, batch_size, replace=False))
        matrix[cells].toarray()
        n_read += batch_size
    return n_read / (time.perf_counter() - start)


def run_mode(path: str, mode: str, batch_size: int, arch: dict, threads: int) -> dict:
    """One training run (in this process): ``mode`` is ``"backed"`` or ``"memory"``."""
    import logging
    import warnings

    import anndata as ad
    import torch
    from bench_scale import reset_peak
    from lightning.pytorch.callbacks import Callback

    from perturbx import PerturbX

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)

    class BatchTimer(Callback):
        """Time from the start of minibatch WARMUP_BATCHES to the end of the last one."""

        def __init__(self):
            self.start = self.end = None
            self.n_timed = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == WARMUP_BATCHES:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= WARMUP_BATCHES:
                self.end = time.perf_counter()
                self.n_timed += len(batch["X"])

    baseline = _peak_rss_gib()
    adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
    PerturbX.setup_anndata(
        adata, perturbation_key="drug", dose_key="dose", covariate_keys=["cell_type"]
    )
    model = PerturbX(adata, **arch)
    after_setup = _peak_rss_gib()
    timer = BatchTimer()
    model.train(
        max_epochs=1,
        batch_size=batch_size,
        train_size=1.0,
        check_val_every_n_epoch=None,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_checkpointing=False,
        seed=0,
    )
    after_training = _peak_rss_gib()
    train_cells_per_s = timer.n_timed / (timer.end - timer.start)
    latent_start = time.perf_counter()
    model.get_latent_representation(batch_size=1024)
    latent_cells_per_s = adata.n_obs / (time.perf_counter() - latent_start)
    # Held-out cells in memory; the centroid (every training cell) is read from the model's
    # AnnData a block at a time.
    held_out = adata[
        np.sort(np.random.default_rng(1).choice(adata.n_obs, EVAL_CELLS, replace=False))
    ].to_memory()
    reset_peak()  # evaluate's own peak, not the latent stage's
    before_evaluate = _peak_rss_gib("VmRSS")
    evaluate_start = time.perf_counter()
    result = model.evaluate(held_out, n_cells_per_target=200, baselines=("control_mean",))
    evaluate_seconds = time.perf_counter() - evaluate_start
    evaluate_growth = _peak_rss_gib() - before_evaluate
    return {
        "mode": mode,
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "batch_size": batch_size,
        "train_cells_per_s": round(train_cells_per_s),
        "latent_cells_per_s": round(latent_cells_per_s),
        "read_cells_per_s": round(read_throughput(adata.X, adata.n_obs, batch_size)),
        "baseline_rss_gib": round(baseline, 3),
        "peak_rss_setup_gib": round(after_setup, 3),
        "peak_rss_gib": round(after_training, 3),
        "peak_rss_growth_gib": round(after_training - baseline, 3),
        "evaluate_conditions": int(result.per_condition["condition"].nunique()),
        "evaluate_seconds": round(evaluate_seconds, 1),
        "evaluate_peak_rss_growth_gib": round(evaluate_growth, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n-cells", type=int, default=200_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--modes", nargs="+", default=["backed", "memory"], choices=["backed", "memory"]
    )
    parser.add_argument(
        "--small-arch",
        action="store_true",
        help="latent 16, 1 x 64 layers (I/O-bound) instead of CPA's default",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--file", default=None, help="existing h5ad written by this script (else a temporary one)"
    )
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    parser.add_argument("--_child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    arch = (
        dict(n_latent=16, n_hidden=64, n_layers=1, adversary_hidden=16)
        if args.small_arch
        else CPA_ARCHITECTURE
    )
    if args._child:
        result = run_mode(*args._child, args.batch_size, arch, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="perturbx_ooc_") as folder:
        path = Path(args.file) if args.file else Path(folder) / "screen.h5ad"
        if not path.exists():
            start = time.perf_counter()
            write_screen(path, args.n_cells, args.n_genes)
            print(f"wrote {path} in {time.perf_counter() - start:.1f} s", flush=True)
        import h5py

        with h5py.File(path, "r") as store:
            n_cells, n_genes = (int(v) for v in store["X"].attrs["shape"])
            csr_gib = sum(store["X"][k].nbytes for k in ("data", "indices", "indptr")) / 2**30
        dense_gib = n_cells * n_genes * 4 / 2**30
        print(
            f"{n_cells} cells x {n_genes} genes: dense float32 {dense_gib:.2f} GiB, "
            f"CSR {csr_gib:.2f} GiB, file {path.stat().st_size / 2**30:.2f} GiB",
            flush=True,
        )
        rows = []
        for mode in args.modes:
            command = [
                sys.executable,
                __file__,
                "--_child",
                str(path),
                mode,
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
            ]
            if args.small_arch:
                command.append("--small-arch")
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            line = next(ln for ln in output.splitlines() if ln.startswith("RESULT "))
            rows.append(json.loads(line.removeprefix("RESULT ")))
            print(rows[-1], flush=True)

    print(
        f"\n{'mode':>7} {'train cells/s':>13} {'latent cells/s':>14} {'read cells/s':>12} "
        f"{'peak RSS GiB':>12} {'growth GiB':>10} {'evaluate s':>10} {'eval growth GiB':>15}"
    )
    for r in rows:
        print(
            f"{r['mode']:>7} {r['train_cells_per_s']:>13} {r['latent_cells_per_s']:>14} "
            f"{r['read_cells_per_s']:>12} {r['peak_rss_gib']:>12} "
            f"{r['peak_rss_growth_gib']:>10} {r['evaluate_seconds']:>10} "
            f"{r['evaluate_peak_rss_growth_gib']:>15}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"dense_gib": dense_gib, "csr_gib": csr_gib, "architecture": arch, "runs": rows},
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
