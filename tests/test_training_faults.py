"""Training faults (non-finite losses, gradient clipping), resuming, and save/load integrity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.model._files import from_plain, to_plain
from perturbx.train import NonFiniteLossError

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def _model(n_cells: int = 200) -> PerturbX:
    adata = toy_screen(n_cells=n_cells)
    setup_toy(adata)
    return PerturbX(adata, **SMALL_ARCH)


def _weights(model: PerturbX) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_finite_weights(model: PerturbX) -> None:
    for name, value in model.module.state_dict().items():
        assert torch.isfinite(value.float()).all(), name


class _Recorder(Callback):
    """Records epochs run, the autoencoder's gradient norm at each step, optimiser state."""

    def __init__(self):
        self.epochs: list[int] = []
        self.gradient_norms: list[float] = []
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.start_adam_steps: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_weights = {k: v.clone() for k, v in pl_module.module.state_dict().items()}
        state = trainer.optimizers[0].state
        steps = [float(s["step"]) for s in state.values() if "step" in s]
        self.start_adam_steps = max(steps) if steps else 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if optimizer is not trainer.optimizers[0]:  # the autoencoder's optimiser only
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.gradient_norms.append(
            float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        )


class _BreakReconstructionAt(Callback):
    """From epoch ``epoch`` on, the module's loss becomes NaN (a fault inside training)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.epoch:
            return
        module = pl_module.module
        original = module.loss

        def broken(*args, **kwargs):
            output = original(*args, **kwargs)
            output.loss = output.loss * torch.tensor(float("nan"))
            return output

        module.loss = broken


# ------------------------------------------------------------------------ non-finite losses
def test_inf_in_the_data_stops_training_naming_the_term_and_epoch():
    model = _model()
    before = _weights(model)
    # After the input checks, the data changed under the model; every cell has counts, so the
    # first minibatch (an adversary step) already sees the Inf.
    model.adata.X.data[:] = np.inf
    with pytest.raises(NonFiniteLossError, match=r"adversary_loss became nan at epoch 0, step 0"):
        model.train(max_epochs=2, batch_size=64, seed=0, **QUIET)
    _assert_finite_weights(model)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "no update from a NaN loss"


def test_nan_reconstruction_in_a_later_epoch_is_reported_with_that_epoch():
    model = _model()
    with pytest.raises(NonFiniteLossError, match=r"reconstruction_loss became nan at epoch 1"):
        model.train(max_epochs=3, batch_size=64, callbacks=[_BreakReconstructionAt(1)], **QUIET)
    _assert_finite_weights(model)


# ----------------------------------------------------------------------- gradient clipping
def test_gradient_clipping_bounds_the_autoencoder_gradient_norm():
    clip = 0.01
    norms = {}
    for clip_value in (None, clip):
        recorder = _Recorder()
        model = _model()
        model.train(
            max_epochs=2,
            batch_size=32,
            seed=0,
            callbacks=[recorder],
            plan_kwargs={"gradient_clip_val": clip_value},
            **QUIET,
        )
        norms[clip_value] = np.array(recorder.gradient_norms)
        assert len(norms[clip_value]) >= 4
    assert norms[None].max() > 10 * clip  # clipping has something to do here
    assert norms[clip].max() <= clip * (1 + 1e-4)


# -------------------------------------------------------------------------------- resuming
def test_training_a_loaded_model_continues_like_training_in_memory(tmp_path):
    model = _model()
    model.train(max_epochs=1, batch_size=64, seed=0, **QUIET)
    model.save(tmp_path / "m")
    loaded = PerturbX.load(tmp_path / "m", adata=model.adata)
    trained_once = _weights(loaded)
    model.train(max_epochs=1, batch_size=64, seed=1, **QUIET)
    loaded.train(max_epochs=1, batch_size=64, seed=1, **QUIET)
    in_memory, resumed = _weights(model), _weights(loaded)
    assert any(not torch.equal(trained_once[k], resumed[k]) for k in resumed)
    for key in in_memory:  # continued from the loaded weights, not from a new initialisation
        torch.testing.assert_close(resumed[key], in_memory[key], rtol=0, atol=0)
    history = loaded.history["reconstruction_loss_train"]
    assert len(history) == 2
    assert history.iloc[0, 0] == model.history["reconstruction_loss_train"].iloc[0, 0]


class _RecordTrainingMode(Callback):
    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.extend(m.training for m in pl_module.module.modules())


def test_training_after_predict_or_load_runs_in_training_mode(tmp_path):
    # predict() and load() leave the module in evaluation mode, and Lightning keeps each
    # submodule's mode at the start of fit: a second train() would then use the basal
    # latent's mean instead of a sample and no dropout.
    model = _model()
    model.train(max_epochs=1, batch_size=64, seed=0, **QUIET)
    model.predict(target={"drug": "aspirin", "dose": 1.0}, n_cells_per_target=5)
    model.save(tmp_path / "m")
    loaded = PerturbX.load(tmp_path / "m", adata=model.adata)
    for m in (model, loaded):
        assert not m.module.training
        record = _RecordTrainingMode()
        m.train(max_epochs=1, batch_size=64, seed=1, callbacks=[record], **QUIET)
        assert record.modes and all(record.modes)


def test_resume_from_a_lightning_checkpoint_restores_epoch_and_optimisers(tmp_path):
    plan = {"adversary_weight": 5.0, "n_epochs_adversary_warmup": 5}
    first = _model()
    recorder = _Recorder()
    first.train(
        max_epochs=2, batch_size=64, seed=0, callbacks=[recorder], plan_kwargs=plan, **QUIET
    )
    n_autoencoder_steps = len(recorder.gradient_norms)
    checkpoint = tmp_path / "last.ckpt"
    first.trainer.save_checkpoint(checkpoint)

    resumed = _model()  # same setup, fresh weights
    recorder = _Recorder()
    resumed.train(
        max_epochs=3,
        batch_size=64,
        seed=0,
        ckpt_path=str(checkpoint),
        callbacks=[recorder],
        plan_kwargs=plan,
        **QUIET,
    )
    assert recorder.epochs == [2]  # only the missing epoch ran
    assert recorder.start_adam_steps == n_autoencoder_steps  # Adam moments restored
    saved = _weights(first)
    for key, value in recorder.start_weights.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    # The adversary warm-up continues from epoch 2 (lambda = 5 * 2 / 5), not from zero.
    assert resumed.history["adversary_lambda"].iloc[-1, 0] == pytest.approx(2.0)


def test_scvi_save_checkpoint_callback_writes_a_loadable_model(tmp_path):
    from scvi.train import SaveCheckpoint

    model = _model()
    callback = SaveCheckpoint(dirpath=str(tmp_path), monitor="elbo_validation")
    model.train(max_epochs=2, batch_size=64, seed=0, callbacks=[callback], **QUIET)
    saved = [p for p in tmp_path.iterdir() if (p / "model.json").exists()]
    assert len(saved) == 1
    assert not (saved[0] / "model.pt").exists()  # the callback writes the safe format
    loaded = PerturbX.load(saved[0], adata=model.adata)
    prediction = loaded.predict(target="aspirin", n_cells_per_target=5)
    assert np.isfinite(np.asarray(prediction.X)).all()


# ------------------------------------------------------------------------------- save/load
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = toy_screen(n_cells=200)
    adata.obs["split"] = np.where(np.arange(adata.n_obs) % 5 == 0, "validation", "train")
    adata.obs.loc[adata.obs_names[1::7], "split"] = "test"
    setup_toy(adata, fingerprint_radius=3, fingerprint_bits=512, fingerprint_counts=False)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, split_key="split", seed=0, **QUIET)
    path = tmp_path_factory.mktemp("saved") / "m"
    model.save(path)
    return model, adata, path


def test_round_trip_keeps_split_registry_and_predictions(saved):
    model, adata, path = saved
    loaded = PerturbX.load(path, adata=adata)
    split = adata.obs["split"].to_numpy()
    for name, indices in (
        ("train", loaded.train_indices),
        ("validation", loaded.validation_indices),
        ("test", loaded.test_indices),
    ):
        assert set(split[indices]) == {name}
        np.testing.assert_array_equal(np.sort(indices), np.flatnonzero(split == name))
    state = loaded.perturbation_registry
    assert state == model.perturbation_registry
    assert state["fingerprint"] == {"radius": 3, "n_bits": 512, "counts": False, "chirality": False}
    assert loaded.featurizer.to_dict() == state["fingerprint"]
    target = [{"drug": "aspirin+caffeine", "dose": "1+10"}, {"drug": "CC(C)Cc1ccc(cc1)C(C)C(O)=O"}]
    np.testing.assert_array_equal(
        loaded.predict(target=target, n_cells_per_target=10).X,
        model.predict(target=target, n_cells_per_target=10).X,
    )


def _edit_saved_registry(path, target, edit):
    """Copy a saved model with its perturbation registry edited (an "older version")."""
    document = json.loads((path / "model.json").read_text())
    attributes = from_plain(document["attributes"])
    edit(attributes["registry_"]["field_registries"]["perturbations"]["state_registry"])
    document["attributes"] = to_plain(attributes)
    target.mkdir()
    (target / "model.json").write_text(json.dumps(document))
    shutil.copy(path / "model.safetensors", target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("labels"), "keys \\['labels'\\] are missing"),
        (lambda s: s["fingerprint"].pop("counts"), "fingerprint.counts"),
        (lambda s: s.update(registry_version=0), "version 0"),
        (lambda s: s["fingerprint"].update(radius=2), "do not reproduce the fingerprints"),
        (lambda s: s["fingerprint"].update(n_bits=1024), "do not fit the model"),
        (lambda s: s["smiles"].pop(), "3 perturbations but 2 SMILES"),
    ],
    ids=[
        "removed key",
        "removed fingerprint key",
        "other version",
        "changed radius",
        "changed fingerprint size",
        "inconsistent",
    ],
)
@pytest.mark.parametrize("with_adata", [True, False], ids=["with adata", "without adata"])
def test_loading_a_changed_registry_is_a_clear_error(saved, tmp_path, edit, match, with_adata):
    _, adata, path = saved
    old = _edit_saved_registry(path, tmp_path / "old", edit)
    fresh = adata.copy()
    obsm_before = set(fresh.obsm)
    with pytest.raises(ValueError, match=match):
        PerturbX.load(old, adata=fresh if with_adata else None)
    assert set(fresh.obsm) == obsm_before


def test_registry_without_version_key_is_read_as_version_one(saved, tmp_path):
    model, adata, path = saved
    old = _edit_saved_registry(path, tmp_path / "old", lambda s: s.pop("registry_version"))
    loaded = PerturbX.load(old, adata=adata)
    assert loaded.perturbations == model.perturbations
