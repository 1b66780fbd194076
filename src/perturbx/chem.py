"""Molecules: SMILES canonicalisation, Morgan fingerprints and Tanimoto similarity.

Everything that touches RDKit lives here, so the rest of the package sees molecules only as
canonical SMILES strings and ``float32`` feature matrices.

Featurisation is deduplicated and cached: a screen with a million cells and two hundred drugs
parses and fingerprints two hundred molecules, whatever the number of cells.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem import rdFingerprintGenerator

__all__ = [
    "InvalidSmilesError",
    "MorganFeaturizer",
    "canonical_smiles",
    "canonical_smiles_array",
    "nearest_reference",
    "tanimoto_similarity",
]

#: How many invalid entries an :class:`InvalidSmilesError` lists before summarising.
_MAX_LISTED_ERRORS = 5


class InvalidSmilesError(ValueError):
    """A SMILES string that RDKit cannot read (or that is empty or missing)."""


def _describe(smiles: object, name: str | None) -> str:
    """Text naming one offending entry, e.g. ``drug 'X' (SMILES 'C1CC')``."""
    if name is None:
        return f"SMILES {smiles!r}"
    return f"drug {name!r} (SMILES {smiles!r})"


def _is_missing(smiles: object) -> bool:
    if smiles is None or smiles is pd.NA:
        return True
    return isinstance(smiles, float) and math.isnan(smiles)


def _parse_mol(smiles: object, name: str | None = None) -> Chem.Mol:
    """Parse one SMILES with RDKit's logging silenced; raise :class:`InvalidSmilesError`.

    Surrounding whitespace is ignored (tables often carry it after the delimiter).
    """
    if _is_missing(smiles):
        raise InvalidSmilesError(f"{_describe(smiles, name)}: the SMILES is missing.")
    if not isinstance(smiles, str):
        raise InvalidSmilesError(
            f"{_describe(smiles, name)}: expected a SMILES string, got {type(smiles).__name__}."
        )
    text = smiles.strip()
    if not text:
        # RDKit reads "" as a molecule without atoms; for a drug that is always a data error.
        raise InvalidSmilesError(f"{_describe(smiles, name)}: the SMILES is empty.")
    # BlockLogs silences RDKit's own stderr messages for this block: users see only our error.
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(text)
    if mol is None:
        raise InvalidSmilesError(f"{_describe(smiles, name)}: RDKit cannot parse this SMILES.")
    if mol.GetNumAtoms() == 0:
        raise InvalidSmilesError(f"{_describe(smiles, name)}: the molecule has no atoms.")
    return mol


def _mol_to_canonical(mol: Chem.Mol) -> str:
    with rdBase.BlockLogs():
        return Chem.MolToSmiles(mol)


@lru_cache(maxsize=200_000)
def _canonical_cached(text: str) -> str:
    # Cached by the raw string; only valid strings get here (errors are not cached by lru_cache).
    return _mol_to_canonical(_parse_mol(text))


def canonical_smiles(smiles: str, name: str | None = None) -> str:
    """RDKit canonical SMILES of one molecule.

    Different spellings of the same molecule (atom order, aromatic or Kekulé rings, explicit
    or implicit hydrogens) give the same string. Results are cached by the input string.

    Parameters
    ----------
    smiles
        A SMILES string; surrounding whitespace is ignored.
    name
        The drug's name, used only in the error message.

    Returns
    -------
    The canonical (isomeric) SMILES.

    Raises
    ------
    InvalidSmilesError
        If ``smiles`` is missing (None/NaN), empty, or cannot be parsed. The message names the
        drug (if given) and the string.
    """
    if not isinstance(smiles, str) or not smiles.strip():
        _parse_mol(smiles, name)  # raises with the right message
    try:
        return _canonical_cached(smiles)
    except InvalidSmilesError:
        _parse_mol(smiles, name)  # re-raise, this time naming the drug
        raise


def _factorize_with_names(
    smiles: Sequence[object], names: Sequence[object] | None
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Distinct input strings, the code of each input, and the first name seen for each."""
    values = np.asarray(smiles, dtype=object).reshape(-1) if len(smiles) else np.empty(0, object)
    if names is not None and len(names) != len(values):
        raise ValueError(f"names has {len(names)} entries but smiles has {len(values)}.")
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    if names is None:
        first_names: list[str | None] = [None] * len(uniques)
    else:
        first_index = np.full(len(uniques), -1, dtype=np.int64)
        # Reversed assignment leaves the *first* occurrence's index for each code.
        first_index[codes[::-1]] = np.arange(len(codes))[::-1]
        name_values = np.asarray(names, dtype=object)
        first_names = [str(name_values[i]) for i in first_index]
    return np.asarray(uniques, dtype=object), np.asarray(codes, dtype=np.int64), first_names


