"""Training: the plan that alternates autoencoder and adversary steps, and its DDP plumbing.

:class:`PerturbXTrainingPlan` (Lightning, manual optimisation) holds the optimisation;
:func:`resolve_ddp_strategy` and :func:`average_gradients` make it data-parallel.
"""

from perturbx.train._ddp import average_gradients, resolve_ddp_strategy
from perturbx.train._plan import NonFiniteLossError, PerturbXTrainingPlan, check_plan_kwargs

__all__ = [
    "NonFiniteLossError",
    "PerturbXTrainingPlan",
    "average_gradients",
    "check_plan_kwargs",
    "resolve_ddp_strategy",
]
