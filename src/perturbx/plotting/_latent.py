"""Basal vs full latent space side by side: :func:`latent_embedding`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.plotting._utils import _finish, model_keys, panel_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_KINDS = ("basal", "full")
# Silhouette on at most this many cells: it costs O(n²) memory and time.
_SILHOUETTE_MAX_CELLS = 5_000


def _embed(latent: np.ndarray, obs: pd.DataFrame, basis: str, n_neighbors: int, seed: int):
    """An AnnData of the latent with its 2-D ``X_<basis>`` embedding, computed by scanpy."""
    import scanpy as sc

    embedded = AnnData(np.asarray(latent, dtype=np.float32), obs=obs)
    if basis == "pca":
        sc.pp.pca(embedded, n_comps=2, random_state=seed)
    else:
        sc.pp.neighbors(embedded, n_neighbors=n_neighbors, use_rep="X", random_state=seed)
        sc.tl.umap(embedded, random_state=seed)
    return embedded


def _silhouette(latent: np.ndarray, labels: pd.Series, seed: int) -> float:
    """Silhouette of the colour's categories in the latent (NaN if undefined)."""
    from sklearn.metrics import silhouette_score

    codes = pd.factorize(labels)[0]
    n_labels = len(np.unique(codes))
    if not 2 <= n_labels < len(codes):
        return np.nan
    sample = min(len(codes), _SILHOUETTE_MAX_CELLS)
    return float(
        silhouette_score(
            latent, codes, sample_size=sample if sample < len(codes) else None, random_state=seed
        )
    )


def latent_embedding(
    model,
    adata: AnnData | None = None,
    color: str | None = None,
    *,
    basis: Literal["umap", "pca"] = "umap",
    indices: Sequence[int] | None = None,
    n_neighbors: int = 15,
    silhouette: bool = True,
    random_state: int = 0,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    **embedding_kwargs,
) -> list[Axes]:
    """The basal and the full latent space side by side, coloured by an obs column.

    The *basal* latent is the encoder output that the adversaries strip of perturbation and
    covariate information; the *full* latent adds the cell's own (dose-scaled) perturbation
    and covariate embeddings and is what the decoder sees. With good disentanglement the
    colours mix in the basal panel and separate in the full one. Each latent is embedded
    in 2-D on its own with scanpy (``sc.pp.neighbors`` + ``sc.tl.umap``, or ``sc.pp.pca``)
    and drawn with ``sc.pl.embedding``.

    Parameters
    ----------
    model
        A trained :class:`perturbx.PerturbX`.
    adata
        Cells to embed (default: the model's AnnData); registered or transferable to the model.
    color
        obs column to colour by (default: the model's perturbation key), e.g. a covariate.
    basis
        ``"umap"`` (default) or ``"pca"`` (first two principal components; fast).
    indices
        Positions of the cells of ``adata`` to embed (default: all), e.g. a random subset.
    n_neighbors
        Neighbours of the kNN graph for UMAP.
    silhouette
        Put the silhouette score of the ``color`` categories in each latent (computed on the
        latent itself, not on the 2-D embedding; higher = better separated; up to
        5,000 sampled cells) into the panel titles. Categorical colours only.
    random_state
        Seed of PCA/UMAP and of the silhouette's cell sample.
    ax
        Two axes (basal, full); default: a new figure.
    show
        Call ``plt.show()``; ``None``: only in interactive sessions without ``save``.
    save
        File path to save the figure to (format from the extension).
    **embedding_kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``size``, ``palette``, ``legend_loc``).

    Returns
    -------
    The two axes: ``[basal, full]``.
    """
    import scanpy as sc

    if basis not in ("umap", "pca"):
        raise ValueError(f"basis={basis!r} must be 'umap' or 'pca'.")
    data = model.adata if adata is None else adata
    if data is None:
        raise ValueError("adata is required: the model holds no AnnData.")
    color = model_keys(model)["perturbation_key"] if color is None else color
    if color not in data.obs.columns:
        raise KeyError(
            f"color={color!r} is not a column of adata.obs; available columns: "
            f"{', '.join(map(repr, data.obs.columns))}."
        )
    rows = np.arange(data.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.size < 3:
        raise ValueError(f"indices: {rows.size} cell(s) selected; embedding needs at least 3.")
    obs = data.obs.iloc[rows][[color]].copy()
    if not pd.api.types.is_numeric_dtype(obs[color]):
        # A categorical with the same categories in both panels gets the same colours in both.
        obs[color] = obs[color].astype(str).astype("category")
    axes = panel_axes(2, ax, ncols=2, panel_size=(5.0, 4.2))
    for panel_ax, kind in zip(axes, _KINDS, strict=True):
        latent = model.get_latent_representation(
            adata=adata, indices=None if indices is None else rows, kind=kind
        )
        title = f"{kind} latent"
        if silhouette and not pd.api.types.is_numeric_dtype(obs[color]):
            score = _silhouette(latent, obs[color], random_state)
            if np.isfinite(score):
                title += f"\nsilhouette by {color}: {score:.2f}"
        embedded = _embed(latent, obs, basis, n_neighbors, random_state)
        sc.pl.embedding(
            embedded,
            basis=basis,
            color=color,
            ax=panel_ax,
            show=False,
            title=title,
            **embedding_kwargs,
        )
    return _finish(axes, show, save)
