"""Parsing of perturbation conditions: ``"A+B"`` with doses ``"1.0+3.0"``.

This module is the single place where combination and dose strings are read and written
(and ``+``-joined SMILES of combinations split).
A *condition* is a tuple of perturbation names and a tuple of doses of the same length,
paired by position: in ``("A", "B"), (1.0, 10.0)`` drug A is at dose 1 and drug B at dose 10.
The control condition is the empty tuple.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd

COMBINATION_SEPARATOR = "+"
MAX_DOSE = 1e6
"""Largest accepted dose. Doses are used as given, never clamped: a larger value is almost
always a unit error (e.g. nM or pM where the rest of the data is in µM), so it is rejected."""

Condition = tuple[tuple[str, ...], tuple[float, ...]]
# A "+" right after an exponent marker belongs to the number ("1e+03"), not the list.
_DOSE_SEPARATOR = re.compile(r"(?<![eE])\+")


class ConditionParseError(ValueError):
    """A perturbation or dose entry that cannot be read."""


def _parse_doses(dose: object, n_perturbations: int, where: str) -> tuple[float, ...]:
    if dose is None or (isinstance(dose, float) and math.isnan(dose)):
        raise ConditionParseError(f"{where}: the dose is missing (NaN).")
    if isinstance(dose, str):
        parts = _DOSE_SEPARATOR.split(dose)
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise ConditionParseError(
                f"{where}: dose {dose!r} is not a number or a {COMBINATION_SEPARATOR!r}-joined "
                "list of numbers."
            ) from None
    elif isinstance(dose, (int, float, np.integer, np.floating)) and not isinstance(dose, bool):
        values = (float(dose),)
    else:
        raise ConditionParseError(
            f"{where}: dose {dose!r} has unsupported type {type(dose).__name__}."
        )
    if len(values) != n_perturbations:
        raise ConditionParseError(
            f"{where}: dose {dose!r} has {len(values)} value(s) but the perturbation has "
            f"{n_perturbations} member(s); doses are paired with perturbations by position."
        )
    for v in values:
        if not math.isfinite(v):
            raise ConditionParseError(f"{where}: dose {dose!r} is not finite.")
        if v < 0:
            raise ConditionParseError(f"{where}: dose {dose!r} is negative.")
        if v > MAX_DOSE:
            raise ConditionParseError(
                f"{where}: dose {dose!r} exceeds the maximum of {MAX_DOSE:g}; doses are not "
                "clamped. Rescale the dose column (e.g. nM to µM) so that doses are moderate."
            )
    return values


def parse_condition(
    perturbation: str,
    dose: object = None,
    *,
    control_value: str = "control",
    where: str = "condition",
) -> Condition:
    """Parse one perturbation entry and its dose into a condition.

    Parameters
    ----------
    perturbation
        ``"A"``, ``"A+B"``, or the control label. Members equal to ``control_value``
        inside a combination (``"A+control"``) are dropped together with their dose.
    dose
        ``None`` (dose 1 for every member), a number (single perturbations only) or a
        ``"+"``-joined string with one dose per member, in the same order.
    control_value
        The label of unperturbed cells.
    where
        Text naming the entry in error messages (e.g. ``"obs 'drug', cell 'c17'"``).

    Returns
    -------
    ``(names, doses)``: two tuples of equal length; both empty for the control.
    """
    if not isinstance(perturbation, str):
        raise ConditionParseError(
            f"{where}: perturbation {perturbation!r} is not a string (missing value?)."
        )
    if perturbation == control_value:
        return (), ()
    names = tuple(p.strip() for p in perturbation.split(COMBINATION_SEPARATOR))
    if any(n == "" for n in names):
        raise ConditionParseError(f"{where}: perturbation {perturbation!r} has an empty member.")
    if len(names) > 1 and not all(_balanced(n) for n in names):
        raise ConditionParseError(
            f"{where}: perturbation {perturbation!r} would be split at '+' into the members "
            f"{list(names)}, which are not names (unbalanced brackets). '+' joins the members "
            "of a combination, so a name that contains '+' such as '(+)-catechin' must be "
            "renamed (e.g. 'catechin' or 'd-catechin'), and a SMILES with a charge such as "
            "[N+] must go in the 'smiles' column, not in the perturbation."
        )
    doses = (1.0,) * len(names) if dose is None else _parse_doses(dose, len(names), where)
    kept = [(n, d) for n, d in zip(names, doses, strict=True) if n != control_value]
    if len({n for n, _ in kept}) != len(kept):
        raise ConditionParseError(f"{where}: perturbation {perturbation!r} repeats a member.")
    return tuple(n for n, _ in kept), tuple(d for _, d in kept)


def _balanced(name: str) -> bool:
    """Whether every bracket of ``name`` closes, in order: ``(``, ``[`` and ``{``."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack = []
    for char in name:
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


def format_condition(
    names: Sequence[str], doses: Sequence[float], *, control_value: str = "control"
):
    """Inverse of :func:`parse_condition`: return ``(perturbation, dose)`` strings.

    Doses are written with ``repr``-exact float formatting (``"1.0+3.0"``), so that
    ``parse_condition(*format_condition(n, d))`` gives ``(n, d)`` back exactly.
    """
    if len(names) != len(doses):
        raise ValueError(f"{len(names)} names but {len(doses)} doses.")
    if len(names) == 0:
        return control_value, ""
    return (
        COMBINATION_SEPARATOR.join(names),
        COMBINATION_SEPARATOR.join(repr(float(d)) for d in doses),
    )


def parse_condition_columns(
    obs: pd.DataFrame,
    perturbation_key: str,
    dose_key: str | None,
    control_value: str,
) -> tuple[list[Condition], np.ndarray]:
    """Parse the perturbation (and dose) columns of ``obs``.

    Distinct ``(perturbation, dose)`` pairs are parsed once, so a million cells with a few
    hundred conditions cost a few hundred parses.

    Returns
    -------
    conditions
        The distinct parsed conditions.
    codes
        ``(n_obs,)`` int array: the index into ``conditions`` of each cell.
    """
    if perturbation_key not in obs.columns:
        raise KeyError(_missing_column_message(obs, perturbation_key, "perturbation_key"))
    if dose_key is not None and dose_key not in obs.columns:
        raise KeyError(_missing_column_message(obs, dose_key, "dose_key"))
    pert = obs[perturbation_key].astype(object).to_numpy()
    if dose_key is None:
        codes, uniques = pd.factorize(pert, use_na_sentinel=False)
        pairs = [(p, None) for p in uniques]
        where = f"obs[{perturbation_key!r}]"
    else:
        keys = pd.MultiIndex.from_arrays([pert, obs[dose_key].astype(object).to_numpy()])
        codes, uniques = pd.factorize(keys, use_na_sentinel=False)
        pairs = list(uniques)
        where = f"obs[{perturbation_key!r}]/obs[{dose_key!r}]"
    first_cell = pd.Series(np.arange(len(codes))).groupby(codes).first().to_numpy()
    conditions: list[Condition] = []
    for (p, d), first in zip(pairs, first_cell, strict=True):
        cell = obs.index[first]
        conditions.append(
            parse_condition(p, d, control_value=control_value, where=f"{where} at cell {cell!r}")
        )
    return conditions, np.asarray(codes)


def _missing_column_message(obs: pd.DataFrame, key: Hashable, argument: str) -> str:
    return (
        f"{argument}={key!r} is not a column of adata.obs; available columns: "
        f"{', '.join(map(repr, obs.columns))}."
    )


def split_smiles_combination(smiles: str) -> list[str]:
    """Split ``"SMILES_A+SMILES_B"`` into its members.

    ``+`` also occurs in SMILES, but only inside square brackets (charges such as ``[N+]``),
    so members are separated by the ``+`` signs found outside brackets.
    """
    members, depth, start = [], 0, 0
    for i, char in enumerate(smiles):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == COMBINATION_SEPARATOR and depth == 0:
            members.append(smiles[start:i].strip())
            start = i + 1
    members.append(smiles[start:].strip())
    return members
