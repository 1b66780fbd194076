"""Training plan: alternating autoencoder / adversary optimisation (Lightning, manual mode)."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass
from scvi.train import TrainingPlan


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class PerturbXTrainingPlan(TrainingPlan):
    """Optimises a :class:`~perturbx.module.PerturbXModule` with adversarial disentanglement.

    Each minibatch makes one autoencoder step, minimising
    ``reconstruction (+ KL) − λ · adversary cross-entropy(basal latent)``, then
    ``adversary_steps`` adversary steps on the detached basal latent, minimising
    ``cross-entropy + gradient_penalty · ‖∂ cross-entropy / ∂ basal‖²``. ``λ`` ramps linearly
    from 0 to ``adversary_weight`` over ``n_epochs_adversary_warmup`` epochs so that the
    autoencoder first learns to reconstruct. Autoencoder, dose response and adversaries have
    separate Adam optimisers and learning rates.

    Parameters
    ----------
    module
        The module to train.
    lr, weight_decay
        Autoencoder (encoder, decoder, embeddings, drug encoder) optimiser.
    dose_lr, dose_weight_decay
        Dose-response optimiser.
    adversary_lr, adversary_weight_decay
        Adversary optimiser.
    adversary_weight
        Final ``λ``.
    adversary_steps
        Adversary updates per minibatch.
    n_epochs_adversary_warmup
        Epochs over which ``λ`` ramps up (0: full weight from the start).
    gradient_penalty
        Weight of the adversaries' input-gradient penalty.
    gradient_clip_val
        Clip the autoencoder's gradient norm to this value (``None``: no clipping).
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
        adversary_lr: float = 1e-3,
        adversary_weight_decay: float = 1e-5,
        adversary_weight: float = 5.0,
        adversary_steps: int = 2,
        n_epochs_adversary_warmup: int = 5,
        gradient_penalty: float = 1.0,
        gradient_clip_val: float | None = None,
        **kwargs,
    ):
        kwargs.setdefault("n_epochs_kl_warmup", 10)
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        if adversary_steps < 0:
            raise ValueError(f"adversary_steps={adversary_steps} must be >= 0.")
        self.dose_lr = dose_lr
        self.dose_weight_decay = dose_weight_decay
        self.adversary_lr = adversary_lr
        self.adversary_weight_decay = adversary_weight_decay
        self.adversary_weight = adversary_weight
        self.adversary_steps = adversary_steps
        self.n_epochs_adversary_warmup = n_epochs_adversary_warmup
        self.gradient_penalty = gradient_penalty
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = False

    @property
    def adversary_lambda(self) -> float:
        """Current weight ``λ`` of the adversarial term."""
        if self.n_epochs_adversary_warmup <= 0:
            return self.adversary_weight
        return self.adversary_weight * min(1.0, self.current_epoch / self.n_epochs_adversary_warmup)

    def _check_finite(self, **terms: torch.Tensor) -> None:
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(
                    f"The {name} became {value.item()} at epoch {self.current_epoch}, step "
                    f"{self.global_step}. Lower the learning rates (plan_kwargs lr / "
                    "adversary_lr), set plan_kwargs gradient_clip_val, or check the input for "
                    "extreme values."
                )

    def _log_adversary(self, loss: torch.Tensor, accuracy: dict, mode: str, n: int) -> None:
        self.log(f"adversary_loss_{mode}", loss.detach(), on_epoch=True, on_step=False, batch_size=n)
        for name, value in accuracy.items():
            self.log(
                f"adversary_accuracy_{name}_{mode}", value, on_epoch=True, on_step=False, batch_size=n
            )

    def training_step(self, batch, batch_idx):
        """One autoencoder step, then ``adversary_steps`` adversary steps."""
        if "kl_weight" in self.loss_kwargs:
            self.loss_kwargs["kl_weight"] = self.kl_weight
        autoencoder_opt, dose_opt, adversary_opt = self.optimizers()

        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        basal = inference_outputs["basal_latent"]
        adversary_loss, accuracy = self.module.adversary_losses(basal, batch)
        self._check_finite(reconstruction_loss=loss_output.loss, adversary_loss=adversary_loss)
        total = loss_output.loss - self.adversary_lambda * adversary_loss

        autoencoder_opt.zero_grad()
        dose_opt.zero_grad()
        self.manual_backward(total)
        if self.gradient_clip_val is not None:
            self.clip_gradients(autoencoder_opt, gradient_clip_val=self.gradient_clip_val)
        autoencoder_opt.step()
        dose_opt.step()

        basal = basal.detach()
        for _ in range(self.adversary_steps):
            basal_input = basal.clone().requires_grad_(True)
            loss, _ = self.module.adversary_losses(basal_input, batch)
            (grad,) = torch.autograd.grad(loss, basal_input, create_graph=True)
            penalty = grad.pow(2).sum(-1).mean()
            adversary_opt.zero_grad()
            self.manual_backward(loss + self.gradient_penalty * penalty)
            adversary_opt.step()

        n = basal.shape[0]
        self.log("train_loss", total.detach(), on_epoch=True, on_step=False, prog_bar=True, batch_size=n)
        self.log("adversary_lambda", self.adversary_lambda, on_epoch=True, on_step=False, batch_size=n)
        self._log_adversary(adversary_loss, accuracy, "train", n)
        self.compute_and_log_metrics(loss_output, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx):
        """Reconstruction and adversary metrics on validation cells."""
        inference_outputs, _, loss_output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        adversary_loss, accuracy = self.module.adversary_losses(
            inference_outputs["basal_latent"], batch
        )
        n = inference_outputs["basal_latent"].shape[0]
        self.log("validation_loss", loss_output.loss, on_epoch=True, on_step=False, batch_size=n)
        self._log_adversary(adversary_loss, accuracy, "validation", n)
        self.compute_and_log_metrics(loss_output, self.val_metrics, "validation")

    def configure_optimizers(self):
        """Three Adam optimisers: autoencoder, dose response, adversaries."""
        groups = self.module.parameter_groups()
        # foreach: one vectorised update per optimiser instead of one per tensor.
        return [
            torch.optim.Adam(
                groups["autoencoder"], lr=self.lr, weight_decay=self.weight_decay, foreach=True
            ),
            torch.optim.Adam(
                groups["dose_response"],
                lr=self.dose_lr,
                weight_decay=self.dose_weight_decay,
                foreach=True,
            ),
            torch.optim.Adam(
                groups["adversary"],
                lr=self.adversary_lr,
                weight_decay=self.adversary_weight_decay,
                foreach=True,
            ),
        ]
