"""Out-of-distribution train / validation / test splits for perturbation benchmarks.

Each function writes a categorical column ``adata.obs[split_key]`` with values ``"train"``,
``"validation"`` and ``"test"``, records what it held out in
``adata.uns["perturbx_splits"][split_key]``, and returns a summary table (cells, conditions and
perturbations per split and kind). A *condition* is one parsed ``(perturbations, doses)`` pair
(see :mod:`perturbx.conditions`); its *members* are the perturbations it combines.

Control cells are split too, by ``control_fractions`` within every covariate group, so that
evaluation has unseen control cells in every split. Random choices use
``numpy.random.default_rng(seed)`` over candidates in sorted order, so a split depends only on
the data and the seed. On error nothing in ``adata`` is changed.

Validation units (``validation_unit``):

- ``"condition"``: a random ``validation_fraction`` of the eligible conditions moves to
  validation whole (all their cells), mirroring the out-of-distribution test;
- ``"cell"``: a random ``validation_fraction`` of the cells of every training condition (per
  covariate group) moves to validation; every condition keeps at least one training cell;
- ``"perturbation"`` (:func:`split_unseen_perturbations` only): whole perturbations, like test.

This module holds the strategies; the set-up, labelling and random draws they share are in
:mod:`perturbx.data._split_machinery`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.conditions import (
    COMBINATION_SEPARATOR,
    ConditionParseError,
    parse_condition,
)
from perturbx.data._split_machinery import (
    _TEST,
    _TRAIN,
    _VALIDATION,
    SPLIT_VALUES,
    _as_list,
    _check_requested,
    _check_unit,
    _draw,
    _fraction_count,
    _resolve_count,
    _Setup,
)

__all__ = [
    "SPLIT_VALUES",
    "split_unseen_cell_types",
    "split_unseen_combinations",
    "split_unseen_doses",
    "split_unseen_perturbations",
]


# ----------------------------------------------------------------------------- public API


def split_unseen_perturbations(
    adata: AnnData,
    perturbation_key: str,
    *,
    control_value: str = "control",
    dose_key: str | None = None,
    held_out: Sequence[str] | None = None,
    n_held_out: int | float | None = None,
    stratify_key: str | None = None,
    require_key: str | None = None,
    validation_fraction: float = 0.1,
    validation_unit: str = "condition",
    control_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    covariate_keys: Sequence[str] | None = None,
    seed: int = 0,
    split_key: str = "split",
) -> pd.DataFrame:
    """Hold out whole perturbations (drugs or genes): every cell that received one is test.

    A condition goes to test when *any* of its members is held out, so ``"A+B"`` is test when
    ``A`` is. Give either ``held_out`` (names) or ``n_held_out`` (a number, or a fraction in
    (0, 1) of the candidates).

    Parameters
    ----------
    adata
        Annotated data; only ``adata.obs`` and ``adata.uns`` are touched.
    perturbation_key, dose_key, control_value
        Columns and control label, as in :func:`~perturbx.conditions.parse_condition_columns`.
    held_out, n_held_out
        The perturbations to hold out, or how many to draw at random.
    stratify_key
        Optional obs column with one class per perturbation (e.g. pathway or target class);
        random draws are then spread over classes in proportion to their sizes. Perturbations
        with no value there (e.g. genes seen only in combinations) form one extra class.
    require_key
        Optional boolean obs column; only perturbations whose cells are all ``True`` can be held
        out (e.g. ``"has_smiles"`` for an unseen-molecule benchmark).
    validation_fraction, validation_unit
        Share of the remaining data used for validation and its unit (see module docs); with
        ``"perturbation"`` the validation perturbations also satisfy ``require_key``.
    control_fractions
        Train, validation and test shares of control cells within each covariate group.
    covariate_keys
        obs columns defining the groups in which controls (and ``"cell"`` validation) are split.
    seed, split_key
        Random seed and the obs column to write.

    Returns
    -------
    pandas.DataFrame
        One row per split and kind (``control``, ``single``, ``combination``) with ``n_cells``,
        ``n_conditions`` and ``n_perturbations``.
    """
    _check_unit(validation_unit, ("condition", "cell", "perturbation"))
    setup = _Setup(
        adata,
        perturbation_key,
        dose_key,
        control_value,
        control_fractions,
        covariate_keys,
        validation_fraction,
        [stratify_key, require_key],
    )
    rng = np.random.default_rng(seed)
    names = setup.perturbation_names()
    candidates = names
    if require_key is not None:
        allowed = setup.names_with_all_true(require_key)
        candidates = [p for p in names if p in allowed]
    if held_out is not None and n_held_out is not None:
        raise ValueError("Give either held_out or n_held_out, not both.")
    if held_out is not None:
        held = _check_requested(held_out, names, "held_out", "perturbation")
        rejected = sorted(held - set(candidates))
        if rejected:
            raise ValueError(
                f"held_out: {rejected} have cells where obs[{require_key!r}] is not "
                "True, so they cannot be held out."
            )
    elif n_held_out is not None:
        k = _resolve_count(n_held_out, len(candidates), "n_held_out", "perturbations")
        strata = setup.stratum_of_names(stratify_key) if stratify_key else None
        held = _draw(candidates, k, rng, strata)
    else:
        raise ValueError("Give held_out (names) or n_held_out (how many) perturbations.")
    if held >= set(names):
        raise ValueError("Holding out every perturbation would leave none in train.")

    is_test = np.array([bool(set(n) & held) for n, _ in setup.conditions])
    labels = setup.labels_from_conditions(is_test)
    if validation_unit == "perturbation":
        remaining = [p for p in candidates if p not in held]
        chosen = _draw(remaining, _fraction_count(validation_fraction, len(remaining)), rng)
        is_validation = np.array([bool(set(n) & chosen) for n, _ in setup.conditions]) & ~is_test
        labels[is_validation[setup.codes]] = _VALIDATION
    else:
        chosen = set()
        eligible = ~is_test & ~setup.is_control_condition
        setup.assign_validation(labels, validation_unit, eligible, rng)
    info = {
        "strategy": "unseen_perturbations",
        "held_out": sorted(held),
        "validation_perturbations": sorted(chosen),
    }
    return setup.finish(labels, split_key, seed, info, rng)


def split_unseen_combinations(
    adata: AnnData,
    perturbation_key: str,
    *,
    control_value: str = "control",
    dose_key: str | None = None,
    held_out: Sequence[str] | None = None,
    n_held_out: int | float | None = None,
    validation_fraction: float = 0.1,
    validation_unit: str = "condition",
    control_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    covariate_keys: Sequence[str] | None = None,
    seed: int = 0,
    split_key: str = "split",
) -> pd.DataFrame:
    """Hold out combinations whose members are all seen alone in train.

    Candidates are combinations (at any dose) every member of which also occurs as a single
    perturbation; single perturbations always stay in train, so each held-out combination's
    members are seen in training. Combinations are matched regardless of member order
    (``"B+A"`` is ``"A+B"``). With ``validation_unit="condition"`` validation takes whole
    remaining combinations (none if there are none left).

    Parameters
    ----------
    held_out, n_held_out
        Combinations as ``"A+B"`` strings, or how many (or which fraction) of the candidates to
        draw. A requested combination with a member never seen alone is an error.

    Notes
    -----
    Other parameters and the return value are as in :func:`split_unseen_perturbations`.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    setup = _Setup(
        adata,
        perturbation_key,
        dose_key,
        control_value,
        control_fractions,
        covariate_keys,
        validation_fraction,
        [],
    )
    rng = np.random.default_rng(seed)
    singles = {n[0] for n, _ in setup.conditions if len(n) == 1}
    combos = {_combination_label(n) for n, _ in setup.conditions if len(n) > 1}
    if not combos:
        raise ValueError(
            f"obs[{perturbation_key!r}] has no combinations (entries joined by "
            f"{COMBINATION_SEPARATOR!r})."
        )
    candidates = sorted(c for c in combos if set(c.split(COMBINATION_SEPARATOR)) <= singles)
    if held_out is not None and n_held_out is not None:
        raise ValueError("Give either held_out or n_held_out, not both.")
    if held_out is not None:
        requested = [_canonical_combination(c, control_value) for c in _as_list(held_out)]
        held = _check_requested(requested, sorted(combos), "held_out", "combination")
        for combo in sorted(held):
            unseen = sorted(set(combo.split(COMBINATION_SEPARATOR)) - singles)
            if unseen:
                raise ValueError(
                    f"held_out: combination {combo!r} has member(s) {unseen} never "
                    "seen as a single perturbation, so it is not an unseen "
                    "combination of seen perturbations."
                )
    elif n_held_out is not None:
        k = _resolve_count(
            n_held_out,
            len(candidates),
            "n_held_out",
            "combinations whose members are all seen as single perturbations",
        )
        held = _draw(candidates, k, rng)
    else:
        raise ValueError("Give held_out (combinations) or n_held_out (how many).")

    labels_of = [_combination_label(n) if len(n) > 1 else None for n, _ in setup.conditions]
    is_test = np.array([label in held for label in labels_of])
    labels = setup.labels_from_conditions(is_test)
    is_combination = np.array([label is not None for label in labels_of])
    setup.assign_validation(labels, validation_unit, is_combination & ~is_test, rng)
    info = {"strategy": "unseen_combinations", "held_out": sorted(held)}
    return setup.finish(labels, split_key, seed, info, rng)


