"""GCT reader and the LINCS L1000 A375 plate."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from anndata.utils import make_index_unique

from perturbx.conditions import COMBINATION_SEPARATOR
from perturbx.datasets._common import CONTROL_VALUE, _dataset_info, _require_columns
from perturbx.datasets._fetch import _FILES, fetch_file

# CMap writes "-666" for "not applicable" in GCT metadata.
_CMAP_MISSING = "-666"


# ----------------------------------------------------------------------------- GCT


def read_gct(path: str | os.PathLike) -> ad.AnnData:
    """Read a GCT 1.3 (or 1.2) expression file into AnnData.

    GCT 1.3 layout: line 1 ``#1.3``; line 2 ``n_rows n_cols n_row_meta n_col_meta``; line 3
    ``id``, the row-metadata names and the column (sample) ids; then ``n_col_meta`` lines of
    column metadata (name, ``n_row_meta`` fillers, one value per sample); then ``n_rows`` data
    lines (row id, row metadata, one value per sample). GCT 1.2 has no metadata counts and one
    ``Description`` row-metadata column.

    Returns
    -------
    AnnData
        ``X``: float32 ``(n_cols, n_rows)``, i.e. samples x features; ``.obs``: column metadata
        indexed by sample id; ``.var``: row metadata indexed by row id. Metadata are kept as text,
        with the CMap code ``-666`` (not applicable) and empty fields turned into missing values.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        version = handle.readline().strip()
        dims_text = handle.readline().rstrip("\r\n").split("\t")
        header = handle.readline().rstrip("\r\n").split("\t")
    try:
        dims = [int(d) for d in dims_text if d.strip() != ""]
    except ValueError:
        raise ValueError(
            f"{path}: line 2 {dims_text!r} is not a list of integer dimensions."
        ) from None
    if version == "#1.3" and len(dims) == 4:
        n_rows, n_cols, n_row_meta, n_col_meta = dims
    elif version == "#1.2" and len(dims) == 2:
        (n_rows, n_cols), n_row_meta, n_col_meta = dims, 1, 0
    else:
        raise ValueError(
            f"{path}: not a GCT 1.3/1.2 file (version line {version!r}, dimensions {dims_text!r})."
        )
    if len(header) != 1 + n_row_meta + n_cols:
        raise ValueError(
            f"{path}: the header line has {len(header)} fields, expected 1 + {n_row_meta} "
            f"row-metadata names + {n_cols} sample ids = {1 + n_row_meta + n_cols}."
        )
    table = pd.read_csv(
        path,
        sep="\t",
        skiprows=3,
        header=None,
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
    )
    if table.shape != (n_col_meta + n_rows, len(header)):
        raise ValueError(
            f"{path}: body is {table.shape[0]} lines x {table.shape[1]} fields, expected "
            f"{n_col_meta} column-metadata + {n_rows} data lines x {len(header)} fields."
        )
    sample_ids = pd.Index(header[1 + n_row_meta :])
    if not sample_ids.is_unique:
        raise ValueError(
            f"{path}: sample ids are not unique: {sample_ids[sample_ids.duplicated()][:5]}"
        )

    def clean(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.mask(frame.isin([_CMAP_MISSING, ""]))

    col_block = table.iloc[:n_col_meta]
    obs = clean(col_block.iloc[:, 1 + n_row_meta :].T)
    obs.index, obs.columns = sample_ids, pd.Index(col_block.iloc[:, 0], name=None)

    body = table.iloc[n_col_meta:]
    var = clean(body.iloc[:, 1 : 1 + n_row_meta])
    var.index, var.columns = pd.Index(body.iloc[:, 0], name=None), header[1 : 1 + n_row_meta]
    try:
        values = body.iloc[:, 1 + n_row_meta :].to_numpy(dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: the data block holds a non-numeric value ({err}).") from None
    obs.index.name = var.index.name = None
    return ad.AnnData(X=values.T.astype(np.float32), obs=obs, var=var)


# ----------------------------------------------------------------------------- LINCS A375

_LINCS_TYPES = {"trt_cp": "drug", "ctl_vehicle": "vehicle", "trt_poscon": "positive_control"}
_DOSE_UNIT_TO_MICROMOLAR = {"um": 1.0, "µm": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3}
# Raw GCT column metadata kept in .obs: plate/well provenance, perturbation fields and QC.
_LINCS_RAW_TEXT = [
    "pert_id",
    "pert_iname",
    "pert_type",
    "pert_dose",
    "pert_dose_unit",
    "det_plate",
    "det_well",
    "rna_plate",
    "rna_well",
    "bead_batch",
    "x_hmsl_id",
]
_LINCS_RAW_NUMBER = ["pert_time", "qc_slope", "qc_f_logp", "qc_iqr", "count_mean", "count_cv"]


def lincs_a375(
    cache_dir: str | os.PathLike | None = None, *, drop_missing_smiles: bool = False
) -> ad.AnnData:
    """LINCS L1000 Level-3 profiles of A375 melanoma cells treated with kinase inhibitors.

    One 384-well plate (HMS LINCS LJP005, 24 h): 55 kinase inhibitors at 5-6 doses
    (0.04-10 µM), 4 positive-control compounds and 26 DMSO vehicle wells; 978 landmark genes.
    Source: ``test_l1000.gct`` of cmapPy (BSD-3), SMILES from the chemCPA LINCS table (MIT).

    Parameters
    ----------
    cache_dir
        Cache folder; see :func:`data_cache_dir`.
    drop_missing_smiles
        Drop the wells of the 8 drugs that have no SMILES in the LINCS table (48 wells).

    Returns
    -------
    AnnData
        ``X``: float32 ``(377, 978)`` quantile-normalised log2 expression (about 3-15), dense;
        suits a **Gaussian** likelihood. ``.var`` index: gene symbols; columns ``gene_id``
        (Entrez), ``probe_id``, ``gene_title``, ``analyte_id``, ``is_landmark``.
        ``.obs`` index: sample ids; columns

        - ``perturbation``: compound name (``pert_iname``); vehicle wells are ``"control"``;
        - ``perturbation_type``: ``"drug"``, ``"positive_control"`` or ``"vehicle"``;
        - ``dose``: float, µM; 0.0 for the vehicle;
        - ``brd_id``: 13-character Broad id (``pert_id`` truncated); ``"DMSO"`` for vehicle;
        - ``smiles`` (``""`` when unknown or vehicle) and ``has_smiles`` (bool);
        - ``cell_type``: ``"A375"``;
        - raw GCT metadata: ``pert_*``, ``det_plate``/``det_well``, ``rna_plate``/``rna_well``,
          ``bead_batch``, ``x_hmsl_id``, ``pert_time`` (h) and QC values.
    """
    gct = read_gct(fetch_file("test_l1000.gct", cache_dir))
    smiles_by_brd = _read_lincs_smiles(fetch_file("lincs_drugs_smiles.csv", cache_dir))
    meta = gct.obs
    needed = ["pert_type", "pert_iname", "pert_id", "pert_dose", "pert_dose_unit", "cell_id"]
    _require_columns(meta, needed, "the column metadata of test_l1000.gct")

    unknown_types = sorted(set(meta["pert_type"].dropna()) - set(_LINCS_TYPES))
    if unknown_types or meta["pert_type"].isna().any():
        raise ValueError(
            f"test_l1000.gct: unexpected pert_type values {unknown_types} (or missing)."
        )
    is_vehicle = (meta["pert_type"] == "ctl_vehicle").to_numpy()
    names = meta["pert_iname"].astype(object)
    unusable = names.isna() | (names == CONTROL_VALUE)
    unusable |= names.str.contains(COMBINATION_SEPARATOR, regex=False, na=False)
    bad = names[~is_vehicle & unusable.to_numpy()]
    if len(bad):
        raise ValueError(
            f"test_l1000.gct: unusable pert_iname values {sorted(set(map(str, bad)))}."
        )
    brd_id = meta["pert_id"].astype(str).str.slice(0, 13)
    ids_per_name = pd.Series(brd_id.to_numpy()[~is_vehicle]).groupby(names[~is_vehicle].to_numpy())
    if (ids_per_name.nunique() > 1).any():
        raise ValueError(
            "test_l1000.gct: a pert_iname maps to several BRD ids; cannot join SMILES."
        )

    smiles = brd_id.map(smiles_by_brd).where(~is_vehicle).fillna("").astype(str)
    obs = pd.DataFrame(index=gct.obs_names)
    obs["perturbation"] = np.where(is_vehicle, CONTROL_VALUE, names.astype(str))
    obs["perturbation_type"] = meta["pert_type"].map(_LINCS_TYPES)
    obs["dose"] = _lincs_doses_micromolar(meta, is_vehicle)
    obs["brd_id"] = brd_id
    obs["smiles"] = smiles
    obs["has_smiles"] = (smiles != "").to_numpy()
    if meta["cell_id"].isna().any():
        raise ValueError("test_l1000.gct: some wells have no cell_id.")
    obs["cell_type"] = meta["cell_id"].astype(str)
    for column in _LINCS_RAW_TEXT:
        if column in meta:
            obs[column] = meta[column]
    for column in _LINCS_RAW_NUMBER:
        if column in meta:
            obs[column] = pd.to_numeric(meta[column], errors="coerce")
    text_columns = [c for c in obs if c != "smiles" and obs[c].dtype == object]
    obs[text_columns] = obs[text_columns].astype("category")

    gene_symbols = make_index_unique(pd.Index(gct.var["pr_gene_symbol"].astype(str)))
    var = pd.DataFrame(index=gene_symbols.rename(None))
    var["gene_id"] = gct.var["pr_gene_id"].to_numpy()
    var["probe_id"] = gct.var_names.to_numpy()
    var["gene_title"] = gct.var["pr_gene_title"].to_numpy()
    var["analyte_id"] = gct.var["pr_analyte_id"].to_numpy()
    var["is_landmark"] = (gct.var["pr_is_lmark"] == "1").to_numpy()

    adata = ad.AnnData(X=np.asarray(gct.X, dtype=np.float32), obs=obs, var=var)
    adata.uns["perturbx_dataset"] = _dataset_info(
        "lincs_a375",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["cell_type"],
        likelihood="gaussian",
        source_url=_FILES["test_l1000.gct"].url,
        smiles_source_url=_FILES["lincs_drugs_smiles.csv"].url,
    )
    if drop_missing_smiles:
        adata = adata[is_vehicle | adata.obs["has_smiles"].to_numpy()].copy()
    return adata


def _read_lincs_smiles(path: Path) -> dict[str, str]:
    table = pd.read_csv(
        path, header=None, names=["brd_id", "smiles"], dtype=str, keep_default_na=False
    )
    table = table.apply(lambda column: column.str.strip())
    table = table[(table["brd_id"] != "") & (table["smiles"] != "")]
    return dict(zip(table["brd_id"], table["smiles"], strict=True))


def _lincs_doses_micromolar(meta: pd.DataFrame, is_vehicle: np.ndarray) -> np.ndarray:
    units = meta["pert_dose_unit"].astype(str).str.strip().str.lower()
    values = pd.to_numeric(meta["pert_dose"], errors="coerce")
    factor = units.map(_DOSE_UNIT_TO_MICROMOLAR)
    doses = (values * factor).to_numpy(dtype=np.float64)
    bad = ~is_vehicle & ~(np.isfinite(doses) & (doses > 0))
    if bad.any():
        first = meta.index[bad][0]
        raise ValueError(
            f"test_l1000.gct: {bad.sum()} treated wells lack a positive dose in a known unit "
            f"(first: {first!r}, pert_dose={meta['pert_dose'].iloc[bad.argmax()]!r}, "
            f"pert_dose_unit={meta['pert_dose_unit'].iloc[bad.argmax()]!r})."
        )
    return np.where(is_vehicle, 0.0, doses)
