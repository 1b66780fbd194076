"""Real perturbation data sets, downloaded with pooch and returned as ready-to-use AnnData.

Every loader downloads its files once from a pinned upstream URL, checks the sha256, caches
them, and returns an :class:`~anndata.AnnData` whose ``.obs`` follows the perturbx
conventions (``perturbation`` with the control label ``"control"`` and combinations written
``"A+B"``, ``dose``, ``cell_type``). What :meth:`PerturbX.setup_anndata` needs is recorded in
``adata.uns["perturbx_dataset"]``: ``name``, ``control_value``, ``perturbation_key``,
``dose_key``, ``smiles_key``, ``covariate_keys``, ``likelihood`` and ``source_url``.

The cache folder is, in order of precedence, the ``cache_dir`` argument, the environment
variable ``PERTURBX_DATA_DIR``, or ``pooch.os_cache("perturbx")``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pooch
from anndata.utils import make_index_unique
from scipy import sparse

from perturbx.data._parsing import COMBINATION_SEPARATOR, format_condition, parse_condition_columns

__all__ = [
    "CACHE_ENV_VAR",
    "CONTROL_VALUE",
    "NORMAN2019_URL",
    "SCIPLEX3_URL",
    "DataChecksumError",
    "data_cache_dir",
    "fetch_file",
    "lincs_a375",
    "load_norman2019",
    "load_sciplex3",
    "norman_mcfaline_devel",
    "read_gct",
    "sciplex3_smiles",
    "standardize_obs",
]

CONTROL_VALUE = "control"
CACHE_ENV_VAR = "PERTURBX_DATA_DIR"
# Public scPerturb (Peidli et al. 2024) copies of the full screens. Not reachable from the
# machine this package was written on, so neither the URLs nor the obs layout were verified.
SCIPLEX3_URL = "https://zenodo.org/records/7041849/files/SrivatsanTrapnell2020_sciplex3.h5ad"
NORMAN2019_URL = "https://zenodo.org/records/7041849/files/NormanWeissman2019_filtered.h5ad"


@dataclass(frozen=True)
class _RemoteFile:
    url: str
    sha256: str


_FILES: dict[str, _RemoteFile] = {
    "test_l1000.gct": _RemoteFile(
        "https://raw.githubusercontent.com/cmap/cmapPy/d1652c3223e49e68e3a71634909342b4a6dbf361/"
        "cmapPy/pandasGEXpress/tests/functional_tests/test_l1000.gct",
        "efd7682a473e84f3bd76e79d83f99dcf35744fb0557322564468e80bf8d15a95",
    ),
    "lincs_drugs_smiles.csv": _RemoteFile(
        "https://raw.githubusercontent.com/theislab/chemCPA/43e830eb0958c54e4aa64442c17ec0fed19b3f15/"
        "embeddings/lincs_drugs_smiles.csv",
        "d9e719bc811b8b9ad3882140c3b422b3e65f4fbc16e7302cc96c90a213978cb2",
    ),
    "trapnell_drugs_smiles.csv": _RemoteFile(
        "https://raw.githubusercontent.com/theislab/chemCPA/43e830eb0958c54e4aa64442c17ec0fed19b3f15/"
        "embeddings/trapnell_drugs_smiles.csv",
        "3fe1296157f35d19baf9c3cd80df08a4894a9d3fc6d8695cd0da868d41c26dcc",
    ),
    "perturbench_devel.h5ad": _RemoteFile(
        "https://raw.githubusercontent.com/altoslabs/perturbench/d357dfae3b50968e800e9f5f273ff145080ae67c/"
        "src/perturbench/data/resources/devel.h5ad",
        "220998f5630c813228c8661c86dd52244b9ac87127511289af90e0d900d8429b",
    ),
}

# CMap writes "-666" for "not applicable" in GCT metadata.
_CMAP_MISSING = "-666"


class DataChecksumError(ValueError):
    """A cached or downloaded data file does not have the expected sha256."""


# ----------------------------------------------------------------------------- download / cache


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder where data files are cached: ``cache_dir``, ``$PERTURBX_DATA_DIR`` or
    ``pooch.os_cache("perturbx")``, in that order."""
    if cache_dir is not None:
        return Path(cache_dir)
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env)
    return Path(pooch.os_cache("perturbx"))


def fetch_file(file_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of a registered data file, downloading it if it is not cached.

    Parameters
    ----------
    file_name
        One of ``test_l1000.gct``, ``lincs_drugs_smiles.csv``, ``trapnell_drugs_smiles.csv``,
        ``perturbench_devel.h5ad``.
    cache_dir
        Cache folder; see :func:`data_cache_dir`.

    Raises
    ------
    DataChecksumError
        If the cached or downloaded file does not have the registered sha256.
    """
    if file_name not in _FILES:
        raise KeyError(
            f"Unknown data file {file_name!r}; known files: {', '.join(sorted(_FILES))}."
        )
    remote = _FILES[file_name]
    return _retrieve(file_name, remote.url, remote.sha256, data_cache_dir(cache_dir))


def _retrieve(file_name: str, url: str, sha256: str, folder: Path) -> Path:
    path = folder / file_name
    if path.is_file():
        # pooch would silently re-download a mismatching file; a corrupt cache is worth an error.
        actual = pooch.file_hash(str(path), alg="sha256")
        if actual != sha256:
            raise DataChecksumError(
                f"Checksum mismatch for the cached file {file_name!r} at {path}: expected sha256 "
                f"{sha256}, got {actual}. The file is corrupt, truncated or a different version. "
                f"Delete it ({path}) and call the loader again to download a fresh copy from {url}."
            )
    try:
        local = pooch.retrieve(
            url, known_hash=f"sha256:{sha256}", fname=file_name, path=folder, progressbar=False
        )
    except ValueError as err:  # pooch's hash mismatch; it has already discarded the download
        raise DataChecksumError(
            f"Checksum mismatch for {file_name!r} downloaded from {url}: expected sha256 {sha256}. "
            f"pooch reported: {err} Nothing was cached. Try again; if it persists the upstream "
            f"file has changed, delete any copy of {file_name!r} in {folder} and report it."
        ) from err
    return Path(local)


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


# ----------------------------------------------------------------------------- full public data


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


# ----------------------------------------------------------------------------- helpers


def _dataset_info(
    name: str, *, dose_key, smiles_key, covariate_keys, likelihood, source_url, **extra
) -> dict:
    return {
        "name": name,
        "control_value": CONTROL_VALUE,
        "perturbation_key": "perturbation",
        "dose_key": dose_key,
        "smiles_key": smiles_key,
        "covariate_keys": list(covariate_keys),
        "likelihood": likelihood,
        "source_url": source_url,
        **extra,
    }


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"Missing column(s) {missing} in {where}; available: {list(frame.columns)}.")
