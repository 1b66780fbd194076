"""Standardising the ``.obs`` of users' own data, and loaders of the full public screens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch
from scipy import sparse

from perturbx.conditions import COMBINATION_SEPARATOR, format_condition, parse_condition_columns
from perturbx.datasets._common import CONTROL_VALUE, _dataset_info, _require_columns
from perturbx.datasets._devel import sciplex3_smiles
from perturbx.datasets._fetch import data_cache_dir

# Public scPerturb (Peidli et al. 2024) copies of the full screens. Not reachable from the
# machine this package was written on, so neither the URLs nor the obs layout were verified.
SCIPLEX3_URL = "https://zenodo.org/records/7041849/files/SrivatsanTrapnell2020_sciplex3.h5ad"
NORMAN2019_URL = "https://zenodo.org/records/7041849/files/NormanWeissman2019_filtered.h5ad"


def standardize_obs(
    adata: ad.AnnData,
    *,
    perturbation_key: str,
    control_values: Sequence[str] = ("control",),
    combination_separator: str = COMBINATION_SEPARATOR,
    dose_key: str | None = None,
    dose_scale: float = 1.0,
    cell_type_key: str | None = None,
    cell_type: str | None = None,
    perturbation_type: str | None = None,
    dataset: str | None = None,
) -> ad.AnnData:
    """Return a copy of ``adata`` with perturbx-standard ``.obs`` columns.

    Adds ``perturbation`` (members joined by ``"+"``; cells whose entry is one of
    ``control_values`` become ``"control"``; members equal to a control value, as in GEARS'
    ``"KLF1+ctrl"``, are dropped), ``dose``, ``cell_type``, ``perturbation_type`` and ``dataset``.
    An original ``perturbation`` column is renamed ``perturbation_original``. Distinct entries
    are converted once, so this is fast on millions of cells.

    Parameters
    ----------
    perturbation_key
        Column with perturbation names; combinations joined by ``combination_separator``.
    control_values
        Labels of unperturbed cells (also recognised as members of combinations).
    dose_key
        Column with doses: numbers (single perturbations) or text joined by
        ``combination_separator``. ``None`` gives every member dose 1.
    dose_scale
        Multiplier applied to doses, e.g. ``1e-3`` for nM to µM.
    cell_type_key, cell_type
        Column holding the cell type, or one cell type for all cells.

    Returns
    -------
    AnnData
        A copy; existing ``dose``/``cell_type``/... columns are replaced. ``dose`` is a float
        column (control 0.0) when no cell has a combination, otherwise text such as
        ``"1.0+1.0"`` (control ``"0"``).
    """
    obs = adata.obs
    _require_columns(
        obs, [k for k in (perturbation_key, dose_key, cell_type_key) if k], "adata.obs"
    )
    if (cell_type_key is None) == (cell_type is None):
        raise ValueError("Give exactly one of cell_type_key (a column) or cell_type (a label).")
    if not combination_separator:
        raise ValueError("combination_separator must be a non-empty string.")
    controls = {str(c) for c in control_values}
    perturbations = obs[perturbation_key].astype(object).to_numpy()
    missing = pd.isna(perturbations)
    if missing.any():
        raise ValueError(
            f"obs[{perturbation_key!r}] is missing for {missing.sum()} cells "
            f"(first: {obs.index[missing.argmax()]!r})."
        )
    if dose_key:
        # Factorise each column, then the pairs of integer codes (fast on millions of cells).
        p_codes, p_uniques = pd.factorize(perturbations)
        d_codes, d_uniques = pd.factorize(obs[dose_key].astype(object), use_na_sentinel=False)
        pair_codes = p_codes.astype(np.int64) * len(d_uniques) + d_codes
        unique_pairs, codes = np.unique(pair_codes, return_inverse=True)
        n_doses = len(d_uniques)
        pairs = [(p_uniques[c // n_doses], d_uniques[c % n_doses]) for c in unique_pairs]
    else:
        codes, uniques = pd.factorize(perturbations)
        pairs = [(p, None) for p in uniques]
    converted = [
        _standard_condition(p, d, controls, combination_separator, dose_scale, perturbation_key)
        for p, d in pairs
    ]
    has_combination = any(len(names) > 1 for names, _ in converted)
    labels, dose_values = [], []
    for names, member_doses in converted:
        label, dose_text = format_condition(names, member_doses, control_value=CONTROL_VALUE)
        labels.append(label)
        if has_combination:
            dose_values.append(dose_text or "0")
        else:
            dose_values.append(member_doses[0] if member_doses else 0.0)

    result = adata.copy()
    new_obs = result.obs.rename(columns={"perturbation": "perturbation_original"})
    new_obs["perturbation"] = pd.Categorical(np.asarray(labels, dtype=object)[codes])
    dose_column = np.asarray(dose_values, dtype=object if has_combination else np.float64)[codes]
    new_obs["dose"] = pd.Categorical(dose_column) if has_combination else dose_column
    new_obs["cell_type"] = pd.Categorical(
        obs[cell_type_key].astype(str).to_numpy() if cell_type_key else np.full(len(obs), cell_type)
    )
    for column, value in (("perturbation_type", perturbation_type), ("dataset", dataset)):
        if value is not None:
            new_obs[column] = pd.Categorical(np.full(len(obs), value))
    # The one perturbx parser checks the result (pairing, finite non-negative doses).
    parse_condition_columns(new_obs, "perturbation", "dose", CONTROL_VALUE)
    result.obs = new_obs
    return result


def _standard_condition(perturbation, dose, controls, separator, dose_scale, key):
    text = str(perturbation).strip()
    if text in controls:
        return (), ()
    members = [m.strip() for m in text.split(separator)]
    if any(m == "" for m in members):
        raise ValueError(f"obs[{key!r}]: {perturbation!r} has an empty member.")
    if dose is not None and pd.isna(dose):
        raise ValueError(f"obs[{key!r}]: the dose of {perturbation!r} is missing.")
    try:
        if dose is None:
            member_doses = [1.0] * len(members)
        elif isinstance(dose, str):
            member_doses = [float(d) * dose_scale for d in dose.split(separator)]
        else:
            member_doses = [float(dose) * dose_scale]
    except (TypeError, ValueError):
        raise ValueError(
            f"obs[{key!r}]: dose {dose!r} of {perturbation!r} is not a number or a "
            f"{separator!r}-joined list of numbers."
        ) from None
    if len(member_doses) != len(members):
        raise ValueError(
            f"obs[{key!r}]: {perturbation!r} has {len(members)} members but dose "
            f"{dose!r} has {len(member_doses)} values."
        )
    kept = [(m, d) for m, d in zip(members, member_doses, strict=True) if m not in controls]
    if any(COMBINATION_SEPARATOR in m for m, _ in kept):
        raise ValueError(
            f"obs[{key!r}]: member names in {perturbation!r} contain "
            f"{COMBINATION_SEPARATOR!r}; pass the right combination_separator."
        )
    return tuple(m for m, _ in kept), tuple(d for _, d in kept)


def load_sciplex3(
    path_or_url: str | os.PathLike = SCIPLEX3_URL,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    perturbation_key: str = "perturbation",
    dose_key: str = "dose_value",
    cell_type_key: str = "cell_line",
) -> ad.AnnData:
    """Load the full sci-Plex 3 screen (Srivatsan et al. 2020) in perturbx format.

    188 compounds at 4 doses in A549, K562 and MCF7 cells, about 650k cells. The default URL is
    scPerturb's harmonised h5ad (:data:`SCIPLEX3_URL`, several GB), whose obs has
    ``perturbation`` (``"control"`` for vehicle), ``dose_value`` (nM) and ``cell_line``.
    **Neither the URL nor this layout could be verified where this code was written (no
    internet)**; only the column conversion is tested, on small hand-made data. Pass the
    column names if your copy differs, and ``sha256`` once you know the file's hash.

    Returns
    -------
    AnnData
        As the file, plus obs ``perturbation``, ``dose`` (µM, float), ``cell_type``,
        ``perturbation_type`` (``"drug"``), ``dataset``, and ``smiles``/``has_smiles`` joined by
        compound name from :func:`sciplex3_smiles`. Likelihood: ``"nb"`` if X holds counts,
        otherwise ``"gaussian"``.
    """
    path = _local_or_download(path_or_url, cache_dir, sha256)
    adata = standardize_obs(
        ad.read_h5ad(path),
        perturbation_key=perturbation_key,
        dose_key=dose_key,
        dose_scale=1e-3,
        cell_type_key=cell_type_key,
        perturbation_type="drug",
        dataset="sciplex3",
    )
    table = sciplex3_smiles(cache_dir)
    smiles_by_name = dict(zip(table["name"], table["smiles"], strict=True))
    smiles = adata.obs["perturbation"].astype(str).map(smiles_by_name)
    is_control = (adata.obs["perturbation"] == CONTROL_VALUE).to_numpy()
    adata.obs["smiles"] = smiles.where(~is_control).fillna("").astype(str)
    adata.obs["has_smiles"] = (adata.obs["smiles"] != "").to_numpy()
    adata.uns["perturbx_dataset"] = _dataset_info(
        "sciplex3",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
        likelihood=_likelihood_for(adata.X),
        source_url=str(path_or_url),
    )
    return adata


def load_norman2019(
    path_or_url: str | os.PathLike = NORMAN2019_URL,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    perturbation_key: str = "perturbation",
    combination_separator: str = "_",
    control_values: Sequence[str] = ("control",),
) -> ad.AnnData:
    """Load the full Norman et al. 2019 CRISPRa screen (K562, ~100k cells, 131 gene pairs).

    The default URL is scPerturb's harmonised h5ad (:data:`NORMAN2019_URL`), whose
    ``perturbation`` column joins the two genes of a pair with ``"_"`` and labels unperturbed
    cells ``"control"``. **Neither the URL nor this layout could be verified where this code was
    written (no internet)**; only the column conversion is tested, on small hand-made data. For
    the GEARS copy use ``perturbation_key="condition"``, ``combination_separator="+"``,
    ``control_values=("ctrl",)``.

    Returns
    -------
    AnnData
        As the file, plus obs ``perturbation`` (``"A+B"``), ``dose`` (``"1.0"``/``"1.0+1.0"``),
        ``cell_type`` (``"K562"``), ``perturbation_type`` (``"CRISPRa"``), ``dataset``.
    """
    path = _local_or_download(path_or_url, cache_dir, sha256)
    adata = standardize_obs(
        ad.read_h5ad(path),
        perturbation_key=perturbation_key,
        control_values=control_values,
        combination_separator=combination_separator,
        cell_type="K562",
        perturbation_type="CRISPRa",
        dataset="norman19",
    )
    adata.uns["perturbx_dataset"] = _dataset_info(
        "norman2019",
        dose_key="dose",
        smiles_key=None,
        covariate_keys=["cell_type"],
        likelihood=_likelihood_for(adata.X),
        source_url=str(path_or_url),
    )
    return adata


def _local_or_download(path_or_url, cache_dir, sha256: str | None) -> Path:
    text = str(path_or_url)
    if text.startswith(("http://", "https://", "ftp://")):
        known_hash = f"sha256:{sha256}" if sha256 else None
        return Path(pooch.retrieve(text, known_hash=known_hash, path=data_cache_dir(cache_dir)))
    path = Path(path_or_url)
    if not path.is_file():
        raise FileNotFoundError(f"No such h5ad file: {path}.")
    return path


def _likelihood_for(matrix) -> str:
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    sample = values[:1_000_000]
    is_counts = sample.size > 0 and sample.min() >= 0 and np.all(sample == np.round(sample))
    return "nb" if is_counts else "gaussian"
