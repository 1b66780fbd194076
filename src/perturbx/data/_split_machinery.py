"""Machinery shared by the split strategies of :mod:`perturbx.data.splits`.

:class:`_Setup` validates the common arguments, parses the conditions once and turns
per-condition decisions into per-cell labels (int8 codes into :data:`SPLIT_VALUES`): it
moves validation cells or conditions, splits the control cells within covariate groups and
writes the result. The functions below it count, shuffle and draw reproducibly from a
``numpy.random.Generator`` and check the arguments every strategy shares.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from perturbx.conditions import Condition, parse_condition_columns

SPLIT_VALUES = ("train", "validation", "test")
# Labels are held as int8 codes into SPLIT_VALUES while a split is built.
_TRAIN, _VALIDATION, _TEST = 0, 1, 2


# ----------------------------------------------------------------------------- set-up


class _Setup:
    """Validated inputs and parsed conditions shared by the split functions."""

    def __init__(
        self,
        adata,
        perturbation_key,
        dose_key,
        control_value,
        control_fractions,
        covariate_keys,
        validation_fraction,
        extra_keys,
    ):
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        self.adata = adata
        self.covariate_keys = list(covariate_keys or [])
        for argument, key in [("covariate_keys", k) for k in self.covariate_keys] + [
            ("stratify_key/require_key", k) for k in extra_keys if k is not None
        ]:
            if key not in adata.obs.columns:
                raise KeyError(
                    f"{argument}: {key!r} is not a column of adata.obs; available: "
                    f"{list(adata.obs.columns)}."
                )
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
            raise ValueError(
                f"No cell has the control label {control_value!r} in obs[{perturbation_key!r}]."
            )
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
                raise ValueError(
                    f"stratify_key: perturbation {name!r} has {len(values)} values in "
                    f"obs[{key!r}] ({sorted(map(str, values))}); need exactly one."
                )
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
            warnings.warn(
                "No perturbed cell could be moved to validation (too few eligible "
                "conditions or cells); validation holds controls only.",
                stacklevel=3,
            )
        self._split_controls(labels, rng)
        adata = self.adata
        adata.obs[split_key] = pd.Categorical.from_codes(labels, categories=list(SPLIT_VALUES))
        record = {**info, "seed": int(seed)}
        adata.uns.setdefault("perturbx_splits", {})[split_key] = record
        return _summary(labels, self.codes, self.conditions)

    def _group_codes(self, extra: np.ndarray | None = None) -> np.ndarray:
        """``(n_cells,)`` codes of the covariate groups (crossed with ``extra`` codes)."""
        columns = [
            pd.factorize(self.adata.obs[k].astype(str), sort=True)[0] for k in self.covariate_keys
        ]
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
            warnings.warn(
                f"{too_small.sum()} covariate group(s) have fewer than 3 control cells, "
                "so some splits get no controls from them.",
                stacklevel=4,
            )
        order = _shuffle_within_groups(groups, rng)
        rank = np.empty(len(cells), dtype=np.int64)
        rank[order] = np.arange(len(cells)) - np.r_[0, np.cumsum(counts)][groups[order]]
        n_train, n_val = shares[groups, 0], shares[groups, 1]
        labels[cells] = np.where(
            rank < n_train, _TRAIN, np.where(rank < n_train + n_val, _VALIDATION, _TEST)
        )


# ----------------------------------------------------------------------------- cell counts


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
            rows.append(
                {
                    "split": split,
                    "kind": kind,
                    "n_cells": int(per_condition[split_code, here].sum()),
                    "n_conditions": len(here),
                    "n_perturbations": len(names),
                }
            )
    return pd.DataFrame(rows)


def _split_counts(n: int, fractions: np.ndarray) -> list[int]:
    """Split ``n`` cells by ``fractions`` (largest remainder); give validation and test at least
    one cell each when their fraction is positive and ``n >= 3``.
    """
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


# ----------------------------------------------------------------------------- arguments and draws


def _check_control_fractions(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(fractions, dtype=float)
    if values.shape != (3,) or (values < 0).any() or not np.isclose(values.sum(), 1.0):
        raise ValueError(
            "control_fractions must be three non-negative numbers (train, "
            f"validation, test) summing to 1, got {tuple(fractions)!r}."
        )
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
        raise ValueError(
            f"{argument}={value!r} asks to hold out {count} but there are only "
            f"{n_available} {what}."
        )
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
