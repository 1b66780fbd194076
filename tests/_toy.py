"""A tiny hand-built screen for API tests (the simulator is used where ground truth matters)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

TOY_SMILES = {"aspirin": "CC(=O)Oc1ccccc1C(=O)O", "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C"}


def toy_screen(n_cells: int = 600, n_genes: int = 50, seed: int = 0) -> ad.AnnData:
    """Controls, two drugs with SMILES, their combination, and one genetic perturbation."""
    rng = np.random.default_rng(seed)
    perturbations = np.array(["control", "aspirin", "caffeine", "aspirin+caffeine", "KLF1"])
    drug = rng.choice(perturbations, n_cells)
    dose = np.select(
        [drug == "control", drug == "aspirin+caffeine"], ["0", "1.0+10.0"], default="3.0"
    )
    smiles = [
        "+".join(TOY_SMILES[m] for m in d.split("+"))
        if d in ("aspirin", "caffeine", "aspirin+caffeine")
        else ""
        for d in drug
    ]
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "drug": drug,
            "dose": dose,
            "smiles": smiles,
            "cell_type": rng.choice(["a", "b"], n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=obs,
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )


def setup_toy(adata: ad.AnnData, **kwargs) -> None:
    from perturbx import PerturbX

    args = dict(
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        control_value="control",
        covariate_keys=["cell_type"],
    )
    args.update(kwargs)
    PerturbX.setup_anndata(adata, **args)


SMALL_ARCH = dict(n_latent=8, n_hidden=32, n_layers=1, drug_encoder_hidden=32, adversary_hidden=16)
