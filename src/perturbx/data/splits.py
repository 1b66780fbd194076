"""Out-of-distribution train / validation / test splits for perturbation benchmarks.

Each function writes a categorical column ``adata.obs[split_key]`` with values ``"train"``,
``"validation"`` and ``"test"``, records what it held out in
``adata.uns["perturbx_splits"][split_key]``, and returns a summary table (cells, conditions and
perturbations per split and kind). A *condition* is one parsed ``(perturbations, doses)`` pair
(see :mod:`perturbx.data._parsing`); its *members* are the perturbations it combines.

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
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.data._parsing import (
    COMBINATION_SEPARATOR,
    Condition,
    ConditionParseError,
    parse_condition,
    parse_condition_columns,
)

__all__ = [
    "SPLIT_VALUES",
    "split_unseen_cell_types",
    "split_unseen_combinations",
    "split_unseen_doses",
    "split_unseen_perturbations",
]

SPLIT_VALUES = ("train", "validation", "test")
# Labels are held as int8 codes into SPLIT_VALUES while a split is built.
_TRAIN, _VALIDATION, _TEST = 0, 1, 2


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
        Columns and control label, as in :func:`~perturbx.data._parsing.parse_condition_columns`.
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
    setup = _Setup(adata, perturbation_key, dose_key, control_value, control_fractions,
                   covariate_keys, validation_fraction, [stratify_key, require_key])
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
            raise ValueError(f"held_out: {rejected} have cells where obs[{require_key!r}] is not "
                             "True, so they cannot be held out.")
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
    info = {"strategy": "unseen_perturbations", "held_out": sorted(held),
            "validation_perturbations": sorted(chosen)}
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

    Other parameters and the return value are as in :func:`split_unseen_perturbations`.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    setup = _Setup(adata, perturbation_key, dose_key, control_value, control_fractions,
                   covariate_keys, validation_fraction, [])
    rng = np.random.default_rng(seed)
    singles = {n[0] for n, _ in setup.conditions if len(n) == 1}
    combos = {_combination_label(n) for n, _ in setup.conditions if len(n) > 1}
    if not combos:
        raise ValueError(f"obs[{perturbation_key!r}] has no combinations (entries joined by "
                         f"{COMBINATION_SEPARATOR!r}).")
    candidates = sorted(c for c in combos if set(c.split(COMBINATION_SEPARATOR)) <= singles)
    if held_out is not None and n_held_out is not None:
        raise ValueError("Give either held_out or n_held_out, not both.")
    if held_out is not None:
        requested = [_canonical_combination(c, control_value) for c in _as_list(held_out)]
        held = _check_requested(requested, sorted(combos), "held_out", "combination")
        for combo in sorted(held):
            unseen = sorted(set(combo.split(COMBINATION_SEPARATOR)) - singles)
            if unseen:
                raise ValueError(f"held_out: combination {combo!r} has member(s) {unseen} never "
                                 "seen as a single perturbation, so it is not an unseen "
                                 "combination of seen perturbations.")
    elif n_held_out is not None:
        k = _resolve_count(n_held_out, len(candidates), "n_held_out",
                           "combinations whose members are all seen as single perturbations")
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

    Other parameters and the return value are as in :func:`split_unseen_perturbations`;
    ``cell_type_key`` is always one of the covariate groups.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    covariates = [cell_type_key, *[k for k in (covariate_keys or []) if k != cell_type_key]]
    setup = _Setup(adata, perturbation_key, dose_key, control_value, control_fractions,
                   covariates, validation_fraction, [])
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
        raise ValueError(f"No perturbation is measured both in {held_out_cell_type!r} and in "
                         "another cell type.")
    if perturbations is None:
        selected = set(candidates)
    elif isinstance(perturbations, (int, float, np.integer, np.floating)):
        k = _resolve_count(perturbations, len(candidates), "perturbations",
                           f"perturbations measured in {held_out_cell_type!r} and elsewhere")
        selected = _draw(candidates, k, rng)
    else:
        selected = _check_requested(perturbations, setup.perturbation_names(), "perturbations",
                                    "perturbation")
        rejected = sorted(selected - set(candidates))
        if rejected:
            raise ValueError(f"perturbations: {rejected} are not measured both in "
                             f"{held_out_cell_type!r} and in another cell type.")

    contains = np.array([bool(set(n) & selected) for n, _ in setup.conditions])
    is_test_cell = in_held_type & contains[setup.codes]
    labels = np.full(setup.n_cells, _TRAIN, dtype=np.int8)
    labels[is_test_cell] = _TEST
    eligible = ~contains & ~setup.is_control_condition
    setup.assign_validation(labels, validation_unit, eligible, rng)
    info = {"strategy": "unseen_cell_types", "held_out_cell_type": str(held_out_cell_type),
            "held_out": sorted(selected)}
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

    Other parameters and the return value are as in :func:`split_unseen_perturbations`.
    """
    _check_unit(validation_unit, ("condition", "cell"))
    setup = _Setup(adata, perturbation_key, dose_key, control_value, control_fractions,
                   covariate_keys, validation_fraction, [])
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
    info = {"strategy": "unseen_doses", "which": str(which),
            "held_out": sorted(f"{name} @ {dose:g}" for name, dose in held_pairs)}
    return setup.finish(labels, split_key, seed, info, rng)


