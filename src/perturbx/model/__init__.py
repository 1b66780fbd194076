"""The user-facing models and the counterfactual pipeline around them.

:class:`PerturbX` (a thin scvi-tools model class) mixes in prediction
(:mod:`perturbx.model._prediction`) and evaluation (:mod:`perturbx.model._evaluation`);
target conditions are resolved in :mod:`perturbx.model._targets`; :class:`PerturbXEnsemble`
averages several models; model files are written and read by :mod:`perturbx.model._files`.
"""

from perturbx.model._ensemble import PerturbXEnsemble
from perturbx.model._files import UnsafeModelFileError
from perturbx.model._perturbx import PerturbX

__all__ = ["PerturbX", "PerturbXEnsemble", "UnsafeModelFileError"]
