"""scvi-tools AnnData field that registers perturbations, doses and drug structures.

The field parses the perturbation and dose columns once (see :mod:`perturbx.conditions`),
builds the perturbation vocabulary and writes one dense ``.obsm`` array that the data loader
hands to the module. Its state registry (vocabulary, canonical SMILES, fingerprint settings,
adversary labels) is stored by :class:`scvi.data.AnnDataManager`, so it travels with
``model.save`` / ``PerturbX.load`` and is re-applied to any new AnnData.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import rich.table
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data.fields import BaseAnnDataField, CategoricalJointObsField

from perturbx.conditions import (
    COMBINATION_SEPARATOR,
    Condition,
    parse_condition_columns,
    split_smiles_combination,
)

PERTURBATIONS_KEY = "perturbations"
OBSM_KEY = "_perturbx_perturbations"
NO_LABEL = -1
# Layout of the state registry below. Bump it whenever a key is added, removed or changes
# meaning, so that a model saved with another layout fails to load with a clear message.
REGISTRY_VERSION = 1
_REGISTRY_KEYS = (
    "perturbation_key",
    "dose_key",
    "control_value",
    "vocabulary",
    "smiles",
    "labels",
    "max_members",
    "fingerprint",
)
_FINGERPRINT_KEYS = ("radius", "n_bits", "counts")


def check_registry_state(state: Mapping) -> None:
    """Raise a clear error if a (saved) perturbation registry has another layout.

    Registries written before versioning carry no ``registry_version`` and are read as
    version 1 when they have every key of that layout.
    """
    version = state.get("registry_version", 1)
    missing = [k for k in _REGISTRY_KEYS if k not in state]
    fingerprint = state.get("fingerprint")
    if isinstance(fingerprint, Mapping):
        missing += [f"fingerprint.{k}" for k in _FINGERPRINT_KEYS if k not in fingerprint]
    if version != REGISTRY_VERSION or missing:
        problem = f"keys {missing} are missing" if missing else f"it has version {version!r}"
        raise ValueError(
            "The saved perturbation registry does not match this perturbx version: "
            f"{problem} (this version reads registry version {REGISTRY_VERSION}). The model "
            "was saved by another perturbx version; load it with that version, or retrain."
        )
    if len(state["smiles"]) != len(state["vocabulary"]):
        raise ValueError(
            f"The saved perturbation registry is inconsistent: {len(state['vocabulary'])} "
            f"perturbations but {len(state['smiles'])} SMILES entries."
        )


def close_matches_text(value: str, known: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for error messages, or an empty string."""
    matches = difflib.get_close_matches(str(value), [str(k) for k in known], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


def collect_smiles(
    obs: pd.DataFrame,
    conditions: list[Condition],
    codes: np.ndarray,
    smiles_key: str | Mapping[str, str] | None,
    vocabulary: Sequence[str],
    canonicalize=None,
) -> dict[str, str]:
    """Map each perturbation that has a structure to its (raw) SMILES.

    ``smiles_key`` is an obs column (a combination lists its SMILES ``+``-joined in the same
    order as its members) or a mapping perturbation → SMILES. Perturbations without a SMILES
    get learned embeddings. ``canonicalize(smiles, name)``: two spellings of one molecule
    (aromatic or Kekulé rings, another atom order) for the same perturbation are one SMILES.
    """
    if smiles_key is None:
        return {}
    if isinstance(smiles_key, Mapping):
        unknown = sorted(set(smiles_key) - set(vocabulary))
        if unknown:
            raise ValueError(
                f"smiles_key mapping names perturbations that are not in the data: {unknown}."
            )
        return {name: s for name, s in smiles_key.items() if not _is_missing(s)}
    if smiles_key not in obs.columns:
        raise KeyError(
            f"smiles_key={smiles_key!r} is not a column of adata.obs; available columns: "
            f"{', '.join(map(repr, obs.columns))}."
        )
    column = obs[smiles_key].astype(object).to_numpy()
    found: dict[str, str] = {}
    for code, (names, _) in enumerate(conditions):
        if not names:
            continue
        for cell in np.unique(column[codes == code].astype(str)):
            if _is_missing(cell) or cell == "nan":
                continue
            members = split_smiles_combination(cell)
            if len(members) != len(names):
                raise ValueError(
                    f"obs[{smiles_key!r}] value {str(cell)!r} has {len(members)} SMILES but the "
                    f"perturbation {COMBINATION_SEPARATOR.join(names)!r} has {len(names)} "
                    "member(s); list one SMILES per member, in the same order."
                )
            for name, smi in zip(names, members, strict=True):
                if smi == "":
                    continue
                previous = found.setdefault(name, smi)
                if previous != smi and (
                    canonicalize is None or canonicalize(previous, name) != canonicalize(smi, name)
                ):
                    raise ValueError(
                        f"perturbation {name!r} has two different SMILES in "
                        f"obs[{smiles_key!r}]: {found[name]!r} and {smi!r}."
                    )
    return found


class PerturbationField(BaseAnnDataField):
    """Registers perturbation members, doses and adversary labels as one ``.obsm`` array.

    The array has shape ``(n_obs, 1 + 2 * max_members)``: column 0 is the adversary label
    (the perturbation set, dose ignored), then ``max_members`` vocabulary indices
    (``0`` = empty slot, ``i + 1`` = ``vocabulary[i]``), then the matching doses.

    Parameters
    ----------
    perturbation_key, dose_key, control_value
        See :meth:`perturbx.PerturbX.setup_anndata`.
    canonicalize
        Callable ``(smiles, name) -> canonical SMILES`` raising a clear error on invalid input.
    fingerprint_settings
        Stored in the registry so that a loaded model featurises molecules identically.
    smiles_key
        obs column or mapping perturbation → SMILES, or ``None``.
    """

    def __init__(
        self,
        perturbation_key: str,
        dose_key: str | None,
        control_value: str,
        canonicalize,
        fingerprint_settings: dict,
        smiles_key: str | Mapping[str, str] | None = None,
    ):
        super().__init__()
        self._perturbation_key = perturbation_key
        self._dose_key = dose_key
        self._control_value = control_value
        self._smiles_key = smiles_key
        self._canonicalize = canonicalize
        self._fingerprint_settings = dict(fingerprint_settings)

    registry_key = PERTURBATIONS_KEY
    attr_name = "obsm"
    attr_key = OBSM_KEY
    is_empty = False

    def validate_field(self, adata: AnnData) -> None:
        for argument, key in (
            ("perturbation_key", self._perturbation_key),
            ("dose_key", self._dose_key),
        ):
            if key is not None and key not in adata.obs.columns:
                raise KeyError(
                    f"{argument}={key!r} is not a column of adata.obs; available columns: "
                    f"{', '.join(map(repr, adata.obs.columns))}."
                )

    def _parse(self, adata: AnnData):
        self.validate_field(adata)
        return parse_condition_columns(
            adata.obs, self._perturbation_key, self._dose_key, self._control_value
        )

    def register_field(self, adata: AnnData) -> dict:
        conditions, codes = self._parse(adata)
        control_codes = [i for i, (names, _) in enumerate(conditions) if not names]
        if not control_codes or not np.isin(codes, control_codes).any():
            values = adata.obs[self._perturbation_key].astype(str).unique().tolist()
            raise ValueError(
                f"No control cells: no value of obs[{self._perturbation_key!r}] equals "
                f"control_value={self._control_value!r}"
                f"{close_matches_text(self._control_value, values)} "
                f"(values include {values[:10]})."
            )
        vocabulary = sorted({n for names, _ in conditions for n in names})
        raw_smiles = collect_smiles(
            adata.obs, conditions, codes, self._smiles_key, vocabulary, self._canonicalize
        )
        smiles = [
            self._canonicalize(raw_smiles[name], name) if name in raw_smiles else None
            for name in vocabulary
        ]
        labels = sorted({_label(names) for names, _ in conditions})
        state = {
            "perturbation_key": self._perturbation_key,
            "dose_key": self._dose_key,
            "control_value": self._control_value,
            "vocabulary": vocabulary,
            "smiles": smiles,
            "labels": labels,
            "max_members": max(len(names) for names, _ in conditions),
            "fingerprint": self._fingerprint_settings,
            "registry_version": REGISTRY_VERSION,
        }
        adata.obsm[OBSM_KEY] = _encode(conditions, codes, state)
        return state

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        check_registry_state(state_registry)
        conditions, codes = self._parse(adata_target)
        known = set(state_registry["vocabulary"])
        for names, _ in conditions:
            for name in names:
                if name not in known:
                    raise ValueError(
                        f"Perturbation {name!r} in obs[{self._perturbation_key!r}] is not known "
                        f"to the model{close_matches_text(name, state_registry['vocabulary'])}. "
                        f"Known perturbations: {state_registry['vocabulary']}. To predict a new "
                        "molecule, pass it by SMILES as a `target` of `model.predict`."
                    )
        state = dict(state_registry)
        adata_target.obsm[OBSM_KEY] = _encode(conditions, codes, state)
        return state

    def get_summary_stats(self, state_registry: dict) -> dict:
        n_molecules = sum(s is not None for s in state_registry["smiles"])
        return {
            "n_perturbations": len(state_registry["vocabulary"]),
            "n_molecules": n_molecules,
            "n_perturbation_labels": len(state_registry["labels"]),
        }

    def view_state_registry(self, state_registry: dict) -> rich.table.Table | None:
        table = rich.table.Table(title=f"Perturbations (obs[{self._perturbation_key!r}])")
        table.add_column("Perturbation")
        table.add_column("Index")
        table.add_column("Embedding")
        for i, (name, smi) in enumerate(
            zip(state_registry["vocabulary"], state_registry["smiles"], strict=True)
        ):
            table.add_row(name, str(i + 1), "fingerprint" if smi else "learned")
        return table


def _label(names: tuple[str, ...]) -> str:
    # Order-free: "A+B" and "B+A" are the same set of perturbations for the adversary.
    return COMBINATION_SEPARATOR.join(sorted(names))


def _encode(conditions: list[Condition], codes: np.ndarray, state: dict) -> np.ndarray:
    """Write conditions as the ``(n_obs, 1 + 2 * max_members)`` float32 array."""
    index = {name: i + 1 for i, name in enumerate(state["vocabulary"])}
    label_index = {label: i for i, label in enumerate(state["labels"])}
    width = max([state["max_members"]] + [len(n) for n, _ in conditions])
    table = np.zeros((len(conditions), 1 + 2 * width), dtype=np.float32)
    for row, (names, doses) in enumerate(conditions):
        table[row, 0] = label_index.get(_label(names), NO_LABEL)
        table[row, 1 : 1 + len(names)] = [index[n] for n in names]
        table[row, 1 + width : 1 + width + len(doses)] = doses
    return table[codes]


class CovariateField(CategoricalJointObsField):
    """Categorical covariates (cell type, donor, ...) as one ``.obsm`` array of codes.

    scvi-tools' :class:`~scvi.data.fields.CategoricalJointObsField` with one change: new
    cells (prediction, evaluation, :meth:`perturbx.PerturbX.load` with an AnnData) are coded
    by category *value*. scvi's field casts the column to the registered categorical dtype,
    which pandas treats as a no-op when the column already has the same categories in
    another order, so its codes would refer to the wrong categories.
    """

    def __init__(self, covariate_keys: Sequence[str] | None):
        super().__init__(REGISTRY_KEYS.CAT_COVS_KEY, list(covariate_keys) or None)

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        if self.is_empty:
            return None
        mappings = state_registry[self.MAPPINGS_KEY]
        codes = {}
        for key in self.attr_keys:
            if key not in adata_target.obs.columns:
                raise KeyError(
                    f"The registered covariate {key!r} is not a column of adata.obs; available "
                    f"columns: {', '.join(map(repr, adata_target.obs.columns))}."
                )
            known = pd.Index(np.asarray(mappings[key], dtype=object))
            values = np.asarray(adata_target.obs[key], dtype=object)
            key_codes = known.get_indexer(values)
            unknown = pd.unique(values[key_codes < 0])
            if len(unknown):
                raise ValueError(
                    f"obs[{key!r}] (a covariate) has values the model does not know: "
                    f"{unknown[:5].tolist()}"
                    f"{close_matches_text(str(unknown[0]), [str(k) for k in known])}; "
                    f"known values: {known.tolist()}."
                )
            codes[key] = key_codes.astype(np.int64)
        adata_target.obsm[self.attr_key] = pd.DataFrame(codes, index=adata_target.obs_names)
        return {
            self.MAPPINGS_KEY: mappings,
            self.FIELD_KEYS_KEY: list(self.attr_keys),
            self.N_CATS_PER_KEY: [len(mappings[k]) for k in self.attr_keys],
        }
