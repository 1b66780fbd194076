"""perturbx: predict single-cell responses to perturbations, including unseen molecules.

``perturbx.PerturbX`` is the model (scvi-tools) and ``perturbx.PerturbXEnsemble`` averages
several of them; ``perturbx.metrics`` scores anyone's predictions without torch;
``perturbx.data`` holds the simulator and the splits;
``perturbx.datasets`` loads real screens; ``perturbx.plotting`` draws the figures;
``perturbx.baselines`` holds the linear and additive baselines; ``perturbx.tune`` runs
hyperparameter searches (optional extra ``perturbx[tune]``).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("perturbx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_SUBMODULES = (
    "baselines",
    "chem",
    "data",
    "datasets",
    "metrics",
    "model",
    "module",
    "plotting",
    "train",
    "tune",
)
__all__ = ["PerturbX", "PerturbXEnsemble", "__version__", *_SUBMODULES]


def __getattr__(name: str):
    # Lazy: `import perturbx.metrics` must not pull in torch and scvi-tools.
    if name == "PerturbX":
        from perturbx.model import PerturbX

        return PerturbX
    if name == "PerturbXEnsemble":
        from perturbx.model import PerturbXEnsemble

        return PerturbXEnsemble
    if name in _SUBMODULES:
        return import_module(f"perturbx.{name}")
    raise AttributeError(f"module 'perturbx' has no attribute {name!r}")
