"""Out-of-core training: AnnData whose counts stay on disk (backed h5ad, on-disk layers, zarr).

The memory test trains in a subprocess on a file whose matrix, held densely, would be about
1 GB, and checks the process's peak RSS (``VmHWM``) grows by a small fraction of that.
This file is also the subprocess's script (``python test_out_of_core.py <h5ad> <json>``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from scipy import sparse

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.data import _validation, write_counts_h5ad

QUIET = dict(enable_progress_bar=False, enable_checkpointing=False)


# --------------------------------------------------------------------------- helpers
def _open_on_disk(adata: ad.AnnData, kind: str, folder: Path) -> tuple[ad.AnnData, str | None]:
    """``adata`` written to disk and opened so that its counts are read minibatch by minibatch.

    Returns the on-disk AnnData and the layer holding the counts (``None``: ``X``).
    """
    if kind in ("backed_csr", "backed_dense"):
        written = adata.copy()
        if kind == "backed_dense":
            written.X = written.X.toarray()
        written.write_h5ad(folder / "screen.h5ad")
        return ad.read_h5ad(folder / "screen.h5ad", backed="r"), None
    # anndata's documented way to keep a layer (here from HDF5 or zarr) on disk without
    # backed mode: a sparse_dataset in layers of an otherwise in-memory AnnData.
    written = ad.AnnData(obs=adata.obs, var=adata.var, layers={"counts": adata.X})
    if kind == "h5_layer":
        written.write_h5ad(folder / "screen.h5ad")
        store = h5py.File(folder / "screen.h5ad", "r")
    else:
        written.write_zarr(folder / "screen.zarr")
        store = zarr.open_group(folder / "screen.zarr", mode="r")
    on_disk = ad.AnnData(
        obs=ad.io.read_elem(store["obs"]),
        var=ad.io.read_elem(store["var"]),
        layers={"counts": ad.io.sparse_dataset(store["layers/counts"])},
    )
    return on_disk, "counts"


def _twin_models(kind: str, folder: Path):
    """An in-memory and an on-disk model of the toy screen with identical initial weights."""
    memory = toy_screen()
    on_disk, layer = _open_on_disk(memory, kind, folder)
    if layer is not None:
        memory.layers[layer] = memory.X.copy()
        memory.X = None
    setup_toy(memory, layer=layer)
    setup_toy(on_disk, layer=layer)
    # Deterministic encoders: a variational basal latent draws its noise in minibatch row
    # order, which differs for backed data (read in sorted cell order).
    model_memory = PerturbX(memory, **SMALL_ARCH, variational=False)
    model_disk = PerturbX(on_disk, **SMALL_ARCH, variational=False)
    model_disk.module.load_state_dict(model_memory.module.state_dict())
    return model_memory, model_disk, memory, on_disk


# ------------------------------------------------------------ equivalence with memory
@pytest.mark.parametrize("kind", ["backed_csr", "backed_dense", "h5_layer", "zarr_layer"])
def test_on_disk_training_matches_in_memory(kind, tmp_path):
    model_memory, model_disk, _, _ = _twin_models(kind, tmp_path)
    initial = {k: v.clone() for k, v in model_memory.module.state_dict().items()}
    for model in (model_memory, model_disk):
        model.train(max_epochs=2, batch_size=64, seed=0, **QUIET)
    trained_memory = model_memory.module.state_dict()
    trained_disk = model_disk.module.state_dict()
    assert not torch.equal(initial["encoder.1.weight"], trained_memory["encoder.1.weight"])
    np.testing.assert_array_equal(model_memory.train_indices_, model_disk.train_indices_)
    # Same cells in the same minibatches; a backed minibatch is read in sorted cell order,
    # which only changes the order of floating-point sums.
    for key, value in trained_memory.items():
        torch.testing.assert_close(trained_disk[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["backed_csr", "h5_layer"])
def test_outputs_on_disk_match_in_memory_in_requested_order(kind, tmp_path):
    model_memory, model_disk, memory, _ = _twin_models(kind, tmp_path)
    # Unsorted, with a repeat: scvi sorts each backed minibatch; rows must come back as asked.
    cells = np.array([417, 5, 2, 9, 2, 300, 3, 599, 0])
    for model in (model_memory, model_disk):
        model.module.eval()
    np.testing.assert_allclose(
        model_disk.get_latent_representation(indices=cells, batch_size=4),
        model_memory.get_latent_representation(indices=cells, batch_size=4),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = model_memory.get_latent_representation()[cells]
    np.testing.assert_allclose(
        model_disk.get_latent_representation(indices=cells, batch_size=4),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )
    rec_disk = model_disk.reconstruct(indices=cells, batch_size=4)
    rec_memory = model_memory.reconstruct(indices=cells, batch_size=4)
    np.testing.assert_allclose(rec_disk.X, rec_memory.X, rtol=1e-5, atol=1e-6)
    assert list(rec_disk.obs_names) == [f"cell{i}" for i in cells]

    controls = np.flatnonzero(memory.obs["drug"].to_numpy() == "control")
    target = {"drug": "aspirin", "dose": 3.0}
    for source in ("control", controls[::-1].copy()):
        pred_disk = model_disk.predict(target=target, source=source, batch_size=16)
        pred_memory = model_memory.predict(target=target, source=source, batch_size=16)
        assert list(pred_disk.obs["source_cell"]) == list(pred_memory.obs["source_cell"])
        np.testing.assert_allclose(pred_disk.X, pred_memory.X, rtol=1e-5, atol=1e-5)


def test_predict_conditions_from_training_controls_on_disk(tmp_path):
    model_memory, model_disk, memory, _ = _twin_models("backed_csr", tmp_path)
    model_memory.train(max_epochs=1, batch_size=64, seed=0, **QUIET)
    model_disk.module.load_state_dict(model_memory.module.state_dict())
    model_disk.train_indices_ = model_memory.train_indices_  # a shuffled (unsorted) split
    # No controls among the held-out cells: the sources are the training controls.
    treated = memory[memory.obs["drug"] == "aspirin"].copy()
    pred_disk = model_disk.predict_conditions(treated, n_cells_per_target=40)
    pred_memory = model_memory.predict_conditions(treated, n_cells_per_target=40)
    is_control = memory.obs["drug"].to_numpy() == "control"
    training_controls = set(
        memory.obs_names[model_memory.train_indices_[is_control[model_memory.train_indices_]]]
    )
    assert set(pred_memory.obs["source_cell"]) <= training_controls
    assert list(pred_disk.obs["source_cell"]) == list(pred_memory.obs["source_cell"])
    np.testing.assert_allclose(pred_disk.X, pred_memory.X, rtol=1e-5, atol=1e-5)


def test_evaluate_on_disk_equals_evaluate_in_memory(tmp_path):
    model_memory, model_disk, memory, _ = _twin_models("backed_csr", tmp_path)
    model_memory.train(max_epochs=1, batch_size=64, seed=0, **QUIET)
    model_disk.module.load_state_dict(model_memory.module.state_dict())
    model_disk.train_indices_ = model_memory.train_indices_  # a shuffled (unsorted) split
    held_out = memory[memory.obs["drug"].isin(["control", "aspirin"])].copy()
    kw = dict(n_cells_per_target=30, seed=1)
    # the training cells' means (the perturbed centroid) are read from the file
    disk = model_disk.evaluate(held_out, **kw)
    in_memory = model_memory.evaluate(held_out, **kw)
    np.testing.assert_allclose(
        disk.references.layers["centroid"], in_memory.references.layers["centroid"], rtol=1e-6
    )
    got, want = disk.per_condition, in_memory.per_condition
    assert list(got["method"]) == list(want["method"]) and len(got) >= 4
    for metric in disk.metrics:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, atol=1e-6, err_msg=metric)


# --------------------------------------------------------- operations that need memory
def test_backed_views_and_adata_eval_fail_clearly(tmp_path):
    _, model, memory, backed = _twin_models("backed_csr", tmp_path)
    with pytest.raises(ValueError, match="view .* of a backed AnnData"):
        model.get_latent_representation(backed[backed.obs["cell_type"] == "a"])
    subset = backed[:100]
    with pytest.raises(ValueError, match="view .* of a backed AnnData"):
        setup_toy(subset)
    held_out = memory[memory.obs["drug"].isin(["control", "aspirin"])].copy()
    # predict_conditions works on a backed model (only source cells are read) ...
    pred = model.predict_conditions(held_out, n_cells_per_target=10)
    assert set(pred.obs["drug"]) == {"aspirin"}
    # ... but not on a backed adata_eval, whose control cells would be copied.
    held_out.write_h5ad(tmp_path / "held_out.h5ad")
    with pytest.raises(ValueError, match="adata_eval is backed"):
        model.predict_conditions(ad.read_h5ad(tmp_path / "held_out.h5ad", backed="r"))


def test_backed_adata_with_other_gene_order_fails_clearly(tmp_path):
    _, model, memory, _ = _twin_models("backed_csr", tmp_path)
    reordered = memory[:, memory.var_names[::-1]].copy()
    reordered.write_h5ad(tmp_path / "reordered.h5ad")
    with pytest.raises(ValueError, match="backed .* cannot be reordered"):
        model.predict(ad.read_h5ad(tmp_path / "reordered.h5ad", backed="r"), target="aspirin")


def test_dense_hdf5_layer_outside_backed_mode_fails_clearly(tmp_path):
    adata = toy_screen()
    ad.AnnData(obs=adata.obs, var=adata.var, layers={"counts": adata.X.toarray()}).write_h5ad(
        tmp_path / "dense_layer.h5ad"
    )
    with h5py.File(tmp_path / "dense_layer.h5ad", "r") as store:
        on_disk = ad.AnnData(
            obs=ad.io.read_elem(store["obs"]),
            var=ad.io.read_elem(store["var"]),
            layers={"counts": store["layers/counts"]},  # HDF5 reads need increasing rows
        )
        setup_toy(on_disk, layer="counts")
        with pytest.raises(ValueError, match=r"layers\['counts'\] is a dense HDF5 dataset"):
            PerturbX(on_disk, **SMALL_ARCH)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(
    "bad_value, message", [(np.nan, "NaN or infinite"), (-1.0, "negative"), (0.5, "non-integer")]
)
def test_backed_counts_checked_in_chunks(dense, bad_value, message, tmp_path, monkeypatch):
    adata = toy_screen(n_cells=300)
    counts = adata.X.toarray()
    counts[-1, -1] = bad_value  # in the last chunk read
    adata.X = counts if dense else sparse.csr_matrix(counts)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    setup_toy(backed)
    monkeypatch.setattr(_validation, "_CHUNK_VALUES", 1000)  # ~15 chunks of 1,000 values
    with pytest.raises(ValueError, match=rf"adata\.X (contains|has) {message}"):
        PerturbX(backed, **SMALL_ARCH)


# ------------------------------------------------------------------- bounded memory
N_CELLS, N_GENES, WRITE_CHUNK = 120_000, 2_000, 10_000
BATCH_SIZE = 128
MEMORY_ARCH = dict(
    n_latent=16, n_hidden=64, n_layers=1, drug_encoder_hidden=32, adversary_hidden=16
)


def _write_screen(path: Path, n_cells: int, n_genes: int, seed: int = 0) -> int:
    """A sparse NB-count screen written chunk by chunk (never dense); returns the CSR bytes."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"drug": rng.choice(["control", "drug_a", "drug_b"], n_cells), "dose": "1.0"},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return write_counts_h5ad(path, obs, n_genes, seed=seed, chunk_size=WRITE_CHUNK)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (``VmHWM``).

    Not ``ru_maxrss``: on Linux a subprocess's ``ru_maxrss`` starts at its parent's RSS at
    the fork (here the whole pytest process), while ``VmHWM`` belongs to its own memory map.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _train_backed_and_report(path: str, report: str) -> None:
    """Subprocess: peak RSS growth of backed setup + training, and of loading X (control)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    train = dict(max_epochs=1, batch_size=BATCH_SIZE, seed=0, **QUIET)
    # Warm-up on a small in-memory screen of the same shape per cell: torch / Lightning's
    # one-off allocations and one minibatch's working set are not counted as growth.
    with h5py.File(path, "r") as store:
        warm = ad.AnnData(
            ad.io.sparse_dataset(store["X"])[:3000],
            obs=ad.io.read_elem(store["obs"]).iloc[:3000],
            var=ad.io.read_elem(store["var"]),
        )
    PerturbX.setup_anndata(warm, perturbation_key="drug", dose_key="dose")
    PerturbX(warm, **MEMORY_ARCH).train(**train)
    del warm
    before = _peak_rss_bytes()
    adata = ad.read_h5ad(path, backed="r")
    PerturbX.setup_anndata(adata, perturbation_key="drug", dose_key="dose")
    model = PerturbX(adata, **MEMORY_ARCH)
    model.train(**train)
    trained = _peak_rss_bytes()
    n_epochs = len(model.history["reconstruction_loss_train"])
    in_memory = adata.X.to_memory()  # positive control: the measurement sees a loaded matrix
    loaded = _peak_rss_bytes()
    Path(report).write_text(
        json.dumps(
            {
                "training_growth": trained - before,
                "loading_growth": loaded - trained,
                "n_epochs": n_epochs,
                "nnz": int(in_memory.nnz),
            }
        )
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_backed_training_memory_stays_bounded(tmp_path):
    path = tmp_path / "large.h5ad"
    csr_bytes = _write_screen(path, N_CELLS, N_GENES)
    dense_bytes = N_CELLS * N_GENES * 4  # float32
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, __file__, str(path), str(report)], check=True, env=env, timeout=600
    )
    result = json.loads(report.read_text())
    assert result["n_epochs"] == 1
    assert dense_bytes > 5 * csr_bytes > 5 * 100e6  # the file is large, its dense form larger
    # Reading the matrix into memory is seen by the measurement (≈ its CSR size) ...
    sizes = f"{result}, CSR {csr_bytes} B, dense {dense_bytes} B"
    assert result["loading_growth"] > 0.5 * csr_bytes, sizes
    # ... training on it backed grows the process by a small fraction of it.
    assert result["training_growth"] < 0.4 * csr_bytes, sizes
    assert result["training_growth"] < 0.1 * dense_bytes, sizes


if __name__ == "__main__":
    _train_backed_and_report(sys.argv[1], sys.argv[2])
