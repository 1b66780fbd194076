"""Train PerturbX on two CPU processes (DDP, gloo); run by ``tests/test_ddp.py``.

Usage: ``python ddp_script.py OUT_DIR`` from a scratch folder (scvi writes
``lightning_logs/`` to the working directory under DDP). Lightning's ``"ddp"`` strategy
re-runs this script for rank 1 (``LOCAL_RANK=1``), so everything before ``train`` is
deterministic. Each rank writes into ``OUT_DIR``:

- ``weights_rank{r}.pt``: ``{"initial": state dict before training, "final": after}``;
- ``info_rank{r}.json``: rank, optimiser steps, cells per batch and total counts seen per
  epoch, split sizes, and (rank 0) the logged history and the validation reconstruction
  loss recomputed from the final weights;
- ``model.save(OUT_DIR / f"saved_by_rank{r}")``, which should write on rank 0 only.

A second, deliberately broken training run (``devices=2`` without a strategy) follows:
rank 1's adversary loss is NaN. Both
ranks must stop with ``NonFiniteLossError`` (recorded in the info file) instead of one rank
waiting forever for the other in the next all-reduce.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import scvi  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from perturbx import PerturbX  # noqa: E402
from perturbx.data import simulate_drug_screen  # noqa: E402
from perturbx.train import NonFiniteLossError, average_gradients  # noqa: E402

N_CELLS, N_GENES, N_VALIDATION, N_TEST = 800, 60, 120, 80
BATCH_SIZE, MAX_EPOCHS, ADVERSARY_EVERY = 32, 6, 3
ARCH = dict(n_latent=8, n_hidden=32, n_layers=1, drug_encoder_hidden=32, adversary_hidden=16)


class BatchCounter(Callback):
    """Cells and total counts of each training batch, per epoch, on this process."""

    def __init__(self):
        self.cells_per_batch: list[list[int]] = []
        self.counts_per_epoch: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.cells_per_batch.append([])
        self.counts_per_epoch.append(0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x = batch[scvi.REGISTRY_KEYS.X_KEY]
        self.cells_per_batch[-1].append(int(x.shape[0]))
        self.counts_per_epoch[-1] += float(x.double().sum())


def simulated_screen():
    adata = simulate_drug_screen(
        n_cells=N_CELLS, n_genes=N_GENES, n_drugs=4, doses=(1.0, 10.0), n_affected_genes=15, seed=3
    )
    split = np.full(N_CELLS, "train", dtype=object)
    order = np.random.default_rng(0).permutation(N_CELLS)
    split[order[:N_VALIDATION]] = "validation"
    split[order[N_VALIDATION : N_VALIDATION + N_TEST]] = "test"
    adata.obs["split"] = split
    PerturbX.setup_anndata(
        adata, "drug", dose_key="dose", smiles_key="smiles", covariate_keys=["cell_type"]
    )
    return adata


def validation_reconstruction(model: PerturbX) -> float:
    """Mean reconstruction loss per validation cell under the current weights (eval mode)."""
    loader = model._make_data_loader(
        adata=model.adata, indices=model.validation_indices, batch_size=64
    )
    total, n = 0.0, 0
    model.module.eval()
    with torch.no_grad():
        for tensors in loader:
            _, _, loss_output = model.module(tensors)
            total += float(loss_output.reconstruction_loss_sum)
            n += int(loss_output.n_obs_minibatch)
    return total / n


def averaged_gradients(rank: int) -> list[list[float] | None]:
    """``average_gradients`` on hand-set gradients: ``a`` has rank + 1 on each rank, ``b``
    4 on rank 1 only (none on rank 0), ``c`` none anywhere."""
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad = torch.full((2,), rank + 1.0)
    if rank == 1:
        b.grad = torch.full((2,), 4.0)
    average_gradients([a, b, c], world_size=2)
    return [None if p.grad is None else p.grad.tolist() for p in (a, b, c)]


def main(out_dir: Path) -> None:
    scvi.settings.seed = 0
    adata = simulated_screen()
    model = PerturbX(adata, **ARCH)
    initial = {k: v.clone() for k, v in model.module.state_dict().items()}
    counter = BatchCounter()
    model.train(
        max_epochs=MAX_EPOCHS,
        batch_size=BATCH_SIZE,
        split_key="split",
        seed=0,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        enable_progress_bar=False,
        callbacks=[counter],
        plan_kwargs={"adversary_every": ADVERSARY_EVERY, "n_epochs_adversary_warmup": 2},
    )
    rank = model.trainer.global_rank
    torch.save(
        {"initial": initial, "final": model.module.state_dict()}, out_dir / f"weights_rank{rank}.pt"
    )
    info = {
        "rank": rank,
        "world_size": model.trainer.world_size,
        "global_step": model.trainer.global_step,
        "cells_per_batch": counter.cells_per_batch,
        "counts_per_epoch": counter.counts_per_epoch,
        "n_train": len(model.train_indices),
        "n_validation": len(model.validation_indices),
        "batch_size": BATCH_SIZE,
        "adversary_every": ADVERSARY_EVERY,
    }
    if rank == 0:
        info["history"] = {k: v.iloc[:, 0].astype(float).tolist() for k, v in model.history.items()}
        info["validation_reconstruction"] = validation_reconstruction(model)
    model.save(str(out_dir / f"saved_by_rank{rank}"), save_anndata=True)
    info["averaged_gradients"] = averaged_gradients(rank)

    # A broken run: NaN adversary loss on rank 1 only.
    module = model.module
    adversary_losses = type(module).adversary_losses

    def nan_on_rank1(self, basal, tensors):
        losses = adversary_losses(self, basal, tensors)
        nan = float("nan") if rank == 1 else 1.0
        return losses._replace(
            cross_entropy=losses.cross_entropy * nan, confusion=losses.confusion * nan
        )

    module.adversary_losses = types.MethodType(nan_on_rank1, module)
    try:
        model.train(
            max_epochs=1,
            batch_size=BATCH_SIZE,
            split_key="split",
            accelerator="cpu",
            devices=2,  # no strategy: PerturbX picks its DDP set-up
            enable_progress_bar=False,
        )
        info["fault"] = "no error"
    except NonFiniteLossError as error:
        info["fault"] = f"NonFiniteLossError: {error}"
    (out_dir / f"info_rank{rank}.json").write_text(json.dumps(info))
    # Rank 0 (the test's process) returns only once rank 1 has written its files.
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
