"""Data-parallel training (DDP) on two CPU processes with the gloo backend.

Lightning's ``"ddp"`` strategy re-runs the calling script for every extra process, so the
training runs in ``tests/ddp_script.py`` in a subprocess (~30 s on 2 cores); this module
checks what it wrote. The strategy mapping is checked in-process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from perturbx import PerturbX
from perturbx.train import resolve_ddp_strategy

SCRIPT = Path(__file__).with_name("ddp_script.py")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher's variables would make Lightning skip the launch
    # A session of its own, so that a hang (ranks waiting for each other) can be ended with
    # rank 1, which rank 0 launched, instead of leaving it behind.
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("DDP training did not finish within 300 s (processes waiting for each other?)")
    assert process.returncode == 0, stderr[-4000:]
    return out


def _info(out: Path, rank: int) -> dict:
    return json.loads((out / f"info_rank{rank}.json").read_text())


def _weights(out: Path, rank: int) -> dict:
    return torch.load(out / f"weights_rank{rank}.pt")


def test_two_processes_split_the_training_cells(ddp_run):
    infos = [_info(ddp_run, rank) for rank in (0, 1)]
    assert [info["rank"] for info in infos] == [0, 1]
    assert all(info["world_size"] == 2 for info in infos)
    n_train, batch_size = infos[0]["n_train"], infos[0]["batch_size"]
    per_rank = math.ceil(n_train / 2)  # DistributedSampler: half the cells each
    n_batches = math.ceil(per_rank / batch_size)
    for info in infos:
        for cells in info["cells_per_batch"]:
            assert len(cells) == n_batches
            assert sum(cells) == per_rank
    # The ranks saw different cells that together are the training set (no padding: even).
    assert n_train % 2 == 0
    adata = PerturbX.load(str(ddp_run / "saved_by_rank0")).adata
    train = np.asarray(adata.obs["split"] == "train")
    total = float(adata.X[train].sum())
    for epoch in range(len(infos[0]["counts_per_epoch"])):
        seen = [info["counts_per_epoch"][epoch] for info in infos]
        assert seen[0] != seen[1]
        assert sum(seen) == pytest.approx(total, rel=1e-9)


def test_processes_take_the_same_optimiser_steps(ddp_run):
    infos = [_info(ddp_run, rank) for rank in (0, 1)]
    n_batches = len(infos[0]["cells_per_batch"][0])
    # One optimiser step per minibatch: the adversaries' or the autoencoder's (whose
    # optimiser also holds the dose response).
    n_epochs = len(infos[0]["cells_per_batch"])
    assert infos[0]["global_step"] == infos[1]["global_step"] == n_batches * n_epochs


def test_processes_end_with_identical_trained_weights(ddp_run):
    rank0, rank1 = _weights(ddp_run, 0), _weights(ddp_run, 1)
    assert rank0["final"].keys() == rank1["final"].keys()
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), name
    changed = [
        name
        for name, value in rank0["final"].items()
        if value.is_floating_point() and not torch.equal(value, rank0["initial"][name])
    ]
    for prefix in ("encoder", "decoder", "perturbation_adversary", "dose_response"):
        assert any(name.startswith(prefix) for name in changed), prefix


def test_model_is_saved_once_and_loads(ddp_run):
    saved = sorted(p.name for p in ddp_run.glob("saved_by_rank*"))
    assert saved == ["saved_by_rank0"]
    model = PerturbX.load(str(ddp_run / "saved_by_rank0"))
    final = _weights(ddp_run, 0)["final"]
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_history_is_the_mean_over_all_processes_and_loss_decreases(ddp_run):
    info = _info(ddp_run, 0)
    history = info["history"]
    # The last validation pass used the final weights; its logged value must be the mean
    # over all validation cells (both ranks' halves), recomputed here on rank 0.
    assert history["reconstruction_loss_validation"][-1] == pytest.approx(
        info["validation_reconstruction"], rel=1e-5
    )
    for key in ("reconstruction_loss_train", "reconstruction_loss_validation"):
        assert history[key][-1] < 0.95 * history[key][0], key
    assert "history" not in _info(ddp_run, 1)


def test_adversary_gradients_are_averaged_like_ddp(ddp_run):
    # Rank r set a = r + 1; b = 4 on rank 1 only; c nowhere (see ddp_script.py).
    for rank in (0, 1):
        a, b, c = _info(ddp_run, rank)["averaged_gradients"]
        assert a == [1.5, 1.5]
        assert b == [2.0, 2.0]  # missing counts as zero, as for DDP's unused parameters
        assert c is None


def test_a_nan_on_one_process_stops_both(ddp_run):
    assert _info(ddp_run, 1)["fault"].startswith("NonFiniteLossError: The adversary_loss")
    assert _info(ddp_run, 0)["fault"].startswith(
        "NonFiniteLossError: A loss term became NaN or infinite on another process"
    )


@pytest.mark.parametrize(
    ("name", "start_method"),
    [
        ("ddp", "popen"),
        ("ddp_find_unused_parameters_true", "popen"),
        ("ddp_spawn", "spawn"),
        ("ddp_notebook", "fork"),
    ],
)
def test_ddp_names_become_a_strategy_that_finds_unused_parameters(name, start_method):
    strategy = resolve_ddp_strategy(name)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    assert strategy._start_method == start_method


@pytest.mark.parametrize(
    ("devices", "num_nodes"), [(2, 1), ("2", 1), ([0, 1], 1), ("0,1", 1), (-1, 1), (1, 2)]
)
def test_several_devices_without_a_strategy_get_ddp(devices, num_nodes):
    for strategy in ("auto", None):
        resolved = resolve_ddp_strategy(strategy, devices, num_nodes)
        assert isinstance(resolved, DDPStrategy)
        assert resolved._ddp_kwargs["find_unused_parameters"] is True


@pytest.mark.parametrize("devices", ["auto", 1, "1", [0], "0,"])
def test_one_device_keeps_the_default_strategy(devices):
    assert resolve_ddp_strategy("auto", devices) == "auto"
    assert resolve_ddp_strategy(None, devices) == "auto"


def test_other_strategies_pass_through_and_bad_ddp_is_refused():
    assert resolve_ddp_strategy("single_device", devices=2) == "single_device"
    custom = DDPStrategy(find_unused_parameters=True)
    assert resolve_ddp_strategy(custom) is custom
    with pytest.raises(ValueError, match="find_unused_parameters"):
        resolve_ddp_strategy("ddp_find_unused_parameters_false")
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        resolve_ddp_strategy(DDPStrategy())
