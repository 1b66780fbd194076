"""Model files that cannot run code: safetensors + JSON, legacy pickles only on request."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from scvi.model.base import BaseModelClass

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX, PerturbXEnsemble
from perturbx.model._files import UnsafeModelFileError, from_plain, to_plain

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, logger=False)
TARGETS = [
    {"drug": "aspirin", "dose": 3.0},
    {"drug": "aspirin+caffeine", "dose": "1+10"},
    {"drug": "KLF1"},
    {"drug": "CC(C)Cc1ccc(cc1)C(C)C(O)=O"},
]


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle is read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_pickle(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"model_state_dict": _CreatesMarker(marker)}, handle)


def _train(likelihood="nb", smiles=True, seed=0):
    adata = toy_screen(n_cells=240)
    if likelihood == "gaussian":
        dense = adata.X.toarray()
        adata.X = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4).astype(np.float32)
    setup_toy(adata, **({} if smiles else {"smiles_key": None}))
    model = PerturbX(adata, likelihood=likelihood, **SMALL_ARCH)
    model.train(max_epochs=2, batch_size=64, seed=seed, **QUIET)
    return model, adata


@pytest.fixture(scope="module")
def nb_model(tmp_path_factory):
    model, adata = _train()
    path = tmp_path_factory.mktemp("saved") / "m"
    model.save(path)
    return model, adata, path


def _outputs(model, adata):
    targets = (
        TARGETS
        if model.module.perturbation_embedding.has_structure.any()
        else [{"drug": "aspirin", "dose": 3.0}, {"drug": "KLF1"}]
    )
    return {
        "prediction": model.predict(target=targets, n_cells_per_target=12, seed=1).X,
        "sampled": model.predict(target=targets, n_cells_per_target=12, seed=1, sample=True).X,
        "basal": model.get_latent_representation(adata),
        "full": model.get_latent_representation(adata, kind="full"),
    }


@pytest.mark.parametrize(
    ("likelihood", "smiles"),
    [("nb", True), ("zinb", True), ("gaussian", True), ("nb", False)],
    ids=["nb", "zinb", "gaussian", "nb without drug encoder"],
)
def test_round_trip_is_exact(tmp_path, likelihood, smiles):
    model, adata = _train(likelihood, smiles)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    # the weights open with a loader that executes nothing (safetensors is not a pickle)

    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(weights) == set(model.module.state_dict())
    loaded = PerturbX.load(tmp_path / "m", adata=adata)
    before, after = _outputs(model, adata), _outputs(loaded, adata)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert set(loaded.history) == set(model.history)
    for key in model.history:
        pd.testing.assert_frame_equal(loaded.history[key], model.history[key])
    for name in ("train_indices", "validation_indices", "test_indices"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.init_params_ == model.init_params_
    assert loaded.registry["setup_args"] == model.registry["setup_args"]
    assert loaded.perturbation_registry == model.perturbation_registry
    assert loaded.module.likelihood == likelihood
    assert loaded.is_trained


def test_round_trip_with_saved_anndata_and_prefix(nb_model, tmp_path):
    model, adata, _ = nb_model
    model.save(tmp_path / "m", prefix="run1_", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "run1_adata.h5ad",
        "run1_model.json",
        "run1_model.safetensors",
    ]
    loaded = PerturbX.load(tmp_path / "m", prefix="run1_")
    assert loaded.adata.n_obs == adata.n_obs
    np.testing.assert_array_equal(
        loaded.predict(target=TARGETS, n_cells_per_target=8).X,
        model.predict(target=TARGETS, n_cells_per_target=8).X,
    )
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        model.save(tmp_path / "m", prefix="run1_")


def test_ensemble_round_trip_is_exact(tmp_path):
    adata = toy_screen(n_cells=240)
    setup_toy(adata)
    ensemble = PerturbXEnsemble(adata, n_models=2, seed=3, **SMALL_ARCH)
    ensemble.train(max_epochs=1, batch_size=64, **QUIET)
    ensemble.save(tmp_path / "ens")
    for member in ("member_0", "member_1"):
        assert not (tmp_path / "ens" / member / "model.pt").exists()
    loaded = PerturbXEnsemble.load(tmp_path / "ens", adata=adata)
    np.testing.assert_array_equal(
        loaded.predict(target=TARGETS, n_cells_per_target=8).X,
        ensemble.predict(target=TARGETS, n_cells_per_target=8).X,
    )


def test_a_pickle_in_place_of_the_model_is_never_unpickled(nb_model, tmp_path):
    """The attack of the issue: a saved model's files replaced by a crafted pickle."""
    _, adata, path = nb_model
    marker = tmp_path / "code_ran"
    # 1. legacy layout: only a (malicious) model.pt
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    _malicious_pickle(legacy / "model.pt", marker)
    fresh = adata.copy()
    with pytest.raises(UnsafeModelFileError, match="trust_pickle=True"):
        PerturbX.load(legacy, adata=fresh)
    assert not marker.exists()
    assert set(fresh.obsm) == set(adata.copy().obsm)  # AnnData unchanged on error
    # 2. a model.pt slipped into a safe folder
    planted = tmp_path / "planted"
    shutil.copytree(path, planted)
    _malicious_pickle(planted / "model.pt", marker)
    with pytest.raises(UnsafeModelFileError, match="model.pt.*not read"):
        PerturbX.load(planted, adata=adata.copy())
    assert not marker.exists()
    # 3. the weights file replaced by a pickle
    swapped = tmp_path / "swapped"
    shutil.copytree(path, swapped)
    _malicious_pickle(swapped / "model.safetensors", marker)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PerturbX.load(swapped, adata=adata.copy())
    assert not marker.exists()
    # 4. the JSON cannot carry objects: a pickle there is not JSON
    _malicious_pickle(swapped / "model.json", marker)
    with pytest.raises(ValueError, match="not valid JSON"):
        PerturbX.load(swapped, adata=adata.copy())
    assert not marker.exists()


