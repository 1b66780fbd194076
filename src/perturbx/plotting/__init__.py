"""Plots for perturbx models and results, in scanpy style.

Every function draws into given axes (``ax=``) or a new figure, saves it when ``save`` is a
path, shows it when ``show=True`` (``None``: only in interactive sessions without ``save``)
and returns the axes (a list of axes for multi-panel plots).

- :func:`dose_response`: predicted vs measured dose-response curves, one panel per drug.
- :func:`training_history`: loss components and adversary accuracy over epochs.
- :func:`latent_embedding`: basal vs full latent space (UMAP or PCA) side by side.
- :func:`lfc_scatter`: predicted vs true log-fold changes of one condition's top genes.
- :func:`evaluation_summary`: methods compared across metrics of
  :func:`perturbx.metrics.score`.
"""

from perturbx.plotting._dose import dose_response
from perturbx.plotting._evaluation import evaluation_summary
from perturbx.plotting._history import training_history
from perturbx.plotting._latent import latent_embedding
from perturbx.plotting._lfc import lfc_scatter

__all__ = [
    "dose_response",
    "evaluation_summary",
    "latent_embedding",
    "lfc_scatter",
    "training_history",
]
