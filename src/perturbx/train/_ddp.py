"""Data-parallel (DDP) plumbing of the training plan: the strategy and gradient averaging."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

# Newer torch renames DDP's broadcast_buffers (buffer sync before every forward).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _several_processes(devices: Any, num_nodes: int) -> bool:
    """Whether Lightning's ``devices`` / ``num_nodes`` ask for more than one process."""
    if num_nodes > 1:
        return True
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str):
        if "," in devices:  # "0,1": device indices
            return len([d for d in devices.split(",") if d.strip()]) > 1
        if not devices.strip().lstrip("-").isdigit():  # "auto"
            return False
        devices = int(devices)
    return isinstance(devices, int) and (devices > 1 or devices == -1)


def resolve_ddp_strategy(strategy: Any = "auto", devices: Any = "auto", num_nodes: int = 1) -> Any:
    """The Lightning strategy that trains PerturbX correctly on the requested processes.

    Every minibatch leaves some parameters out of the loss: adversary steps use only the
    adversaries (the basal latent is computed without gradients), autoencoder steps may not
    reach the dose response (a batch of controls). DDP must therefore look for unused
    parameters, so the names ``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``
    and their ``_find_unused_parameters_true`` forms all become
    ``DDPStrategy(find_unused_parameters=True, start_method=...)``, and so does the default
    ``"auto"`` when several devices or nodes are requested (Lightning would otherwise pick a
    DDP set-up that fails at the first adversary step). Buffers (drug fingerprints) never
    change during training, so they are synchronised once, not before every step.

    Parameters
    ----------
    strategy
        A value of the Lightning ``Trainer(strategy=...)`` argument (``None``: ``"auto"``).
    devices, num_nodes
        The Lightning ``Trainer`` arguments of the same names.

    Returns
    -------
    The strategy to pass to Lightning: a new :class:`~lightning.pytorch.strategies.DDPStrategy`
    for a DDP name, anything else unchanged.

    Raises
    ------
    ValueError
        For a DDP strategy (name or instance) with ``find_unused_parameters=False``, which
        fails at the first adversary step.
    """
    if strategy is None or strategy == "auto":
        strategy = "ddp" if _several_processes(devices, num_nodes) else "auto"
    if isinstance(strategy, DDPStrategy):
        # DDPStrategy keeps the DistributedDataParallel arguments in _ddp_kwargs.
        if not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False):
            raise ValueError(
                "strategy=DDPStrategy(...) needs find_unused_parameters=True: adversary and "
                "autoencoder steps each leave some parameters unused. Pass strategy='ddp' to get "
                "a suitable DDPStrategy."
            )
        return strategy
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    if entry["strategy"] is not DDPStrategy:
        return strategy
    init_params = dict(entry["init_params"])
    if init_params.get("find_unused_parameters") is False:
        raise ValueError(
            f"strategy={strategy!r} cannot train PerturbX: adversary and autoencoder steps each "
            "leave some parameters unused. Use strategy='ddp' (PerturbX turns on "
            "find_unused_parameters itself)."
        )
    init_params.update(find_unused_parameters=True, **_NO_BUFFER_SYNC)
    return DDPStrategy(**init_params)


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average ``params``' gradients over all processes in one all-reduce, as DDP would.

    A parameter without a gradient on a process (an adversary whose labels are all missing
    from the batch) counts as zero there, like DDP's unused parameters; one without a
    gradient on every process keeps ``grad = None``, so that every process steps the same
    parameters.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor(
        [p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device
    )
    flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
    torch.distributed.all_reduce(flat)
    n_with_grad = flat[-len(params) :].tolist()
    offset = 0
    for p, n in zip(params, n_with_grad, strict=True):
        size = p.numel()
        p.grad = flat[offset : offset + size].view_as(p) / world_size if n else None
        offset += size
