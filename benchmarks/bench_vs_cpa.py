"""Training speed of PerturbX against cpa-tools 0.8.8, side by side, in one run.

Usage::

    python benchmarks/bench_vs_cpa.py --build                 # builds the cpa-tools venv first
    python benchmarks/bench_vs_cpa.py --batch-sizes 128 1024 --rounds 3 --json vs_cpa.json

One simulated NB screen (``--n-cells`` x ``--n-genes``, 90% training cells) is written to an
h5ad; then, round after round and batch size after batch size, a fresh process of cpa-tools
(``../shared/peers/cpa-tools/train_speed.py`` in the venv of its ``setup_venv.sh``, CPA's
defaults) and a fresh process of PerturbX (CPA's architecture: latent 128, 3 x 256,
adversaries 3 x 64) train on that same file, alternating. Each reports training cells per
second (training cells / mean epoch time, first epoch excluded). Printed: each tool's median
and range over rounds, and the ratio PerturbX / cpa-tools of the medians with the range of
the per-round ratios. Only a ratio measured this way counts: this VM's speed drifts by tens
of percent between runs. Not part of the test suite (it needs the second environment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers" / "cpa-tools"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--cpa-venv", default="/tmp/venv-cpa-tools", help="virtual environment with cpa-tools 0.8.8"
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="build --cpa-venv with the peers' setup_venv.sh if it is missing",
    )
    parser.add_argument("--peers", default=str(PEERS), help="folder of setup_venv.sh")
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the runs and the table here")
    parser.add_argument("--run-perturbx", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1 or min(args.batch_sizes) < 1:
        parser.error("--rounds, --epochs and --batch-sizes must be positive.")
    return args


def write_screen(path: Path, n_cells: int, n_genes: int) -> None:
    """The simulated screen both tools train on (90% 'train', 10% 'validation' cells)."""
    import numpy as np

    import perturbx

    adata = perturbx.data.simulate_drug_screen(n_cells=n_cells, n_genes=n_genes, seed=0)
    rng = np.random.default_rng(0)
    adata.obs["split"] = np.where(rng.random(adata.n_obs) < 0.9, "train", "validation")
    adata.obs["dose"] = adata.obs["dose"].astype(float)
    adata.write_h5ad(path)


def perturbx_speed(path: str, batch_size: int, epochs: int, threads: int) -> dict:
    """Train PerturbX (CPA's architecture) on the file; the JSON record of cpa's script."""
    import time

    import anndata as ad
    import numpy as np
    import torch
    from lightning.pytorch.callbacks import Callback

    import perturbx

    torch.set_num_threads(threads)

    class EpochTimer(Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._start)

    adata = ad.read_h5ad(path)
    perturbx.PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    model = perturbx.PerturbX(
        adata, n_latent=128, n_hidden=256, n_layers=3, adversary_hidden=64, adversary_layers=3
    )
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        split_key="split",
        check_val_every_n_epoch=None,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        seed=0,
    )
    n_train = int((adata.obs["split"] == "train").sum())
    timed = np.array(timer.times[1:] if len(timer.times) > 1 else timer.times)
    return {
        "tool": f"perturbx {perturbx.__version__}",
        "n_train_cells": n_train,
        "batch_size": batch_size,
        "threads": threads,
        "epoch_seconds": [round(t, 3) for t in timer.times],
        "cells_per_s": round(n_train / timed.mean(), 1),
    }


def _last_json_line(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in the output:\n{output[-2000:]}")


def run_cpa(
    venv: Path, peers: Path, data: Path, batch_size: int, epochs: int, threads: int
) -> dict:
    command = [
        str(venv / "bin" / "python"),
        str(peers / "train_speed.py"),
        str(data),
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--threads",
        str(threads),
    ]
    # cpa-tools writes a model.pt into its working directory: keep it out of the checkout.
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=data.parent)
    return _last_json_line(done.stdout)


def run_perturbx(data: Path, batch_size: int, epochs: int, threads: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--run-perturbx",
        str(data),
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return _last_json_line(done.stdout)


def table(runs: list[dict]) -> list[dict]:
    """Per batch size: each tool's median and range, the ratio of medians and its range.

    ``runs``: records with ``tool`` ("cpa" or "perturbx"), ``round``, ``batch_size`` and
    ``cells_per_s``; the per-round ratio pairs the two tools' runs of the same round.
    """
    rows = []
    for batch_size in sorted({r["batch_size"] for r in runs}):
        of = {
            tool: {
                r["round"]: r["cells_per_s"]
                for r in runs
                if r["tool"] == tool and r["batch_size"] == batch_size
            }
            for tool in ("cpa", "perturbx")
        }
        rounds = sorted(set(of["cpa"]) & set(of["perturbx"]))
        if not rounds:
            continue
        ratios = [of["perturbx"][k] / of["cpa"][k] for k in rounds]
        cpa = [of["cpa"][k] for k in rounds]
        ours = [of["perturbx"][k] for k in rounds]
        rows.append(
            {
                "batch_size": batch_size,
                "rounds": len(rounds),
                "cpa_median": statistics.median(cpa),
                "cpa_range": (min(cpa), max(cpa)),
                "perturbx_median": statistics.median(ours),
                "perturbx_range": (min(ours), max(ours)),
                "ratio_of_medians": statistics.median(ours) / statistics.median(cpa),
                "ratio_range": (min(ratios), max(ratios)),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batch | rounds | cpa-tools cells/s (range) | PerturbX cells/s (range) | "
        "ratio of medians (per-round range) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['rounds']} | {r['cpa_median']:,.0f} "
            f"({r['cpa_range'][0]:,.0f}–{r['cpa_range'][1]:,.0f}) | "
            f"{r['perturbx_median']:,.0f} ({r['perturbx_range'][0]:,.0f}–"
            f"{r['perturbx_range'][1]:,.0f}) | {r['ratio_of_medians']:.2f}× "
            f"({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run_perturbx:
        print(
            json.dumps(
                perturbx_speed(args.run_perturbx, args.batch_size, args.epochs, args.threads)
            )
        )
        return
    venv, peers = Path(args.cpa_venv), Path(args.peers)
    if not (venv / "bin" / "python").exists():
        if not args.build:
            raise SystemExit(f"No cpa-tools venv at {venv}; pass --build to create it.")
        subprocess.run(["bash", str(peers / "setup_venv.sh"), str(venv)], check=True)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "screen.h5ad"
        write_screen(data, args.n_cells, args.n_genes)
        for k in range(args.rounds):
            for batch_size in args.batch_sizes:
                for tool, run in (("cpa", run_cpa), ("perturbx", run_perturbx)):
                    extra = (venv, peers) if tool == "cpa" else ()
                    record = run(*extra, data, batch_size, args.epochs, args.threads)
                    runs.append({**record, "tool": tool, "round": k, "batch_size": batch_size})
                    print(
                        f"round {k} batch {batch_size} {tool}: {record['cells_per_s']:,.0f} "
                        "cells/s",
                        flush=True,
                    )
    rows = table(runs)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "table": rows}, indent=1))


if __name__ == "__main__":
    main()