def split_unseen_cell_types(
    adata: AnnData,
    perturbation_key: str,
    cell_type_key: str,
    held_out_cell_type: str,
    *,
    control_value: str = "control",
    dose_key: str | None = None,
    perturbations: Sequence[str] | int | float | None = None,
    validation_fraction: float = 0.1,
    validation_unit: str = "cell",
    control_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    covariate_keys: Sequence[str] | None = None,
    seed: int = 0,
    split_key: str = "split",
) -> pd.DataFrame:
    """Hold out perturbation effects in one cell type that are seen in other cell types.

    Test: the cells of ``held_out_cell_type`` whose condition contains a selected perturbation.
    Their effect in the other cell types stays in train. Controls are split within every cell
    type, so most of the held-out cell type's controls (``control_fractions[0]``) stay in train
    and the model learns its basal state; pass ``control_fractions=(1, 0, 0)`` to keep them all.

    Parameters
    ----------
    cell_type_key, held_out_cell_type
        The obs column with cell types and the cell type to hold out.
    perturbations
        Which perturbations to hold out in that cell type: names, a number or fraction drawn at
        random, or ``None`` for every perturbation measured there and in another cell type.

    Notes
    -----
    Other parameters and the return value are as in :func:`split_unseen_perturbations`;
    ``cell_type_key`` is always one of the covariate groups.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    covariates = [cell_type_key, *[k for k in (covariate_keys or []) if k != cell_type_key]]
    setup = _Setup(
        adata,
        perturbation_key,
        dose_key,
        control_value,
        control_fractions,
        covariates,
        validation_fraction,
        [],
    )
    rng = np.random.default_rng(seed)
    cell_types = adata.obs[cell_type_key].astype(str).to_numpy()
    known_types = sorted(set(cell_types))
    _check_requested([held_out_cell_type], known_types, "held_out_cell_type", "cell type")
    if len(known_types) < 2:
        raise ValueError(f"obs[{cell_type_key!r}] has a single cell type; nothing to hold out.")
    in_held_type = cell_types == str(held_out_cell_type)
    names_there = setup.perturbation_names(in_held_type)
    names_elsewhere = setup.perturbation_names(~in_held_type)
    candidates = sorted(set(names_there) & set(names_elsewhere))
    if not candidates:
        raise ValueError(
            f"No perturbation is measured both in {held_out_cell_type!r} and in another cell type."
        )
    if perturbations is None:
        selected = set(candidates)
    elif isinstance(perturbations, (int, float, np.integer, np.floating)):
        k = _resolve_count(
            perturbations,
            len(candidates),
            "perturbations",
            f"perturbations measured in {held_out_cell_type!r} and elsewhere",
        )
        selected = _draw(candidates, k, rng)
    else:
        selected = _check_requested(
            perturbations, setup.perturbation_names(), "perturbations", "perturbation"
        )
        rejected = sorted(selected - set(candidates))
        if rejected:
            raise ValueError(
                f"perturbations: {rejected} are not measured both in "
                f"{held_out_cell_type!r} and in another cell type."
            )

    contains = np.array([bool(set(n) & selected) for n, _ in setup.conditions])
    is_test_cell = in_held_type & contains[setup.codes]
    labels = np.full(setup.n_cells, _TRAIN, dtype=np.int8)
    labels[is_test_cell] = _TEST
    eligible = ~contains & ~setup.is_control_condition
    setup.assign_validation(labels, validation_unit, eligible, rng)
    info = {
        "strategy": "unseen_cell_types",
        "held_out_cell_type": str(held_out_cell_type),
        "held_out": sorted(selected),
    }
    return setup.finish(labels, split_key, seed, info, rng)


def split_unseen_doses(
    adata: AnnData,
    perturbation_key: str,
    dose_key: str,
    *,
    which: str | float | Sequence[float] = "highest",
    control_value: str = "control",
    validation_fraction: float = 0.1,
    validation_unit: str = "condition",
    control_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    covariate_keys: Sequence[str] | None = None,
    seed: int = 0,
    split_key: str = "split",
) -> pd.DataFrame:
    """Hold out doses of single perturbations, e.g. the highest dose of every drug.

    Only single-perturbation conditions are held out; combinations stay in train/validation.
    With ``"highest"``/``"lowest"`` a perturbation measured at one dose only stays in train.
    Every perturbation with a held-out dose keeps at least one dose in train (validation never
    takes its last one).

    Parameters
    ----------
    dose_key
        obs column with doses (required).
    which
        ``"highest"``, ``"lowest"``, or dose value(s) to hold out for every perturbation that
        has them (compared with :func:`numpy.isclose`; a value no perturbation has is an error,
        as is holding out every dose of a perturbation).

    Notes
    -----
    Other parameters and the return value are as in :func:`split_unseen_perturbations`.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    setup = _Setup(
        adata,
        perturbation_key,
        dose_key,
        control_value,
        control_fractions,
        covariate_keys,
        validation_fraction,
        [],
    )
    rng = np.random.default_rng(seed)
    doses_of: dict[str, set[float]] = {}
    for names, doses in setup.conditions:
        if len(names) == 1:
            doses_of.setdefault(names[0], set()).add(doses[0])
    held_pairs = _held_dose_pairs(doses_of, which)

    is_test = np.array([len(n) == 1 and (n[0], d[0]) in held_pairs for n, d in setup.conditions])
    labels = setup.labels_from_conditions(is_test)
    eligible = ~is_test & ~setup.is_control_condition
    protected = {name for name, _ in held_pairs}
    setup.assign_validation(labels, validation_unit, eligible, rng, protected=protected)
    info = {
        "strategy": "unseen_doses",
        "which": str(which),
        "held_out": sorted(f"{name} @ {dose:g}" for name, dose in held_pairs),
    }
    return setup.finish(labels, split_key, seed, info, rng)


