"""Feature-based reference predictors: a linear (ridge) baseline and the additive baseline.

Both predict the pseudobulk mean of a condition in log-normalised space (as
:func:`perturbx.metrics.pseudobulk`) from the measured means of the *training* cells, and
return one row per target condition, ready for :func:`perturbx.metrics.score` next to a
model's predictions (``method_key``). The baselines without features (control mean,
perturbed centroid, interpolated duplicate) live in :mod:`perturbx.metrics`.

* :func:`linear_baseline` regresses each training condition's delta against its controls
  (same covariates) on the features of its perturbations with ridge regression, then
  predicts ``control + delta`` for new conditions. With fingerprints as features it
  predicts drugs never seen in training; doses enter as ``features × log10(1 + dose)``.
* :func:`kernel_ridge_baseline` does the same with a MinMax (Tanimoto) kernel on
  fingerprints: a new molecule's delta is a similarity-weighted combination of the training
  molecules', falling back to the mean delta for molecules unlike any of them.
* :func:`transferred_response_baseline` predicts a condition in a new group (patient, donor)
  as that group's controls plus the other groups' mean response: the mean baseline of
  covariate transfer.
* :func:`additive_baseline` predicts a combination as the control plus the sum of its
  members' measured single deltas (at the same doses and covariates). It is known to be hard
  to beat on combinatorial genetic screens (Ahlmann-Eltze, Huber & Anders, 2025).
"""

from perturbx.baselines._features import (
    DEFAULT_ALPHAS,
    DEFAULT_DOSE_WIDTHS,
    DEFAULT_KERNEL_ALPHAS,
    kernel_ridge_baseline,
    linear_baseline,
)
from perturbx.baselines._measured import additive_baseline, transferred_response_baseline

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_DOSE_WIDTHS",
    "DEFAULT_KERNEL_ALPHAS",
    "additive_baseline",
    "kernel_ridge_baseline",
    "linear_baseline",
    "transferred_response_baseline",
]
