"""Scoring must not resize the OpenMP pool that torch uses (one process per core stays so)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import contextlib, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    import perturbx.metrics._de as de
    if sys.argv[1] == "without_guard":
        de.keep_thread_pools = contextlib.nullcontext
    from perturbx import PerturbX
    from perturbx.data import simulate_drug_screen
    from perturbx.metrics import score
    adata = simulate_drug_screen(n_cells=3000, n_genes=200, n_drugs=4, seed=0)
    model_data = adata.copy()
    PerturbX.setup_anndata(model_data, perturbation_key="drug", dose_key="dose",
                           covariate_keys=["cell_type"])
    PerturbX(model_data, n_latent=8, n_hidden=16, n_layers=1).train(
        max_epochs=1, enable_progress_bar=False)
    pred = adata[adata.obs["drug"] != "control"].copy()
    pred.obs["method"] = "copy"
    score(pred, adata, perturbation_key="drug", dose_key="dose", covariate_keys=["cell_type"],
          method_key="method")
    print(torch.get_num_threads())
    """
)


def _threads_after_scoring(mode: str) -> int:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs >= 2 cores to resize a pool")
def test_score_keeps_torchs_thread_count():
    assert _threads_after_scoring("with_guard") == 1
    # The guard is what keeps it: scanpy's numba kernels resize the shared pool otherwise.
    assert _threads_after_scoring("without_guard") > 1