def _raise_collected(errors: list[str], n_distinct: int) -> None:
    listed = "; ".join(e.rstrip(".") for e in errors[:_MAX_LISTED_ERRORS])
    more = len(errors) - _MAX_LISTED_ERRORS
    suffix = f"; and {more} more" if more > 0 else ""
    raise InvalidSmilesError(
        f"{len(errors)} of {n_distinct} distinct SMILES are invalid: {listed}{suffix}."
    )


def canonical_smiles_array(smiles: Sequence[str], names: Sequence[str] | None = None) -> np.ndarray:
    """Canonicalise many SMILES, parsing each distinct string once.

    Parameters
    ----------
    smiles
        ``(n,)`` SMILES strings (e.g. an ``obs`` column with one entry per cell).
    names
        ``(n,)`` drug names for error messages.

    Returns
    -------
    ``(n,)`` object array of canonical SMILES.

    Raises
    ------
    InvalidSmilesError
        If any entry is invalid; all input is checked first and the message lists the
        offending drugs and strings.
    """
    uniques, codes, first_names = _factorize_with_names(smiles, names)
    canonical: list[str] = []
    errors: list[str] = []
    for value, name in zip(uniques, first_names, strict=True):
        try:
            canonical.append(canonical_smiles(value, name=name))
        except InvalidSmilesError as err:
            errors.append(str(err))
            canonical.append("")
    if errors:
        _raise_collected(errors, len(uniques))
    return np.asarray(canonical, dtype=object)[codes]