def test_legacy_pickle_model_loads_only_with_trust_pickle(nb_model, tmp_path):
    model, adata, _ = nb_model
    legacy = tmp_path / "legacy"
    BaseModelClass.save(model, str(legacy))  # the pickle-based writer of perturbx < 0.2
    assert sorted(p.name for p in legacy.iterdir()) == ["model.pt"]
    with pytest.raises(UnsafeModelFileError, match="trust_pickle=True"):
        PerturbX.load(legacy, adata=adata)
    with pytest.warns(UserWarning, match="runs any code"):
        loaded = PerturbX.load(legacy, adata=adata, trust_pickle=True)
    np.testing.assert_array_equal(
        loaded.predict(target=TARGETS, n_cells_per_target=8).X,
        model.predict(target=TARGETS, n_cells_per_target=8).X,
    )
    # saving it again converts it to the safe format, and the pickle is gone
    loaded.save(legacy, overwrite=True)
    assert sorted(p.name for p in legacy.iterdir()) == ["model.json", "model.safetensors"]
    again = PerturbX.load(legacy, adata=adata)
    np.testing.assert_array_equal(
        again.predict(target=TARGETS, n_cells_per_target=8).X,
        model.predict(target=TARGETS, n_cells_per_target=8).X,
    )


def test_foreign_or_damaged_files_are_clear_errors(nb_model, tmp_path):
    _, adata, path = nb_model
    with pytest.raises(FileNotFoundError, match="model.json"):
        PerturbX.load(tmp_path, adata=adata.copy())
    other = tmp_path / "other"
    shutil.copytree(path, other)
    document = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        PerturbX.load(other, adata=adata.copy())
    (other / "model.json").write_text(json.dumps({**document, "model_class": "SCVI"}))
    with pytest.raises(ValueError, match="'SCVI' model"):
        PerturbX.load(other, adata=adata.copy())
    tampered = {**document, "attributes": {**document["attributes"], "module": 1}}
    (other / "model.json").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="attributes that a model file never holds.*'module'"):
        PerturbX.load(other, adata=adata.copy())
    (other / "model.json").write_text(json.dumps(document))
    (other / "model.safetensors").write_bytes(b"\x00" * 10)  # a truncated download
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PerturbX.load(other, adata=adata.copy())


@pytest.mark.parametrize(
    "value",
    [
        {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": (1, "x", None)},
        {"floats": np.array([0.1, np.nan, np.inf, -np.inf], dtype=np.float32), "f": np.nan},
        {"strings": np.array(["a", "b"], dtype=object), "bools": np.array([True, False])},
        {("tuple", "key"): 1, 2: "int key", "__ndarray__": "a key that looks like a tag"},
        {"scalar": np.float32(0.1), "int": np.int64(3), "nested": [{"x": [1, 2.5]}]},
        {"history": pd.DataFrame({"loss": [1.5, np.nan]}, index=pd.Index([0, 1], name="epoch"))},
    ],
    ids=[
        "arrays and tuples",
        "non-finite floats",
        "strings and bools",
        "odd keys",
        "scalars",
        "dataframe",
    ],
)
def test_codec_restores_values_exactly(value):
    restored = from_plain(json.loads(json.dumps(to_plain(value))))
    assert restored.keys() == value.keys()
    for key, original in value.items():
        got = restored[key]
        if isinstance(original, pd.DataFrame):
            pd.testing.assert_frame_equal(got, original)
        elif isinstance(original, (np.ndarray, np.generic)):
            assert type(got) is type(original) and got.dtype == original.dtype
            np.testing.assert_array_equal(got, original)
        elif isinstance(original, float) and np.isnan(original):
            assert np.isnan(got)
        else:
            assert got == original and type(got) is type(original)


def test_codec_refuses_objects_it_cannot_write_and_names_them():
    with pytest.raises(TypeError, match=r"model\['callback'\] \(function\)"):
        to_plain({"callback": lambda x: x}, "model")