# ----------------------------------------------------------------------------- strategy helpers


def _held_dose_pairs(doses_of: dict[str, set[float]], which) -> set[tuple[str, float]]:
    if not doses_of:
        raise ValueError("No single-perturbation condition to hold doses out of.")
    if isinstance(which, str):
        if which not in ("highest", "lowest"):
            raise ValueError(f"which must be 'highest', 'lowest' or dose value(s), got {which!r}.")
        pick = max if which == "highest" else min
        held = {(name, pick(doses)) for name, doses in doses_of.items() if len(doses) > 1}
        if not held:
            raise ValueError("No perturbation is measured at more than one dose.")
        return held
    requested = np.atleast_1d(np.asarray(which, dtype=float))
    held = {
        (name, d)
        for name, doses in doses_of.items()
        for d in doses
        if np.isclose(d, requested).any()
    }
    all_doses = sorted({d for doses in doses_of.values() for d in doses})
    unmatched = [float(r) for r in requested if not np.isclose(r, all_doses).any()]
    if unmatched:
        raise ValueError(
            f"which: dose(s) {unmatched} match no condition; doses present: {all_doses}."
        )
    emptied = sorted(n for n, doses in doses_of.items() if all((n, d) in held for d in doses))
    if emptied:
        raise ValueError(
            f"which={which!r} would hold out every dose of {emptied}; they would "
            "be unseen perturbations, not unseen doses."
        )
    return held


def _combination_label(names: tuple[str, ...]) -> str:
    return COMBINATION_SEPARATOR.join(sorted(names))


def _canonical_combination(text: str, control_value: str) -> str:
    try:
        names, _ = parse_condition(text, control_value=control_value, where="held_out")
    except ConditionParseError as err:
        raise ValueError(str(err)) from None
    if len(names) < 2:
        raise ValueError(f"held_out: {text!r} is not a combination ('A{COMBINATION_SEPARATOR}B').")
    return _combination_label(names)
