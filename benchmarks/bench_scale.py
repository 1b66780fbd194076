"""Peak memory (RSS) and time of registration, prediction and evaluation on a million cells.

Usage::

    python benchmarks/bench_scale.py                            # 1M cells x 200 genes
    python benchmarks/bench_scale.py --n-cells 200000 --json scale.json --skip-evaluate

A sparse (CSR) Poisson count matrix with a drug screen's obs (controls, drugs with SMILES
at three doses, three cell types) is built once; each stage then runs in the same process.
Before each stage the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), so
``peak`` is the stage's own high-water mark and ``peak - before`` is what the stage added on
top of what was resident. The dense float32 size of the matrix is printed for comparison:
a stage that densified the whole matrix would add at least that much. The model is tiny
and briefly trained: memory, not accuracy, is measured. Linux only.

glibc's malloc raises its mmap threshold after freeing large blocks (up to 32 MiB, the size
of a dense 4096 x 2000 float32 batch), after which freed batches stay in the heap and RSS
drifts up by hundreds of MiB without any live allocation. The benchmark therefore fixes the
threshold (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, the same as the environment variable
``MALLOC_MMAP_THRESHOLD_=65536``) so that RSS reflects memory in use; ``--default-malloc``
measures with glibc's defaults instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse

MIB = 2**20
DRUG_SMILES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(O)=O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "dexamethasone": "CC1CC2C3CCC4=CC(=O)C=CC4(C)C3(F)C(O)CC2(C)C1(O)C(=O)CO",
}


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def fix_mmap_threshold(n_bytes: int = 65536) -> bool:
    """Stop glibc from raising its mmap threshold (see the module docstring)."""
    m_mmap_threshold = -3
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, n_bytes))
    except OSError:
        return False


def reset_peak() -> None:
    """Reset the peak-RSS counter (VmHWM) of this process to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def screen(n_cells: int, n_genes: int, seed: int = 0, chunk: int = 50_000) -> AnnData:
    """Sparse Poisson counts (built in chunks, never dense as a whole) and a screen's obs."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.5, 0.4, n_genes)  # mostly low counts: ~15% non-zero entries
    blocks = []
    for start in range(0, n_cells, chunk):
        rows = min(chunk, n_cells - start)
        blocks.append(sparse.csr_matrix(rng.poisson(rate, (rows, n_genes)).astype(np.float32)))
    matrix = sparse.vstack(blocks, format="csr")
    del blocks
    names = np.array(["control", *DRUG_SMILES])
    drug = names[rng.choice(len(names), n_cells, p=[0.3] + [0.7 / len(DRUG_SMILES)] * 5)]
    is_control = drug == "control"
    dose = np.where(is_control, 0.0, rng.choice([0.1, 1.0, 10.0], n_cells))
    smiles = pd.Series(drug).map(DRUG_SMILES).fillna("")
    obs = pd.DataFrame(
        {
            "drug": pd.Categorical(drug),
            "dose": dose,
            "smiles": pd.Categorical(smiles),
            "cell_type": pd.Categorical(rng.choice(["a", "b", "c"], n_cells)),
        },
        index=pd.Index([f"c{i}" for i in range(n_cells)]),
    )
    return AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


def measure(stage: str, function, results: list[dict], note: str = ""):
    before = _status_kib("VmRSS") / 1024
    reset_peak()
    start = time.perf_counter()
    value = function()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") / 1024
    results.append(
        {
            "stage": stage,
            "seconds": round(seconds, 2),
            "rss_before_mib": round(before),
            "peak_mib": round(peak),
            "peak_minus_before_mib": round(peak - before),
            "note": note(value) if callable(note) else note,
        }
    )
    print(f"  {stage}: {seconds:.1f} s, peak {peak:.0f} MiB (+{peak - before:.0f})", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--cells-per-target", type=int, default=10_000)
    parser.add_argument("--skip-evaluate", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then overstates use)",
    )
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fixed_threshold = False if args.default_malloc else fix_mmap_threshold()

    import perturbx
    from perturbx import PerturbX

    results: list[dict] = []
    adata = measure("build data", lambda: screen(args.n_cells, args.n_genes), results)
    dense_mib = args.n_cells * args.n_genes * 4 / MIB
    stored_mib = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes) / MIB
    results[-1]["note"] = f"CSR {stored_mib:.0f} MiB; dense would be {dense_mib:.0f} MiB"

    measure(
        "setup_anndata",
        lambda: PerturbX.setup_anndata(
            adata,
            perturbation_key="drug",
            dose_key="dose",
            smiles_key="smiles",
            covariate_keys=["cell_type"],
        ),
        results,
    )
    model = measure(
        "PerturbX(adata) incl. input checks",
        lambda: PerturbX(
            adata,
            n_latent=8,
            n_hidden=32,
            n_layers=1,
            drug_encoder_hidden=32,
            adversary_hidden=16,
            adversary_layers=1,
        ),
        results,
    )
    measure(
        f"train ({args.train_steps} steps, batch 256)",
        lambda: model.train(
            max_epochs=1,
            max_steps=args.train_steps,
            batch_size=256,
            train_size=0.99,
            enable_progress_bar=False,
            check_val_every_n_epoch=None,
            enable_model_summary=False,
        ),
        results,
    )
    measure(
        "get_latent_representation (all cells)",
        lambda: model.get_latent_representation(batch_size=args.batch_size),
        results,
        note=lambda z: f"output {z.nbytes / MIB:.0f} MiB",
    )
    n_controls = int((adata.obs["drug"] == "control").sum())
    measure(
        f"predict 1 target from all {n_controls} controls",
        lambda: model.predict(target={"drug": "aspirin", "dose": 1.0}, batch_size=args.batch_size),
        results,
        note=lambda p: f"output {np.asarray(p.X).nbytes / MIB:.0f} MiB",
    )
    targets = [{"drug": d, "dose": 1.0} for d in DRUG_SMILES] + [{"drug": "CCO", "dose": 1.0}]
    measure(
        f"predict {len(targets)} targets x {args.cells_per_target} cells",
        lambda: model.predict(
            target=targets, n_cells_per_target=args.cells_per_target, batch_size=args.batch_size
        ),
        results,
        note=lambda p: f"output {np.asarray(p.X).nbytes / MIB:.0f} MiB",
    )
    if not args.skip_evaluate:
        measure(
            "evaluate (all cells; 500 cells per condition)",
            lambda: model.evaluate(
                adata,
                n_cells_per_target=500,
                batch_size=args.batch_size,
                baselines=("control_mean",),
            ),
            results,
            note=lambda r: f"{r.per_condition['condition'].nunique()} conditions",
        )

    table = pd.DataFrame(results)
    print(
        f"\nperturbx {perturbx.__version__}: {args.n_cells:,} cells x {args.n_genes} genes, "
        f"batch {args.batch_size}, {args.threads} thread(s), "
        f"{'fixed' if fixed_threshold else 'default glibc'} mmap threshold"
    )
    print(table.to_string(index=False))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
