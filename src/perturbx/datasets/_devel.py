"""The PerturBench development subset (Norman / McFaline-Figueroa) and the sci-Plex 3 drug
table.
"""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from perturbx.conditions import parse_condition_columns
from perturbx.datasets._common import CONTROL_VALUE, _dataset_info, _require_columns
from perturbx.datasets._fetch import _FILES, fetch_file

# ----------------------------------------------------------------------------- PerturBench devel

_DEVEL_COLUMNS = ["perturbation", "dose", "cell_type", "perturbation_type", "dataset"]


def norman_mcfaline_devel(cache_dir: str | os.PathLike | None = None) -> ad.AnnData:
    """PerturBench development subset: real CRISPR screens with single and double perturbations.

    5,961 cells x 500 highly variable genes from Norman et al. 2019 (K562, CRISPRa, singles and
    pairs such as ``KLF1+MAP2K6``) and McFaline-Figueroa et al. 2023 (CRISPRi in the glioma lines
    A172, T98G, U87MG). Source: PerturBench ``devel.h5ad`` (BSD-3).

    Returns
    -------
    AnnData
        ``X``: sparse CSR ``(5961, 500)``, log-normalised (log1p), as distributed; suits a
        **Gaussian** likelihood (there are no raw counts). ``.obs``: ``perturbation`` (gene,
        ``"A+B"`` for pairs, control label ``"control"``), ``dose`` (``"1"`` or ``"1+1"``),
        ``cell_type`` (``k562``, ``A172``, ``T98G``, ``U87MG``), ``perturbation_type``
        (``CRISPRa``/``CRISPRi``), ``dataset`` (``norman19``/``mcfaline23``) and the original
        columns (``condition``, ``ncounts``, ``ngenes``, ...).
    """
    path = fetch_file("perturbench_devel.h5ad", cache_dir)
    adata = ad.read_h5ad(path)
    _require_columns(adata.obs, _DEVEL_COLUMNS, f"the obs of {path.name}")
    if CONTROL_VALUE not in set(adata.obs["perturbation"].astype(str)):
        raise ValueError(f"{path.name}: no cell has the control label {CONTROL_VALUE!r}.")
    # Raises a clear error if a dose does not pair with its perturbation's members.
    parse_condition_columns(adata.obs, "perturbation", "dose", CONTROL_VALUE)
    values = adata.X.data if sparse.issparse(adata.X) else np.asarray(adata.X)
    if not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0:
        raise ValueError(f"{path.name}: X holds negative or non-finite values; not log1p data.")
    adata.uns["perturbx_dataset"] = _dataset_info(
        "norman_mcfaline_devel",
        dose_key="dose",
        smiles_key=None,
        covariate_keys=["cell_type"],
        likelihood="gaussian",
        source_url=_FILES["perturbench_devel.h5ad"].url,
    )
    return adata


# ----------------------------------------------------------------------------- sci-Plex 3


def sciplex3_smiles(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Names, SMILES and target pathways of the 188 compounds of sci-Plex 3 (Srivatsan 2020).

    Source: chemCPA ``trapnell_drugs_smiles.csv`` (MIT). The file lists the vehicle (``control``,
    DMSO) twice, once without a pathway; the row with the pathway (``Vehicle``) is kept.

    Returns
    -------
    pandas.DataFrame
        188 rows; columns ``name``, ``smiles`` and ``pathway`` (text, missing as NaN).
    """
    path = fetch_file("trapnell_drugs_smiles.csv", cache_dir)
    table = pd.read_csv(
        path, header=None, names=["name", "smiles", "pathway"], dtype=str, keep_default_na=False
    )
    table = table.apply(lambda column: column.str.strip())
    table["pathway"] = table["pathway"].replace({"": np.nan, "NA": np.nan})
    if (table["name"] == "").any() or (table["smiles"] == "").any():
        raise ValueError(f"{path.name}: a row lacks a name or a SMILES.")
    conflicting = table.groupby("name")["smiles"].nunique()
    if (conflicting > 1).any():
        raise ValueError(
            f"{path.name}: names with several SMILES: {list(conflicting[conflicting > 1].index)}"
        )
    # Stable sort puts rows with a pathway first, so drop_duplicates keeps them.
    order = table["pathway"].isna().to_numpy().argsort(kind="stable")
    deduplicated = table.iloc[order].drop_duplicates("name", keep="first")
    return deduplicated.sort_index().reset_index(drop=True)