# ----------------------------------------------------------------------------- shared machinery


class _Setup:
    """Validated inputs and parsed conditions shared by the split functions."""

    def __init__(self, adata, perturbation_key, dose_key, control_value, control_fractions,
                 covariate_keys, validation_fraction, extra_keys):
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        self.adata = adata
        self.covariate_keys = list(covariate_keys or [])
        for argument, key in [("covariate_keys", k) for k in self.covariate_keys] + [
            ("stratify_key/require_key", k) for k in extra_keys if k is not None
        ]:
            if key not in adata.obs.columns:
                raise KeyError(f"{argument}: {key!r} is not a column of adata.obs; available: "
                               f"{list(adata.obs.columns)}.")
        self.control_fractions = _check_control_fractions(control_fractions)
        if not 0.0 <= float(validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
        self.validation_fraction = float(validation_fraction)
        self.used_keys = {perturbation_key, dose_key, *self.covariate_keys, *extra_keys} - {None}
        self.conditions: list[Condition]
        self.conditions, self.codes = parse_condition_columns(
            adata.obs, perturbation_key, dose_key, control_value
        )
        self.n_cells = adata.n_obs
        self.is_control_condition = np.array([len(n) == 0 for n, _ in self.conditions])
        if self.is_control_condition.all():
            raise ValueError(f"obs[{perturbation_key!r}] holds only controls ({control_value!r}).")
        if not self.is_control_condition.any():
            raise ValueError(f"No cell has the control label {control_value!r} in "
                             f"obs[{perturbation_key!r}].")
        self.is_control_cell = self.is_control_condition[self.codes]

    def perturbation_names(self, cell_mask: np.ndarray | None = None) -> list[str]:
        used = np.unique(self.codes if cell_mask is None else self.codes[cell_mask])
        return sorted({name for i in used for name in self.conditions[i][0]})

    def names_with_all_true(self, key: str) -> set[str]:
        values = self.adata.obs[key]
        if not (pd.api.types.is_bool_dtype(values) or set(pd.unique(values)) <= {0, 1}):
            raise ValueError(f"require_key: obs[{key!r}] must be boolean.")
        all_true = pd.Series(values.to_numpy(dtype=bool)).groupby(self.codes).all()
        names = set(self.perturbation_names())
        for code, ok in all_true.items():
            if not ok:
                names -= set(self.conditions[code][0])
        return names

    def stratum_of_names(self, key: str) -> dict[str, str]:
        frame = pd.DataFrame({"code": self.codes, "stratum": self.adata.obs[key].to_numpy()})
        per_code = frame.groupby("code")["stratum"].unique()
        strata: dict[str, set] = {}
        for code, values in per_code.items():
            for name in self.conditions[code][0]:
                strata.setdefault(name, set()).update(v for v in values if not pd.isna(v))
        for name, values in strata.items():
            if len(values) > 1:
                raise ValueError(f"stratify_key: perturbation {name!r} has {len(values)} values in "
                                 f"obs[{key!r}] ({sorted(map(str, values))}); need exactly one.")
        # Perturbations without a value share one stratum of their own.
        return {name: str(next(iter(values), "<missing>")) for name, values in strata.items()}

    def labels_from_conditions(self, is_test_condition: np.ndarray) -> np.ndarray:
        labels = np.full(self.n_cells, _TRAIN, dtype=np.int8)
        labels[is_test_condition[self.codes]] = _TEST
        return labels

    def assign_validation(self, labels, unit, eligible, rng, protected=frozenset()):
        """Move training cells of non-control conditions to validation (in place)."""
        fraction = self.validation_fraction
        if fraction == 0.0:
            return
        if unit == "cell":
            movable = (labels == _TRAIN) & ~self.is_control_cell
            groups = self._group_codes(extra=self.codes)
            counts = np.bincount(groups[movable], minlength=groups.max() + 1)
            # Every group keeps at least one training cell.
            n_move = np.minimum(np.rint(counts * fraction).astype(int), np.maximum(counts - 1, 0))
            picked = _pick_per_group(np.flatnonzero(movable), groups[movable], n_move, rng)
            labels[picked] = _VALIDATION
            return
        in_train = np.zeros(len(self.conditions), dtype=bool)
        in_train[np.unique(self.codes[labels == _TRAIN])] = True
        order = sorted(np.flatnonzero(eligible & in_train), key=lambda i: self.conditions[i])
        target = _fraction_count(fraction, len(order))
        # Training conditions of each protected perturbation given alone, so that validation
        # never takes its last one.
        singles = [self.conditions[i][0] for i in np.flatnonzero(in_train)]
        n_train = {p: sum(names == (p,) for names in singles) for p in protected}
        chosen = []
        for i in (order[j] for j in rng.permutation(len(order))):
            if len(chosen) == target:
                break
            names = self.conditions[i][0]
            members = list(names) if len(names) == 1 and names[0] in n_train else []
            if all(n_train[p] > 1 for p in members):
                chosen.append(i)
                for p in members:
                    n_train[p] -= 1
        is_validation = np.zeros(len(self.conditions), dtype=bool)
        is_validation[chosen] = True
        labels[is_validation[self.codes] & (labels == _TRAIN)] = _VALIDATION

    def finish(self, labels, split_key, seed, info, rng) -> pd.DataFrame:
        if split_key in self.used_keys:
            raise ValueError(f"split_key={split_key!r} would overwrite an input column.")
        perturbed_validation = (labels == _VALIDATION) & ~self.is_control_cell
        if self.validation_fraction > 0 and not perturbed_validation.any():
            warnings.warn("No perturbed cell could be moved to validation (too few eligible "
                          "conditions or cells); validation holds controls only.", stacklevel=3)
        self._split_controls(labels, rng)
        adata = self.adata
        adata.obs[split_key] = pd.Categorical.from_codes(labels, categories=list(SPLIT_VALUES))
        record = {**info, "seed": int(seed)}
        adata.uns.setdefault("perturbx_splits", {})[split_key] = record
        return _summary(labels, self.codes, self.conditions)

    def _group_codes(self, extra: np.ndarray | None = None) -> np.ndarray:
        """``(n_cells,)`` codes of the covariate groups (crossed with ``extra`` codes)."""
        columns = [pd.factorize(self.adata.obs[k].astype(str), sort=True)[0]
                   for k in self.covariate_keys]
        if extra is not None:
            columns.append(np.asarray(extra))
        combined = np.zeros(self.n_cells, dtype=np.int64)
        for codes in columns:  # mixed-radix combination of integer codes; no tuples built
            combined = combined * (int(codes.max(initial=0)) + 1) + codes
            combined = np.unique(combined, return_inverse=True)[1].astype(np.int64)
        return combined

    def _split_controls(self, labels: np.ndarray, rng) -> None:
        cells = np.flatnonzero(self.is_control_cell)
        groups = self._group_codes()[cells]
        _, groups = np.unique(groups, return_inverse=True)
        counts = np.bincount(groups)
        shares = np.array([_split_counts(n, self.control_fractions) for n in counts])
        too_small = (counts < 3) & (self.control_fractions[1:] > 0).any()
        if too_small.any():
            warnings.warn(f"{too_small.sum()} covariate group(s) have fewer than 3 control cells, "
                          "so some splits get no controls from them.", stacklevel=4)
        order = _shuffle_within_groups(groups, rng)
        rank = np.empty(len(cells), dtype=np.int64)
        rank[order] = np.arange(len(cells)) - np.r_[0, np.cumsum(counts)][groups[order]]
        n_train, n_val = shares[groups, 0], shares[groups, 1]
        labels[cells] = np.where(rank < n_train, _TRAIN,
                                 np.where(rank < n_train + n_val, _VALIDATION, _TEST))


# ----------------------------------------------------------------------------- helpers


def _summary(labels, codes, conditions) -> pd.DataFrame:
    kind_names = ("control", "single", "combination")
    kinds = np.array([min(len(n), 2) for n, _ in conditions])
    # Cells per (split, condition), counted on integer codes.
    per_condition = np.zeros((len(SPLIT_VALUES), len(conditions)), dtype=np.int64)
    np.add.at(per_condition, (labels, codes), 1)
    rows = []
    for split_code, split in enumerate(SPLIT_VALUES):
        for kind_code, kind in enumerate(kind_names):
            if not (kinds == kind_code).any():
                continue
            here = np.flatnonzero((kinds == kind_code) & (per_condition[split_code] > 0))
            names = {n for c in here for n in conditions[c][0]}
            rows.append({"split": split, "kind": kind,
                         "n_cells": int(per_condition[split_code, here].sum()),
                         "n_conditions": len(here), "n_perturbations": len(names)})
    return pd.DataFrame(rows)


def _split_counts(n: int, fractions: np.ndarray) -> list[int]:
    """Split ``n`` cells by ``fractions`` (largest remainder); give validation and test at least
    one cell each when their fraction is positive and ``n >= 3``."""
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 3:
        for i in (1, 2):
            if fractions[i] > 0 and counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] += 1
    return counts.tolist()


