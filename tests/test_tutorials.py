"""Execute every tutorial notebook (``tutorials/*.ipynb``) end to end, with few epochs.

Each notebook runs in a fresh ``python3`` kernel whose working directory is a temporary
folder and whose data loaders read the seeded ``data_cache`` (``PERTURBX_DATA_DIR``), so the
network is never needed. The notebooks' defaults are overridden papermill-style: a cell with
:data:`FAST_PARAMETERS` is inserted after the cell tagged ``parameters``. A final cell with
:data:`CHECKS` asserts what the notebook must have produced. Any cell error fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_SECONDS = 600

# Small settings that exercise every cell in seconds, not the defaults used for the saved
# outputs.
FAST_PARAMETERS = {
    "01_unseen_drugs_lincs.ipynb": "EPOCHS = 2",
    "02_genetic_combinations.ipynb": "EPOCHS = 2",
    "03_evaluate_any_model.ipynb": "N_CELLS = 4_000",
    "04_quickstart_simulated.ipynb": "EPOCHS = 2\nN_CELLS = 2_000\nN_GENES = 300",
    "05_new_patient_glioblastoma.ipynb": "EPOCHS = 2",
}

# Notebooks that load real data (the others simulate theirs and run without the data folder).
NEEDS_DATA = {
    "01_unseen_drugs_lincs.ipynb",
    "02_genetic_combinations.ipynb",
    "05_new_patient_glioblastoma.ipynb",
}

# What each notebook must have computed (run in its kernel after its last cell).
CHECKS = {
    "01_unseen_drugs_lincs.ipynb": """
assert len(held_out) == N_HELD_OUT
assert {"PerturbX", "control_mean", "perturbed_centroid"} <= set(result.methods)
assert set(result.per_condition["perturbation"]) == set(held_out)
assert pred_new.obs["max_tanimoto_to_training"].between(0, 1).all()
assert set(pred_new.obs["nearest_training_drug"]) <= set(training_drugs)
""",
    "02_genetic_combinations.ipynb": """
assert predictable and all(len(members[p]) == 2 for p in predictable)
assert {"PerturbX", "additive", "perturbed_centroid"} <= set(result.methods)
assert set(result.per_condition["perturbation"]) == set(predictable)
# The additive baseline is control + the two singles' deltas: check one gene by hand, on
# the means of the training K562 cells, at the gene where the pair's summed deltas are largest
# (so that a prediction of the control, or of one single, would fail).
k562_means = perturbx.metrics.pseudobulk(train[train.obs["cell_type"] == "k562"], "perturbation")
means = pd.DataFrame(k562_means.X, index=k562_means.obs["perturbation"].astype(str),
                     columns=k562_means.var_names)
first = predictable[0]
deltas = [means.loc[g] - means.loc["control"] for g in members[first]]
gene = (deltas[0] + deltas[1]).abs().idxmax()
assert min(abs(deltas[0][gene]), abs(deltas[1][gene])) > 1e-3
expected = means.loc["control", gene] + deltas[0][gene] + deltas[1][gene]
row = list(additive.obs["perturbation"]).index(first)
assert additive.obs["method"].iloc[row] == "additive"
assert abs(additive[row, gene].X.item() - expected) < 1e-6
""",
    "03_evaluate_any_model.ipynb": """
assert {"ridge", "nearest drug", "noisy truth"} <= set(result.methods)
medians = result.summary.pivot(index="metric", columns="method", values="median")
# The truth plus a little noise must beat the mean baseline by far on every error metric.
for metric in ["mse", "weighted_mse"]:
    assert medians.loc[metric, "noisy truth"] < 0.5 * medians.loc[metric, "perturbed_centroid"]
assert medians.loc["pearson_delta_centroid", "noisy truth"] > 0.5
""",
    "05_new_patient_glioblastoma.ipynb": """
assert set(per_patient["patient"]) == set(patients) and len(patients) == 5
assert {"PerturbX", "transferred mean response", "control_mean",
        "interpolated_duplicate"} <= set(per_patient["method"])
# each held-out patient's prediction came from its own controls only
for patient, test in tests.items():
    assert set(test.obs.loc[test.obs["perturbation"] == "Panobinostat", "patient"]) == {patient}
assert np.isfinite(per_patient["weighted_mse"]).all()
""",
    "04_quickstart_simulated.ipynb": """
assert same, "the loaded model must predict what the saved one did"
assert {"PerturbX", "perturbed_centroid"} <= set(result.methods)
assert pred_new.obs["max_tanimoto_to_training"].between(0, 1).all()
assert 0 < pred_new.n_obs <= 200  # at most n_cells_per_target
""",
}


def test_every_notebook_has_fast_parameters_and_checks():
    names = {path.name for path in NOTEBOOKS}
    assert names, f"no notebooks found in {TUTORIALS}"
    assert names == set(FAST_PARAMETERS) == set(CHECKS)
    assert NEEDS_DATA <= names


def _kernel_available() -> None:
    """Skip with a reason if no ``python3`` kernel can be started from this environment."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        pytest.skip(
            f"no Jupyter kernel {KERNEL_NAME!r}; register one with "
            "`python -m ipykernel install --user`."
        )


def _prepare(path: Path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [
        i
        for i, cell in enumerate(notebook.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters'"
    override = nbformat.v4.new_code_cell(FAST_PARAMETERS[path.name])
    override.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(tagged[0] + 1, override)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name].strip()))
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch, request):
    _kernel_available()
    # The kernel inherits this environment: cached data, one thread per library (the
    # machines are small and shared), a non-interactive matplotlib backend.
    if path.name in NEEDS_DATA:
        data_cache = request.getfixturevalue("data_cache")  # skips if the data are absent
        monkeypatch.setenv("PERTURBX_DATA_DIR", str(data_cache))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = _prepare(path)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_SECONDS,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    if path.name.startswith("04_"):
        assert (tmp_path / "quickstart_model").is_dir(), "the kernel did not run in tmp_path"
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