@dataclasses.dataclass(eq=False)
class MorganFeaturizer:
    """Morgan (ECFP-like) fingerprints of SMILES strings, cached by canonical SMILES.

    Parameters
    ----------
    radius
        Largest radius of the circular atom environments (2 corresponds to ECFP4).
    n_bits
        Length of the folded fingerprint.
    counts
        If True, count how often each environment occurs instead of 0/1 bits.
    chirality
        If True, atom environments include R/S tags (RDKit's ``includeChirality``), so that
        stereoisomers (e.g. ruxolitinib and S-ruxolitinib) get different fingerprints.
        Without it they are one molecule to the model.

    Examples
    --------
    >>> featurize = MorganFeaturizer(radius=2, n_bits=1024)
    >>> featurize(["CCO", "OCC", "c1ccccc1"]).shape
    (3, 1024)
    """

    radius: int = 2
    n_bits: int = 2048
    counts: bool = False
    chirality: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, np.integer)):
            raise ValueError(f"radius must be an integer, got {self.radius!r}.")
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0, got {self.radius}.")
        if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, (int, np.integer)):
            raise ValueError(f"n_bits must be an integer, got {self.n_bits!r}.")
        if self.n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {self.n_bits}.")
        if not isinstance(self.counts, (bool, np.bool_)):
            raise ValueError(f"counts must be True or False, got {self.counts!r}.")
        if not isinstance(self.chirality, (bool, np.bool_)):
            raise ValueError(f"chirality must be True or False, got {self.chirality!r}.")
        self.chirality = bool(self.chirality)
        self.radius = int(self.radius)
        self.n_bits = int(self.n_bits)
        self.counts = bool(self.counts)
        self._reset_cache()

    def _reset_cache(self) -> None:
        # raw input string -> canonical SMILES; canonical SMILES -> fingerprint row
        self._canonical_of: dict[str, str] = {}
        self._fingerprint_of: dict[str, np.ndarray] = {}
        self._generator = rdFingerprintGenerator.GetMorganGenerator(
            radius=self.radius, fpSize=self.n_bits, includeChirality=self.chirality
        )

    # RDKit generators cannot be pickled; keep only the settings and rebuild the rest.
    def __getstate__(self) -> dict[str, Any]:
        return self.to_dict()

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.radius, self.n_bits, self.counts = state["radius"], state["n_bits"], state["counts"]
        self.chirality = state.get("chirality", False)
        self.__post_init__()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MorganFeaturizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for a model registry or JSON)."""
        return {
            "radius": self.radius,
            "n_bits": self.n_bits,
            "counts": self.counts,
            "chirality": self.chirality,
        }

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> MorganFeaturizer:
        """Rebuild a featuriser from :meth:`to_dict` output; unknown keys are an error."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(
                f"Unknown MorganFeaturizer setting(s) {sorted(unknown)}; "
                f"allowed: {sorted(allowed)}."
            )
        return cls(**dict(settings))

    @property
    def n_cached(self) -> int:
        """Number of distinct molecules whose fingerprint is cached."""
        return len(self._fingerprint_of)

    def clear_cache(self) -> None:
        """Forget all cached molecules."""
        self._canonical_of.clear()
        self._fingerprint_of.clear()

    def _fingerprint(self, mol: Chem.Mol) -> np.ndarray:
        # Kept in RDKit's compact dtype (uint8 bits, uint32 counts); float32 only on output.
        if self.counts:
            return self._generator.GetCountFingerprintAsNumPy(mol)
        return self._generator.GetFingerprintAsNumPy(mol)

    def _featurize_distinct(self, values: Iterable[object], names: Iterable[str | None]):
        """Fingerprint rows for distinct input values; all errors collected before raising."""
        rows: list[np.ndarray | None] = []
        errors: list[str] = []
        for value, name in zip(values, names, strict=True):
            canonical = self._canonical_of.get(value) if isinstance(value, str) else None
            if canonical is None:
                try:
                    mol = _parse_mol(value, name)
                except InvalidSmilesError as err:
                    errors.append(str(err))
                    rows.append(None)
                    continue
                canonical = _mol_to_canonical(mol)
                if canonical not in self._fingerprint_of:
                    self._fingerprint_of[canonical] = self._fingerprint(mol)
                self._canonical_of[value] = canonical
            rows.append(self._fingerprint_of[canonical])
        return rows, errors

    def __call__(self, smiles: Sequence[str], names: Sequence[str] | None = None) -> np.ndarray:
        """Fingerprint matrix of the given molecules.

        Parameters
        ----------
        smiles
            ``(n,)`` SMILES strings; repeats are cheap (each distinct string is parsed once,
            each distinct molecule fingerprinted once, across calls).
        names
            ``(n,)`` drug names, used in error messages.

        Returns
        -------
        ``(n, n_bits)`` float32 array: 0/1 bits, or counts if ``counts=True``.

        Raises
        ------
        InvalidSmilesError
            If any entry is missing, empty or unparsable. The whole input is checked first; the
            message lists the offending drugs and strings.
        """
        distinct, codes = self.featurize_unique(smiles, names)
        return distinct[codes]

    def featurize_unique(
        self, smiles: Sequence[str], names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fingerprints of the distinct input strings and the code of each input.

        ``distinct[codes]`` equals ``self(smiles)``; use this form for many cells and few
        drugs, where the broadcast ``(n, n_bits)`` matrix would be large.

        Returns
        -------
        distinct
            ``(n_distinct, n_bits)`` float32 fingerprints, in order of first appearance.
            Two spellings of one molecule get two identical rows.
        codes
            ``(n,)`` int64 row of ``distinct`` for each input.
        """
        if isinstance(smiles, str):
            raise ValueError("smiles must be a sequence of SMILES strings, not a single string.")
        uniques, codes, first_names = _factorize_with_names(smiles, names)
        rows, errors = self._featurize_distinct(uniques, first_names)
        if errors:
            _raise_collected(errors, len(uniques))
        if not rows:
            return np.zeros((0, self.n_bits), dtype=np.float32), codes
        return np.stack(rows).astype(np.float32), codes


def tanimoto_similarity(
    query: Sequence[str],
    reference: Sequence[str],
    *,
    radius: int = 2,
    n_bits: int = 2048,
    query_names: Sequence[str] | None = None,
    reference_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Tanimoto similarity of Morgan bit fingerprints between two lists of molecules.

    ``|a AND b| / |a OR b|``, computed exactly on the bit matrices (equal to RDKit's
    ``DataStructs.TanimotoSimilarity``; two molecules without any bit get 0, as in RDKit).

    Parameters
    ----------
    query, reference
        ``(n_query,)`` and ``(n_reference,)`` SMILES strings.
    radius, n_bits
        Morgan fingerprint settings.
    query_names, reference_names
        Drug names for error messages.

    Returns
    -------
    ``(n_query, n_reference)`` float64 array with values in [0, 1].
    """
    featurize = MorganFeaturizer(radius=radius, n_bits=n_bits, counts=False)
    query_bits = featurize(query, query_names).astype(np.float64)
    reference_bits = featurize(reference, reference_names).astype(np.float64)
    # float64 matrix products of 0/1 rows are exact integer counts.
    intersection = query_bits @ reference_bits.T
    union = query_bits.sum(1)[:, None] + reference_bits.sum(1)[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        similarity = np.where(union > 0, intersection / union, 0.0)
    return similarity


def minmax_similarity(a: np.ndarray, b: np.ndarray, block_rows: int = 64) -> np.ndarray:
    """MinMax (generalised Tanimoto) similarity of non-negative feature vectors.

    ``sum(min(a, b)) / sum(max(a, b))`` for every pair of rows: for 0/1 fingerprints it is
    the Tanimoto similarity, for count fingerprints its usual extension (a positive
    semi-definite kernel, so it can serve a kernel ridge). Two all-zero vectors get 0.

    Parameters
    ----------
    a, b
        ``(n, F)`` and ``(m, F)`` non-negative arrays (e.g. Morgan count fingerprints).
    block_rows
        Rows of ``a`` compared at a time (memory ``block_rows × m × F``).

    Returns
    -------
    ``(n, m)`` float64 array with values in [0, 1].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be 2-D with the same width; got {a.shape}, {b.shape}.")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("MinMax similarity needs non-negative features (counts or bits).")
    out = np.empty((a.shape[0], b.shape[0]))
    totals_b = b.sum(axis=1)
    for start in range(0, a.shape[0], block_rows):
        block = a[start : start + block_rows]
        minimum = np.minimum(block[:, None, :], b[None, :, :]).sum(axis=2)
        maximum = block.sum(axis=1)[:, None] + totals_b[None, :] - minimum
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + block_rows] = np.where(maximum > 0, minimum / maximum, 0.0)
    return out


def nearest_reference(
    query: Sequence[str],
    reference: Sequence[str],
    reference_names: Sequence[str] | None = None,
    *,
    query_names: Sequence[str] | None = None,
    radius: int = 2,
    n_bits: int = 2048,
) -> pd.DataFrame:
    """For each query molecule, the most similar reference molecule and its similarity.

    Use it to see how far out of the training distribution a new molecule is: a maximal
    Tanimoto similarity below ~0.3 means no training drug shares much structure with it.

    Parameters
    ----------
    query
        ``(n_query,)`` SMILES of the molecules to check.
    reference
        ``(n_reference,)`` SMILES of the reference (e.g. training) molecules.
    reference_names
        ``(n_reference,)`` names of the references; defaults to their SMILES.
    query_names
        ``(n_query,)`` names of the queries, used as the index; defaults to their SMILES.
    radius, n_bits
        Morgan fingerprint settings.

    Returns
    -------
    DataFrame with one row per query (index: query name) and columns ``max_similarity``
    (float in [0, 1]), ``nearest_reference`` (name) and ``nearest_reference_smiles``.
    """
    if len(reference) == 0:
        raise ValueError("reference is empty: need at least one reference molecule.")
    if reference_names is not None and len(reference_names) != len(reference):
        raise ValueError(
            f"reference_names has {len(reference_names)} entries but reference has "
            f"{len(reference)}."
        )
    similarity = tanimoto_similarity(
        query,
        reference,
        radius=radius,
        n_bits=n_bits,
        query_names=query_names,
        reference_names=reference_names,
    )
    ref_labels = np.asarray(reference if reference_names is None else reference_names, object)
    best = similarity.argmax(axis=1) if len(query) else np.zeros(0, dtype=np.int64)
    index = pd.Index(query if query_names is None else query_names, name="query")
    return pd.DataFrame(
        {
            "max_similarity": similarity[np.arange(len(best)), best],
            "nearest_reference": ref_labels[best],
            "nearest_reference_smiles": np.asarray(reference, dtype=object)[best],
        },
        index=index,
    )


def warn_indistinguishable_molecules(
    state: Mapping[str, Any], featurizer: MorganFeaturizer
) -> list[list[str]]:
    """Warn about perturbations whose molecules the model cannot tell apart.

    Two names with one canonical SMILES are the same molecule; two molecules with identical
    fingerprints (stereoisomers without ``chirality``, or a fingerprint too coarse) get
    identical embeddings and predictions. ``state`` is the perturbation registry
    (``vocabulary``, canonical ``smiles``).

    Returns
    -------
    The groups of names (each of two or more) that share a fingerprint.
    """
    named = [(n, s) for n, s in zip(state["vocabulary"], state["smiles"], strict=True) if s]
    if len(named) < 2:
        return []
    fingerprints = featurizer([s for _, s in named])
    _, group, counts = np.unique(fingerprints, axis=0, return_inverse=True, return_counts=True)
    groups = [
        [named[i][0] for i in np.flatnonzero(group.ravel() == g)]
        for g in np.flatnonzero(counts > 1)
    ]
    if groups:
        smiles_of = dict(named)
        kinds = [
            "one molecule" if len({smiles_of[n] for n in names}) == 1 else "different molecules"
            for names in groups
        ]
        described = "; ".join(
            f"{names} ({kind})" for names, kind in zip(groups, kinds, strict=True)
        )
        warnings.warn(
            f"The model cannot tell these perturbations apart (identical fingerprints, so "
            f"identical embeddings and predictions): {described}. For stereoisomers, set "
            "fingerprint_chirality=True in setup_anndata; for one molecule under two names, "
            "merge the names.",
            UserWarning,
            stacklevel=3,
        )
    return groups