def _shuffle_within_groups(groups: np.ndarray, rng) -> np.ndarray:
    """Indices sorted by group, in random order inside each group."""
    return np.lexsort((rng.random(len(groups)), groups))


def _pick_per_group(indices, groups, n_per_group, rng) -> np.ndarray:
    if len(indices) == 0:
        return indices
    order = _shuffle_within_groups(groups, rng)
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
    rank = np.arange(len(order)) - starts
    return indices[order[rank < n_per_group[sorted_groups]]]


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
    held = {(name, d) for name, doses in doses_of.items() for d in doses
            if np.isclose(d, requested).any()}
    all_doses = sorted({d for doses in doses_of.values() for d in doses})
    unmatched = [float(r) for r in requested if not np.isclose(r, all_doses).any()]
    if unmatched:
        raise ValueError(f"which: dose(s) {unmatched} match no condition; doses present: "
                         f"{all_doses}.")
    emptied = sorted(n for n, doses in doses_of.items()
                     if all((n, d) in held for d in doses))
    if emptied:
        raise ValueError(f"which={which!r} would hold out every dose of {emptied}; they would "
                         "be unseen perturbations, not unseen doses.")
    return held


def _check_control_fractions(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(fractions, dtype=float)
    if values.shape != (3,) or (values < 0).any() or not np.isclose(values.sum(), 1.0):
        raise ValueError("control_fractions must be three non-negative numbers (train, "
                         f"validation, test) summing to 1, got {tuple(fractions)!r}.")
    return values


def _check_unit(unit: str, allowed: tuple[str, ...]) -> None:
    if unit not in allowed:
        raise ValueError(f"validation_unit must be one of {allowed}, got {unit!r}.")


def _resolve_count(value, n_available: int, argument: str, what: str) -> int:
    """An int count, or a fraction in (0, 1) of ``n_available`` (at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{argument} must be an int or a fraction in (0, 1), got {value!r}.")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        if not 0.0 < value < 1.0:
            raise ValueError(f"{argument}={value!r}: a fraction must be in (0, 1).")
        count = max(1, int(round(value * n_available)))
    else:
        count = int(value)
    if count < 1:
        raise ValueError(f"{argument}={value!r}: need at least one.")
    if count > n_available:
        raise ValueError(f"{argument}={value!r} asks to hold out {count} but there are only "
                         f"{n_available} {what}.")
    return count


def _fraction_count(fraction: float, n: int) -> int:
    """Rounded share of ``n`` items; at least one if the fraction is positive and ``n >= 2``."""
    count = int(round(fraction * n))
    if fraction > 0 and count == 0 and n >= 2:
        count = 1
    return count


def _draw(items: Sequence[str], k: int, rng, strata: dict[str, str] | None = None) -> set[str]:
    """Draw ``k`` of the sorted ``items``; spread over ``strata`` in proportion to their sizes."""
    items = sorted(items)
    if k == 0:
        return set()
    if strata is None:
        return {items[i] for i in rng.choice(len(items), size=k, replace=False)}
    groups: dict[str, list[str]] = {}
    for item in items:
        groups.setdefault(strata[item], []).append(item)
    keys = sorted(groups)
    sizes = np.array([len(groups[g]) for g in keys])
    raw = k * sizes / sizes.sum()
    quota = np.floor(raw).astype(int)
    # Largest remainders get the leftover draws; random tie-breaking.
    tie_break = rng.random(len(keys))
    for i in np.lexsort((tie_break, -(raw - quota)))[: k - quota.sum()]:
        quota[i] += 1
    quota = np.minimum(quota, sizes)  # guards against floating-point rounding only
    chosen: set[str] = set()
    for key, n in zip(keys, quota, strict=True):
        members = groups[key]
        chosen.update(members[i] for i in rng.choice(len(members), size=n, replace=False))
    return chosen


def _as_list(values) -> list[str]:
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _check_requested(requested, known: Sequence[str], argument: str, what: str) -> set[str]:
    requested = _as_list(requested)
    if not requested:
        raise ValueError(f"{argument} is empty.")
    known_set = set(known)
    problems = []
    for name in requested:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (close matches: {', '.join(map(repr, close))})" if close else ""
            problems.append(f"{name!r}{hint}")
    if problems:
        raise ValueError(f"{argument}: unknown {what}(s) {'; '.join(problems)}.")
    return set(requested)


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
