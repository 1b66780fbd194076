"""Training plan: alternating autoencoder / adversary optimisation (Lightning, manual mode)."""

from __future__ import annotations

import difflib
import inspect

import torch
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan

from perturbx.train._ddp import average_gradients


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class PerturbXTrainingPlan(TrainingPlan):
    """Optimises a :class:`~perturbx.module.PerturbXModule` with adversarial disentanglement.

    Minibatches alternate between two kinds of step. One in every ``adversary_every``
    batches trains the adversaries on the (detached) basal latent's posterior mean
    (:meth:`~perturbx.module.PerturbXModule.adversary_latent`), minimising
    ``cross-entropy + gradient_penalty · ‖∂ cross-entropy / ∂ basal‖²``; the other batches
    train the autoencoder, minimising ``reconstruction (+ KL) + λ · adversary confusion``
    (the KL divergence from the minibatch's label frequencies to the adversaries'
    predictions, :meth:`~perturbx.module.PerturbXModule.adversary_losses`). Confusion, not
    ``− λ · cross-entropy``: maximising the adversaries' cross-entropy rewards making them
    confidently wrong, which keeps the information with the labels swapped, and the
    adversaries' accuracy then swings between 0 and chance from epoch to epoch.
    ``λ`` ramps linearly from 0 to ``adversary_weight`` over ``n_epochs_adversary_warmup``
    epochs so that the autoencoder first learns to reconstruct. Autoencoder, dose response
    and adversaries have separate learning rates (autoencoder and dose response share one Adam
    optimiser as parameter groups, the adversaries have their own). The gene-wise NB inverse
    dispersion of counts likelihoods is a third group of the autoencoder's optimiser, with its
    own learning rate ``dispersion_lr``: from its initial value 1 it must travel to the data's
    (typically 2-10 for single-cell counts), which at ``lr`` takes hundreds of epochs; an
    under-estimated dispersion makes predicted (sampled) cells too noisy and their
    log-normalised means too low.

    Logged once per epoch (``model.history``): ``reconstruction_loss_{train,validation}``,
    ``elbo_*``, ``adversary_loss_*`` (cross-entropy), ``adversary_confusion_*``,
    ``adversary_accuracy_<label>_*`` (on the basal latent's posterior mean; chance level is
    the frequency of the most common label), ``adversary_lambda``, and
    ``linearity_penalty_train`` when that penalty is on.

    Several processes (DDP, :func:`resolve_ddp_strategy`): every process sees as many
    batches as the others, so all take the same sequence of adversary / autoencoder steps;
    autoencoder steps average all gradients through DDP, adversary steps average only the
    adversaries' (one all-reduce); a non-finite loss on any process stops all of them; the
    logged epoch means are averaged over processes.

    Parameters
    ----------
    module
        The module to train.
    lr, weight_decay
        Autoencoder (encoder, decoder, embeddings, drug encoder) optimiser.
    dose_lr, dose_weight_decay
        Dose-response optimiser.
    dispersion_lr
        Learning rate of the gene-wise NB inverse dispersion (counts likelihoods; no weight
        decay, which would pull it towards 1).
    adversary_lr, adversary_weight_decay
        Adversary optimiser.
    adversary_weight
        Final ``λ``.
    adversary_every
        One adversary step every this many minibatches (``2``: strict alternation).
    n_epochs_adversary_warmup
        Epochs over which ``λ`` ramps up (0: full weight from the start).
    gradient_penalty
        Weight of the adversaries' input-gradient penalty.
    linearity_penalty
        Weight of :meth:`~perturbx.module.PerturbXModule.embedding_linearity_penalty`
        (0: off, no extra cost), which asks the decoder to respond linearly between the
        perturbation shifts of a minibatch, so that embeddings of unseen drugs that
        interpolate between training drugs' decode to interpolated effects. Logged as
        ``linearity_penalty_train``.
    gradient_clip_val
        Clip the gradient norm of autoencoder and dose response together to this value
        (``None``: no clipping).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (e.g. ``n_epochs_kl_warmup``).
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        dose_lr: float = 1e-3,
        dose_weight_decay: float = 1e-7,
        dispersion_lr: float = 1e-2,
        adversary_lr: float = 1e-3,
        adversary_weight_decay: float = 1e-5,
        adversary_weight: float = 100.0,
        adversary_every: int = 3,
        n_epochs_adversary_warmup: int = 5,
        gradient_penalty: float = 1.0,
        linearity_penalty: float = 0.0,
        gradient_clip_val: float | None = None,
        **kwargs,
    ):
        kwargs.setdefault("n_epochs_kl_warmup", 10)
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        if adversary_every < 2:
            raise ValueError(
                f"adversary_every={adversary_every} must be >= 2 (one adversary step every "
                "that many minibatches, autoencoder steps in between)."
            )
        if not linearity_penalty >= 0:
            raise ValueError(f"linearity_penalty={linearity_penalty!r} must be >= 0.")
        if linearity_penalty > 0 and getattr(module, "shift_head", None) is not None:
            raise ValueError(
                f"linearity_penalty={linearity_penalty!r} does not apply to a model with "
                "linear_shift_head=True: its decoder is linear in the perturbation shift by "
                "construction."
            )
        self.linearity_penalty = linearity_penalty
        self.dose_lr = dose_lr
        self.dose_weight_decay = dose_weight_decay
        self.dispersion_lr = dispersion_lr
        self.adversary_lr = adversary_lr
        self.adversary_weight_decay = adversary_weight_decay
        self.adversary_weight = adversary_weight
        self.adversary_every = adversary_every
        self.n_epochs_adversary_warmup = n_epochs_adversary_warmup
        self.gradient_penalty = gradient_penalty
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = False
        self._sums: dict[str, dict[str, list]] = {"train": {}, "validation": {}}

    @property
    def adversary_lambda(self) -> float:
        """Current weight ``λ`` of the adversarial term."""
        if self.n_epochs_adversary_warmup <= 0:
            return self.adversary_weight
        return self.adversary_weight * min(1.0, self.current_epoch / self.n_epochs_adversary_warmup)

    def _check_finite(self, **terms: torch.Tensor) -> None:
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        if self._trainer is not None and self.trainer.world_size > 1:
            # All processes must stop at the same step: one that raised alone would leave the
            # others waiting in the next gradient all-reduce.
            all_finite = self.trainer.strategy.reduce_boolean_decision(not bad, all=True)
            if all_finite:
                return
            if not bad:
                raise NonFiniteLossError(
                    f"A loss term became NaN or infinite on another process at epoch "
                    f"{self.current_epoch}, step {self.global_step} (see that process's error)."
                )
        if bad:
            name = bad[0]
            raise NonFiniteLossError(
                f"The {name} became {terms[name].item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}. Lower the learning rates (plan_kwargs lr / "
                "adversary_lr), set plan_kwargs gradient_clip_val, or check the input for "
                "extreme values."
            )

    # Per-step self.log calls cost more than a small step here; sum tensors and log per epoch.
    def _accumulate(self, mode: str, n: int, **values: torch.Tensor) -> None:
        sums = self._sums[mode]
        for key, value in values.items():
            total = sums.setdefault(key, [0.0, 0])
            total[0] = total[0] + value.detach() * n
            total[1] += n

    def _log_epoch(self, mode: str) -> None:
        # sync_dist (a no-op on one process) averages the per-process means under DDP. Its
        # distributed sampler gives every process the same number of cells (padding with a
        # few repeats), so that is the mean over all cells, and all ranks log the same keys.
        for key, (total, n) in self._sums[mode].items():
            self.log(
                f"{key}_{mode}",
                total / n,
                prog_bar=key == "loss" and mode == "train",
                sync_dist=True,
            )
        self._sums[mode] = {}

    def _metrics(self, loss_output, adversary) -> dict[str, torch.Tensor]:
        reconstruction = loss_output.reconstruction_loss_sum / loss_output.n_obs_minibatch
        kl = loss_output.kl_local_sum / loss_output.n_obs_minibatch
        metrics = {
            "reconstruction_loss": reconstruction,
            "kl_local": kl,
            "elbo": reconstruction + kl,
            "adversary_loss": adversary.cross_entropy,
            "adversary_confusion": adversary.confusion,
        }
        metrics.update({f"adversary_accuracy_{k}": v for k, v in adversary.accuracy.items()})
        return metrics

    def training_step(self, batch, batch_idx):
        """An adversary step on one in ``adversary_every`` batches, else an autoencoder step."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        autoencoder_opt, adversary_opt = self.optimizers()
        # Steps return their (detached) loss: checkpoint callbacks such as scvi's
        # SaveCheckpoint read it from the batch outputs.
        if batch_idx % self.adversary_every == 0:
            return self._adversary_step(batch, adversary_opt)

        inference_outputs, generative_outputs, loss_output = self.forward(
            batch, loss_kwargs=self.loss_kwargs
        )
        adversary = self.module.adversary_losses(
            self.module.adversary_latent(inference_outputs), batch
        )
        self._check_finite(
            reconstruction_loss=loss_output.loss, adversary_confusion=adversary.confusion
        )
        total = loss_output.loss + self.adversary_lambda * adversary.confusion
        extra = {}
        if self.linearity_penalty > 0:
            extra["linearity_penalty"] = self.module.embedding_linearity_penalty(generative_outputs)
            self._check_finite(linearity_penalty=extra["linearity_penalty"])
            total = total + self.linearity_penalty * extra["linearity_penalty"]
        autoencoder_opt.zero_grad()
        self.manual_backward(total)
        if self.gradient_clip_val is not None:
            self.clip_gradients(autoencoder_opt, gradient_clip_val=self.gradient_clip_val)
        autoencoder_opt.step()
        self._accumulate(
            "train",
            loss_output.n_obs_minibatch,
            loss=total,
            **self._metrics(loss_output, adversary),
            **extra,
        )
        return total.detach()

    def _adversary_step(self, batch, adversary_opt) -> torch.Tensor:
        with torch.no_grad():
            inference_outputs = self.module.encode(batch)
            basal = self.module.adversary_latent(inference_outputs)
        basal.requires_grad_(True)
        loss = self.module.adversary_losses(basal, batch).cross_entropy
        self._check_finite(adversary_loss=loss)
        (grad,) = torch.autograd.grad(loss, basal, create_graph=True)
        penalty = grad.pow(2).sum(-1).mean()
        adversary_opt.zero_grad()
        if self._trainer is not None and self.trainer.world_size > 1:
            # Only the adversaries have gradients here, but DDP would all-reduce every
            # parameter's (zero) gradient: skip its sync and average the adversaries' alone.
            with self.trainer.strategy.block_backward_sync():
                self.manual_backward(loss + self.gradient_penalty * penalty)
            average_gradients(
                [p for group in adversary_opt.param_groups for p in group["params"]],
                self.trainer.world_size,
            )
        else:
            self.manual_backward(loss + self.gradient_penalty * penalty)
        adversary_opt.step()
        return loss.detach()

    def on_train_epoch_end(self):
        """Log the epoch means of the training metrics."""
        self.log("adversary_lambda", self.adversary_lambda, sync_dist=True)
        self._log_epoch("train")

    def validation_step(self, batch, batch_idx):
        """Reconstruction and adversary metrics on validation cells."""
        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        adversary = self.module.adversary_losses(
            self.module.adversary_latent(inference_outputs), batch
        )
        self._accumulate(
            "validation", loss_output.n_obs_minibatch, **self._metrics(loss_output, adversary)
        )

    def on_validation_epoch_end(self):
        """Log the epoch means of the validation metrics."""
        self._log_epoch("validation")

    def configure_optimizers(self):
        """Two Adam optimisers: autoencoder (with the dose response and the NB dispersion as
        further parameter groups, with their own learning rates) and adversaries.
        """
        groups = self.module.parameter_groups()
        # fused: one kernel per step instead of a chain of foreach kernels (cheaper on CPU);
        # one optimiser for autoencoder, dose response and dispersion: fewer step calls.
        return [
            torch.optim.Adam(
                [
                    {"params": groups["autoencoder"]},
                    {
                        "params": groups["dose_response"],
                        "lr": self.dose_lr,
                        "weight_decay": self.dose_weight_decay,
                    },
                    {"params": groups["dispersion"], "lr": self.dispersion_lr, "weight_decay": 0.0},
                ],
                lr=self.lr,
                weight_decay=self.weight_decay,
                fused=True,
            ),
            torch.optim.Adam(
                groups["adversary"],
                lr=self.adversary_lr,
                weight_decay=self.adversary_weight_decay,
                fused=True,
            ),
        ]


def check_plan_kwargs(plan_kwargs: dict | None) -> None:
    """Raise ``ValueError`` for a ``plan_kwargs`` key that no training plan argument takes.

    scvi's :class:`~scvi.train.TrainingPlan` passes keys it does not know on to the module's
    ``loss()``, so a misspelled key would otherwise fail at the first training step with an
    error that blames ``loss()``.
    """
    if not plan_kwargs:
        return
    known = set()
    for cls in (PerturbXTrainingPlan, TrainingPlan):
        known |= {
            name
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"
        }
    known.discard("module")
    unknown = sorted(set(plan_kwargs) - known)
    if unknown:
        hints = [difflib.get_close_matches(k, sorted(known), n=1) for k in unknown]
        hint = "; ".join(
            f"{k!r}: did you mean {h[0]!r}?" for k, h in zip(unknown, hints, strict=True) if h
        )
        raise ValueError(
            f"plan_kwargs has unknown key(s) {unknown}"
            + (f" ({hint})" if hint else "")
            + f". Known keys: {sorted(known)}."
        )
