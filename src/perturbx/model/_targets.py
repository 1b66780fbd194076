"""Resolve user-given target conditions (names, doses, SMILES, covariates) against a registry.

Pure pandas/numpy: turns ``target=`` arguments of :meth:`perturbx.PerturbX.predict` into
vocabulary indices, doses and covariate codes. Molecules that are not in the vocabulary are
accepted by SMILES and numbered after it (index ``P + 1 + q`` for the ``q``-th new molecule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from perturbx.conditions import (
    MAX_DOSE,
    format_condition,
    parse_condition,
    split_smiles_combination,
)
from perturbx.data._fields import close_matches_text

KEEP_SOURCE = -1  # covariate code meaning "use the source cell's own value"
_DOSE_OMITTED = "<dose not given>"  # a target dict without a dose: every member at dose 1


@dataclass
class ResolvedTargets:
    """Targets as arrays.

    Attributes
    ----------
    obs
        One row per target (object columns): perturbation, dose, covariates (``None`` = from
        the source cell),
        ``smiles`` of new molecules, and a ``condition`` label.
    index
        ``(T, K)`` int64 vocabulary indices (0 = empty slot).
    dose
        ``(T, K)`` float32 doses.
    covariate_codes
        ``(T, C)`` int64 category codes, or :data:`KEEP_SOURCE`.
    new_smiles
        Canonical SMILES of molecules outside the vocabulary, in index order.
    """

    obs: pd.DataFrame
    index: np.ndarray
    dose: np.ndarray
    covariate_codes: np.ndarray
    new_smiles: list[str] = field(default_factory=list)


def targets_frame(target, perturbation_key: str) -> pd.DataFrame:
    """Normalise a ``target`` argument to a DataFrame with one row per target condition.

    Accepts a perturbation string (``"A+B"``), a list of strings, a dict (scalars or equal
    length lists), a list of dicts, or a DataFrame.
    """
    if target is None:
        raise ValueError("target is required: which perturbation(s) to predict.")
    if isinstance(target, str):
        return pd.DataFrame({perturbation_key: [target]})
    if isinstance(target, pd.DataFrame):
        frame = target.reset_index(drop=True)
    elif isinstance(target, Mapping):
        values = dict(target)
        scalar = all(np.ndim(v) == 0 for v in values.values())
        frame = pd.DataFrame([values]) if scalar else pd.DataFrame(values)
    elif isinstance(target, Sequence) and all(isinstance(t, str) for t in target):
        frame = pd.DataFrame({perturbation_key: list(target)})
    elif isinstance(target, Sequence) and all(isinstance(t, Mapping) for t in target):
        frame = pd.DataFrame(list(target))
    else:
        raise TypeError(
            "target must be a perturbation string, a list of strings, a dict, a list of dicts "
            f"or a DataFrame; got {type(target).__name__}."
        )
    if perturbation_key not in frame.columns:
        raise KeyError(
            f"target has no {perturbation_key!r} column (the model's perturbation_key); "
            f"target columns: {list(frame.columns)}."
        )
    if len(frame) == 0:
        raise ValueError("target is empty.")
    return frame


def resolve_targets(
    target,
    state: Mapping,
    covariate_categories: Mapping[str, Sequence],
    canonicalize: Callable[[str, str | None], str],
    smiles_column: str = "smiles",
    embeds_molecules: bool = True,
) -> ResolvedTargets:
    """Resolve targets against the perturbation registry ``state`` (see ``PerturbationField``).

    Parameters
    ----------
    target
        See :func:`targets_frame`.
    state
        The perturbation field's state registry (vocabulary, canonical SMILES, keys).
    covariate_categories
        Known categories of each registered covariate.
    canonicalize
        ``(smiles, name) -> canonical SMILES`` raising on invalid input.
    smiles_column
        Target column with SMILES (``+``-joined for combinations) of perturbations that are
        not in the vocabulary.
    embeds_molecules
        Whether the model has a drug encoder (some perturbation was registered with a
        SMILES). Without one, no target is read as a molecule.

    Notes
    -----
    A name outside the vocabulary is a new molecule only if its SMILES is given in
    ``smiles_column``, or if the model has a drug encoder, the name parses as a SMILES and it
    is not a close match of a known name (``"CNN"`` next to the gene ``"CNN1"`` is a typo,
    not methylamine). A known name given with the SMILES of another molecule is an error:
    the prediction would carry the known name's label.
    """
    pkey, dkey, control = state["perturbation_key"], state["dose_key"], state["control_value"]
    dose_column = dkey or "dose"
    if (
        isinstance(target, Sequence)
        and not isinstance(target, str)
        and all(isinstance(t, Mapping) for t in target)
    ):  # a dict that leaves out the dose means dose 1, unlike an explicit NaN
        target = [t if dose_column in t else {**t, dose_column: _DOSE_OMITTED} for t in target]
    frame = targets_frame(target, pkey)
    allowed = {pkey, dkey or "dose", smiles_column, *covariate_categories}
    unknown_columns = [c for c in frame.columns if c not in allowed]
    if unknown_columns:
        raise KeyError(
            f"target columns {unknown_columns} are not known; expected some of {sorted(allowed)}."
        )
    vocabulary = list(state["vocabulary"])
    index_of = {name: i + 1 for i, name in enumerate(vocabulary)}
    known_smiles = {s: i + 1 for i, s in enumerate(state["smiles"]) if s is not None}
    new_smiles: list[str] = []

    rows, indices, doses = [], [], []
    for t, row in frame.iterrows():
        dose = row.get(dose_column) if dose_column in frame.columns else _DOSE_OMITTED
        omitted = isinstance(dose, str) and dose == _DOSE_OMITTED
        dose_missing = omitted or _missing(dose)
        names, member_doses = parse_condition(
            _text(row[pkey], f"target row {t}: {pkey!r}"),
            None if dose_missing else dose,
            control_value=control,
            where=f"target row {t}",
        )
        if names and dose_missing and not omitted:
            raise ValueError(
                f"target row {t}: the {dose_column!r} of {row[pkey]!r} is missing ({dose!r}). "
                f"Give a dose, or leave out the {dose_column!r} column (every perturbation "
                "at dose 1)."
            )
        smiles = row.get(smiles_column) if smiles_column in frame.columns else None
        member_smiles = (
            split_smiles_combination(str(smiles)) if not _missing(smiles) else [None] * len(names)
        )
        if len(member_smiles) != len(names):
            raise ValueError(
                f"target row {t}: {smiles_column!r} lists {len(member_smiles)} SMILES for "
                f"{len(names)} perturbation member(s)."
            )
        member_index = []
        new_row_smiles = []
        for name, smi in zip(names, member_smiles, strict=True):
            given = smi not in (None, "")
            if name in index_of and not given:
                member_index.append(index_of[name])
                continue
            unknown = (
                f"target row {t}: perturbation {name!r} is not known to the model"
                f"{close_matches_text(name, vocabulary)}. Known perturbations: {vocabulary}."
            )
            if not embeds_molecules:
                raise ValueError(
                    unknown + " This model has no drug encoder (no perturbation was set up "
                    "with a SMILES), so it cannot predict new perturbations"
                    + (" from their SMILES." if given else ".")
                )
            if not given:
                if close_matches_text(name, vocabulary):
                    raise ValueError(
                        unknown + f" A new molecule whose name resembles a known one must be "
                        f"given with its SMILES in a {smiles_column!r} column."
                    )
                smi = name  # a member may be given directly as a SMILES string
                try:
                    canonical = canonicalize(smi, name)
                except ValueError:
                    raise ValueError(
                        unknown + " It is not a valid SMILES either; give a new molecule by "
                        f"SMILES (as the perturbation or in a {smiles_column!r} column)."
                    ) from None
            else:
                canonical = canonicalize(smi, name)
            if name in index_of:
                registered = state["smiles"][index_of[name] - 1]
                if canonical != registered:
                    what = (
                        f"the molecule {registered!r}"
                        if registered is not None
                        else "a learned perturbation (no structure)"
                    )
                    raise ValueError(
                        f"target row {t}: {name!r} is known to the model as {what}, but the "
                        f"target gives the SMILES {smi!r} ({canonical!r}), another molecule. "
                        "Give the new molecule a name of its own, or drop its SMILES to "
                        "predict the known one."
                    )
            if canonical in known_smiles:
                member_index.append(known_smiles[canonical])
                continue
            if canonical not in new_smiles:
                new_smiles.append(canonical)
            member_index.append(len(vocabulary) + 1 + new_smiles.index(canonical))
            new_row_smiles.append(canonical)
        perturbation, dose_text = format_condition(names, member_doses, control_value=control)
        record = {pkey: perturbation, dose_column: dose_text if names else ""}
        for key in covariate_categories:
            record[key] = row[key] if key in frame.columns and not _missing(row[key]) else None
        record[smiles_column] = "+".join(new_row_smiles)
        rows.append(record)
        indices.append(member_index)
        doses.append(member_doses)

    width = max(1, max(len(i) for i in indices))
    index = np.zeros((len(rows), width), dtype=np.int64)
    dose = np.zeros((len(rows), width), dtype=np.float32)
    for t, (i, d) in enumerate(zip(indices, doses, strict=True)):
        index[t, : len(i)] = i
        dose[t, : len(d)] = d
    # Object columns: a missing covariate stays ``None`` (pandas 3 would make it NaN in a
    # string column), so "keep the source cell's value" reads the same on every pandas.
    obs = pd.DataFrame(rows, dtype=object)
    codes = np.full((len(rows), len(covariate_categories)), KEEP_SOURCE, dtype=np.int64)
    for c, (key, categories) in enumerate(covariate_categories.items()):
        lookup = {str(v): j for j, v in enumerate(categories)}
        for t, value in enumerate(obs[key]):
            if _missing(value):
                continue
            if str(value) not in lookup:
                raise ValueError(
                    f"target row {t}: covariate {key!r} value {value!r} is not known to the "
                    f"model{close_matches_text(str(value), list(lookup))}; known values: "
                    f"{list(lookup)}."
                )
            codes[t, c] = lookup[str(value)]
    obs["condition"] = [
        "|".join([str(r[pkey]), str(r[dose_column])] + [str(r[k]) for k in covariate_categories])
        for _, r in obs.iterrows()
    ]
    return ResolvedTargets(obs, index, dose, codes, new_smiles)


def _text(value, where: str) -> str:
    """A perturbation entry as a string (a missing one is an error naming ``where``)."""
    if _missing(value):
        raise ValueError(f"{where} is missing ({value!r}).")
    return str(value)


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def check_prediction_arguments(
    n_cells_per_target, library_size, batch_size, counts_likelihood: bool
) -> None:
    """Errors naming the argument for :meth:`PredictionMixin.predict`'s numeric arguments."""
    if n_cells_per_target is not None and (
        isinstance(n_cells_per_target, bool)
        or not isinstance(n_cells_per_target, (int, np.integer))
        or n_cells_per_target < 1
    ):
        raise ValueError(
            f"n_cells_per_target={n_cells_per_target!r} must be a positive integer or None."
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or (batch_size < 1)
    ):
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if isinstance(library_size, str):
        if library_size != "observed":
            raise ValueError(
                f"library_size={library_size!r} must be 'observed' or a positive number."
            )
        return
    if (
        isinstance(library_size, bool)
        or not isinstance(library_size, (int, float, np.integer, np.floating))
        or not np.isfinite(library_size)
        or library_size <= 0
    ):
        raise ValueError(
            f"library_size={library_size!r} must be 'observed' or a positive, finite number."
        )
    if not counts_likelihood:
        raise ValueError("library_size applies to counts likelihoods ('nb'/'zinb') only.")


def checked_doses(doses, argument: str, n_values: int | None = None) -> np.ndarray:
    """``doses`` as a float array: finite, non-negative, at most ``MAX_DOSE``.

    ``n_values``: a sequence must have that many entries (one per perturbation); a scalar
    is accepted for all.
    """
    try:
        values = np.asarray(doses, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{argument}={doses!r} must be numbers.") from None
    if values.ndim > 1:
        raise ValueError(
            f"{argument} must be a number or a 1-d sequence, got shape {values.shape}."
        )
    if values.ndim == 1 and n_values is not None and len(values) != n_values:
        raise ValueError(
            f"{argument} has {len(values)} values for {n_values} perturbations; give one dose "
            "per perturbation, or a single number for all."
        )
    bad = values[~np.isfinite(values) | (values < 0) | (values > MAX_DOSE)]
    if bad.size:
        raise ValueError(
            f"{argument} contains {bad.ravel()[:5].tolist()}: doses must be finite, "
            f"non-negative and at most {MAX_DOSE:g}."
        )
    return values
