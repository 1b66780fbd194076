"""perturbx: predict single-cell responses to perturbations, including unseen molecules."""

from importlib.metadata import PackageNotFoundError, version

from perturbx import data
from perturbx.model import PerturbX

try:
    __version__ = version("perturbx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["PerturbX", "data", "__version__"]
