"""Training curves of a PerturbX model: :func:`training_history`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from perturbx.conditions import COMBINATION_SEPARATOR, parse_condition_columns
from perturbx.plotting._utils import _finish, model_keys, panel_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_SPLITS = ("train", "validation")
_ACCURACY = "adversary_accuracy"
_TITLES = {
    "reconstruction_loss": "reconstruction loss (NLL per cell)",
    "kl_local": "KL divergence per cell",
    "elbo": "ELBO (reconstruction + KL)",
    "loss": "total autoencoder loss",
    "adversary_loss": "adversary loss (cross-entropy)",
    "adversary_confusion": "adversary confusion (autoencoder's term)",
    _ACCURACY: "adversary accuracy on the basal latent",
    "adversary_lambda": "adversarial weight λ",
}


def _split_key(key: str) -> tuple[str, str | None]:
    """``"elbo_train"`` -> ``("elbo", "train")``; keys without a split suffix -> ``(key, None)``."""
    for split in _SPLITS:
        if key.endswith(f"_{split}"):
            return key[: -len(split) - 1], split
    return key, None


def _chance_levels(model) -> dict[str, float]:
    """Accuracy of always guessing the most common label, on the model's training cells.

    The perturbation adversary's label is the set of perturbations (dose ignored, controls
    included), as registered; covariate adversaries predict the covariate's category.
    """
    adata = getattr(model, "adata", None)
    if adata is None:
        return {}
    keys = model_keys(model)
    indices = getattr(model, "train_indices_", None)
    obs = adata.obs if indices is None else adata.obs.iloc[np.asarray(indices)]
    conditions, codes = parse_condition_columns(
        obs, keys["perturbation_key"], None, keys["control_value"]
    )
    labels = np.array([COMBINATION_SEPARATOR.join(sorted(names)) for names, _ in conditions])
    levels = {"perturbation": _most_common_fraction(labels[codes])}
    for key in keys["covariate_keys"]:
        levels[key] = _most_common_fraction(obs[key].astype(str).to_numpy())
    return levels


def _most_common_fraction(values: np.ndarray) -> float:
    return float(pd.Series(values).value_counts(normalize=True).iloc[0]) if len(values) else np.nan


def _panels(history: Mapping[str, pd.DataFrame], keys: Sequence[str] | None) -> list[list[str]]:
    """Group history keys into panels: one list of history keys per panel."""
    bases: dict[str, list[str]] = {}
    for key in history:
        bases.setdefault(_split_key(key)[0], []).append(key)
    accuracy_bases = sorted(b for b in bases if b.startswith(f"{_ACCURACY}_"))
    if keys is None:
        keys = ["reconstruction_loss", "adversary_loss"]
        kl = [history[k].to_numpy(float) for k in bases.get("kl_local", [])]
        if any(np.nanmax(np.abs(v), initial=0.0) > 0 for v in kl):
            keys.insert(1, "kl_local")  # only variational models have a KL term
        keys = [k for k in keys if k in bases] + ([_ACCURACY] if accuracy_bases else [])
    panels = []
    for key in keys:
        if key in history:  # an exact key such as "elbo_train" or "adversary_lambda"
            panels.append([key])
        elif key == _ACCURACY and accuracy_bases:
            panels.append([k for b in accuracy_bases for k in sorted(bases[b], key=_split_order)])
        elif key in bases:
            panels.append(sorted(bases[key], key=_split_order))
        else:
            raise KeyError(
                f"keys: {key!r} is not in model.history; available quantities: "
                f"{sorted(bases) + ([_ACCURACY] if accuracy_bases else [])} "
                "(add '_train' or '_validation' for one split)."
            )
    if not panels:
        raise ValueError("nothing to plot: model.history has none of the default quantities.")
    return panels


def _split_order(key: str) -> int:
    split = _split_key(key)[1]
    return _SPLITS.index(split) if split else -1


def training_history(
    model,
    keys: Sequence[str] | None = None,
    *,
    chance_levels: Mapping[str, float] | Literal["auto"] | None = "auto",
    ncols: int = 3,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Loss components and adversary accuracies over training epochs.

    One panel per quantity; training values are solid lines, validation values dotted lines
    of the same colour. All adversary accuracies share a panel, with the chance level of each
    adversary as a dashed line: the basal latent is disentangled when the accuracies fall to
    chance.

    Parameters
    ----------
    model
        A trained :class:`perturbx.PerturbX` (anything with a ``history`` dict of per-epoch
        DataFrames works).
    keys
        Quantities to plot, one panel each: base names such as ``"reconstruction_loss"``,
        ``"elbo"``, ``"adversary_loss"``, ``"adversary_accuracy"`` (all adversaries
        together), or exact history keys (``"adversary_lambda"``, ``"elbo_validation"``).
        Default: reconstruction loss, KL (variational models only), adversary loss and
        adversary accuracy.
    chance_levels
        Chance accuracy of each adversary, keyed by adversary name (``"perturbation"`` or a
        covariate key), as a fraction in [0, 1]. ``"auto"``: the frequency of the most common
        label among the model's training cells (perturbation sets with dose ignored,
        covariate categories). ``None``: no chance lines.
    ncols
        Panels per row of a new figure.
    ax
        One axes per panel (default: a new figure).
    show
        Call ``plt.show()``; ``None``: only in interactive sessions without ``save``.
    save
        File path to save the figure to (format from the extension).

    Returns
    -------
    The list of axes, one per panel.
    """
    history = getattr(model, "history", None)
    if not history:
        raise ValueError("model.history is empty: train the model first.")
    panels = _panels(history, keys)
    if chance_levels == "auto":
        chance_levels = _chance_levels(model)
    elif chance_levels is not None and not isinstance(chance_levels, Mapping):
        raise ValueError(
            f"chance_levels must be 'auto', a mapping adversary -> accuracy or None, got "
            f"{chance_levels!r}."
        )
    chance_levels = dict(chance_levels or {})
    for name, level in chance_levels.items():
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"chance_levels[{name!r}]={level!r} is not a fraction in [0, 1].")

    axes = panel_axes(len(panels), ax, ncols=ncols)
    colours = _colours()
    for panel_ax, panel in zip(axes, panels, strict=True):
        bases = list(dict.fromkeys(_split_key(k)[0] for k in panel))
        accuracy_panel = all(b.startswith(f"{_ACCURACY}_") for b in bases)
        for key in panel:
            base, split = _split_key(key)
            colour = colours[bases.index(base) % len(colours)]
            series = history[key].iloc[:, 0]
            name = base[len(_ACCURACY) + 1 :] if accuracy_panel else None
            label = split or key if name is None else f"{name} ({split or 'all'})"
            panel_ax.plot(
                series.index.to_numpy(),
                series.to_numpy(float),
                color=colour,
                linestyle=":" if split == "validation" else "-",
                marker="o" if len(series) <= 30 else None,
                markersize=3,
                label=label,
            )
        if accuracy_panel:
            for base in bases:
                name = base[len(_ACCURACY) + 1 :]
                if name in chance_levels:
                    panel_ax.axhline(
                        float(chance_levels[name]),
                        color=colours[bases.index(base) % len(colours)],
                        linestyle="--",
                        linewidth=1,
                        alpha=0.8,
                        label=f"{name} (chance)",
                    )
            panel_ax.set_ylim(0.0, 1.02)
            panel_ax.set_ylabel("accuracy")
            panel_ax.set_title(_TITLES[_ACCURACY])
        else:
            panel_ax.set_ylabel(bases[0] if len(bases) == 1 else "value")
            panel_ax.set_title(_TITLES.get(bases[0], bases[0]) if len(bases) == 1 else "")
        panel_ax.set_xlabel("epoch")
        panel_ax.legend(fontsize="small", frameon=False)
    return _finish(axes, show, save)


def _colours() -> list:
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"]
