"""Shared plumbing of the plotting functions: figure layout, saving/showing, model keys."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from matplotlib.axes import Axes

AxesOrList = TypeVar("AxesOrList")


def _finish(ax: AxesOrList, show: bool | None, save: str | Path | None) -> AxesOrList:
    """Save and/or show the figure of ``ax`` (an Axes or a list of them) and return ``ax``.

    ``show=None`` shows only in interactive sessions when the figure is not being saved, so
    scripts and tests (Agg backend) never block.
    """
    import matplotlib.pyplot as plt

    first = ax[0] if isinstance(ax, Sequence) else ax
    fig = first.get_figure()
    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if show is None:
        show = save is None and plt.isinteractive()
    if show:
        plt.show()
    return ax


def panel_axes(
    n_panels: int,
    ax: Axes | Sequence[Axes] | None,
    *,
    ncols: int,
    panel_size: tuple[float, float] = (4.0, 3.2),
) -> list[Axes]:
    """Axes for ``n_panels`` panels: the given ones, or a new grid of ``ncols`` columns.

    Unused cells of a new grid are removed, so the figure holds exactly ``n_panels`` axes.
    """
    import matplotlib.pyplot as plt

    if ax is not None:
        given = [ax] if not isinstance(ax, Sequence) else list(ax)
        if len(given) != n_panels:
            raise ValueError(
                f"ax: {len(given)} axes given for {n_panels} panel(s); pass one axes per panel "
                "or ax=None for a new figure."
            )
        return given
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols!r}.")
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, grid = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    axes = list(grid.ravel())
    for unused in axes[n_panels:]:
        fig.delaxes(unused)
    return axes[:n_panels]


def model_keys(model) -> dict:
    """The registered setup arguments of a PerturbX model (perturbation/dose/covariate keys)."""
    try:
        setup = model.registry["setup_args"]
    except (AttributeError, KeyError, TypeError):
        raise TypeError(
            f"expected a perturbx.PerturbX model set up with setup_anndata, got "
            f"{type(model).__name__}."
        ) from None
    return {
        "perturbation_key": setup["perturbation_key"],
        "dose_key": setup.get("dose_key"),
        "control_value": setup.get("control_value", "control"),
        "covariate_keys": list(setup.get("covariate_keys") or []),
        "layer": setup.get("layer"),
    }
