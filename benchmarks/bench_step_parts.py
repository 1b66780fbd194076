"""Where a training step's time goes: milliseconds per part, outside Lightning.

Usage::

    python benchmarks/bench_step_parts.py                 # CPA architecture, batch 128
    python benchmarks/bench_step_parts.py --rounds 5 --compile

Builds the screen and model of ``bench_training.py`` (20k × 2,000 simulated NB counts, sparse;
CPA architecture), draws ``--n-batches`` minibatches from the model's data loader once, and
replays them ``--rounds`` times through the two kinds of step of
:class:`perturbx.train.PerturbXTrainingPlan`, timing each part with ``time.perf_counter``
(torch on CPU runs synchronously):

- autoencoder step: ``inference``, ``generative``, ``loss``, ``adversary_losses`` on the basal
  latent, backward, optimiser step;
- adversary step: ``inference`` without gradients, adversary loss, the gradient penalty's
  input gradient, backward, optimiser step.

Printed: the median over rounds of each part's mean per step. Data loading and Lightning's
per-batch work are not included (``bench_training.py`` measures the whole of ``Trainer.fit``).
``--compile``: also time the autoencoder step with its forward computation wrapped in
``torch.compile`` (default options), against the eager one, alternating per round. Dynamo
recompiles whenever a minibatch's number of distinct perturbations changes (the embedding
tables' shapes) and stops recompiling at its limit, and the compiled backward of the tables'
``index_put`` prints autograd warnings; the figures are still what the compiled step costs.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from bench_training import CPA_ARCHITECTURE


def build(n_cells: int, n_genes: int, batch_size: int, n_batches: int, seed: int = 0):
    """Training plan (with the default loss weights), its optimisers and ``n_batches``
    minibatches of the benchmark screen."""
    import perturbx
    from perturbx.train import PerturbXTrainingPlan

    adata = perturbx.data.simulate_drug_screen(n_cells=n_cells, n_genes=n_genes, seed=seed)
    perturbx.PerturbX.setup_anndata(
        adata,
        perturbation_key="drug",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
    )
    model = perturbx.PerturbX(adata, **CPA_ARCHITECTURE)
    loader = model._make_data_loader(adata, batch_size=batch_size, shuffle=True)
    batches = [batch for _, batch in zip(range(n_batches), loader, strict=False)]
    model.module.train()
    plan = PerturbXTrainingPlan(model.module)
    return plan, plan.configure_optimizers(), batches


class Clock:
    """Accumulates the time between successive ``lap(name)`` calls under ``name``."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] += now - self._last
        self._last = now


def autoencoder_forward(module, batch, adversary_weight: float, clock=None):
    """The autoencoder step's loss (reconstruction + KL + weight · adversary confusion)."""
    inference = module.inference(**module._get_inference_input(batch))
    clock and clock.lap("inference")
    generative = module.generative(**module._get_generative_input(batch, inference))
    clock and clock.lap("generative")
    loss = module.loss(batch, inference, generative).loss
    clock and clock.lap("loss")
    confusion = module.adversary_losses(module.adversary_latent(inference), batch).confusion
    clock and clock.lap("adversary losses")
    return loss + adversary_weight * confusion


def autoencoder_step(plan, optimiser, batch, clock: Clock, compiled=None):
    """One autoencoder step; ``compiled``: a compiled :func:`autoencoder_forward` to use."""
    clock.start()
    if compiled is None:
        total = autoencoder_forward(plan.module, batch, plan.adversary_weight, clock=clock)
    else:
        total = compiled(plan.module, batch, plan.adversary_weight)
        clock.lap("forward (compiled)")
    optimiser.zero_grad()
    total.backward()
    clock.lap("backward")
    optimiser.step()
    clock.lap("optimiser step")


def adversary_step(plan, optimiser, batch, clock: Clock):
    """One adversary step (cross-entropy + gradient penalty on the detached basal latent)."""
    module = plan.module
    clock.start()
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(batch))
        basal = module.adversary_latent(inference)
    clock.lap("inference (no grad)")
    basal.requires_grad_(True)
    loss = module.adversary_losses(basal, batch).cross_entropy
    clock.lap("adversary losses")
    (gradient,) = torch.autograd.grad(loss, basal, create_graph=True)
    penalty = gradient.pow(2).sum(-1).mean()
    clock.lap("gradient penalty")
    optimiser.zero_grad()
    (loss + plan.gradient_penalty * penalty).backward()
    clock.lap("backward")
    optimiser.step()
    clock.lap("optimiser step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the autoencoder step with a compiled forward",
    )
    args = parser.parse_args()

    plan, (autoencoder_opt, adversary_opt), batches = build(
        args.n_cells, args.n_genes, args.batch_size, args.n_batches
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{len(batches)} batches of {args.batch_size} cells"
    )
    variants = {"eager": None}
    if args.compile:
        compiled = torch.compile(autoencoder_forward)
        start = time.perf_counter()
        autoencoder_step(plan, autoencoder_opt, batches[0], Clock(), compiled)
        print(f"first compiled step (compilation): {time.perf_counter() - start:.1f} s")
        variants["compiled"] = compiled
    per_round: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, compiled_forward in variants.items():
            clock = Clock()
            for batch in batches:
                autoencoder_step(plan, autoencoder_opt, batch, clock, compiled_forward)
            for part, seconds in clock.totals.items():
                per_round[f"{name} autoencoder step: {part}"].append(seconds / len(batches))
            per_round[f"{name} autoencoder step: total"].append(
                sum(clock.totals.values()) / len(batches)
            )
        clock = Clock()
        for batch in batches:
            adversary_step(plan, adversary_opt, batch, clock)
        for part, seconds in clock.totals.items():
            per_round[f"adversary step: {part}"].append(seconds / len(batches))
        per_round["adversary step: total"].append(sum(clock.totals.values()) / len(batches))
    print(f"\n{'part':<50} {'ms/step':>8} {'range':>13}")
    for part, values in per_round.items():
        ms = 1e3 * np.asarray(values)
        print(f"{part:<50} {np.median(ms):>8.2f} {ms.min():>6.2f}-{ms.max():<6.2f}")


if __name__ == "__main__":
    main()
