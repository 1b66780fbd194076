"""Zhao et al. 2021: glioblastoma tumour tissue of 5 patients, panobinostat or vehicle ex vivo."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from perturbx.datasets._common import CONTROL_VALUE, _dataset_info, _require_columns
from perturbx.datasets._devel import sciplex3_smiles
from perturbx.datasets._fetch import _FILES, fetch_file

GLIOBLASTOMA_FILE = "glioblastoma_example_data.rda"
#: Panobinostat dose of the treated samples (µM).
PANOBINOSTAT_DOSE_UM = 0.2
_COLUMNS = ["patient_id", "treatment_id", "condition", "id"]


def zhao2021_glioblastoma(cache_dir: str | os.PathLike | None = None) -> ad.AnnData:
    """Single-cell response of 5 glioblastoma patients' tumour tissue to panobinostat.

    Zhao et al. 2021 (Genome Medicine 13:82, GEO GSE148842), as shipped with the lemur R
    package (MIT): tissue of each patient treated ex vivo with 0.2 µM panobinostat (an HDAC
    inhibitor) or vehicle (DMSO); 500 cells per patient and condition, 300 genes, raw UMI
    counts. A real single-cell drug response with one drug, one dose and several patients:
    the test bed for predicting a held-out patient's response (covariate transfer). Read with
    the ``rdata`` package (no R needed).

    Parameters
    ----------
    cache_dir
        Cache folder of the download (see :func:`perturbx.datasets.data_cache_dir`).

    Returns
    -------
    AnnData
        ``X``: sparse CSR ``(5000, 300)`` float32 raw counts (for ``nb`` / ``zinb``);
        ``var_names``: gene symbols, with ``var["gene_id"]`` (Ensembl), ``chromosome``,
        ``gene_length``. ``.obs`` (index: cell barcodes): ``perturbation`` (``"control"`` /
        ``"Panobinostat"``), ``dose`` (µM: 0 or 0.2), ``smiles`` (panobinostat's, from the
        sci-Plex 3 table; ``""`` for controls), ``patient`` (5 patients) and the original
        column data (``treatment_id``, ``age``, ``gender``, ``location``, ``diagnosis``,
        ``treatment``, ``condition``, ``sample_id``). ``uns["perturbx_dataset"]`` says how to
        set it up (covariate ``patient``, likelihood ``nb``).
    """
    try:
        import rdata
    except ImportError as error:  # a declared dependency; say so if it is missing anyway
        raise ImportError("zhao2021_glioblastoma needs the 'rdata' package.") from error
    path = fetch_file(GLIOBLASTOMA_FILE, cache_dir)
    with warnings.catch_warnings():  # rdata returns S4 classes it does not know as plain data
        warnings.simplefilter("ignore", UserWarning)
        experiment = rdata.read_rda(str(path))["glioblastoma_example_data"]
    counts = experiment.assays.data.listData["counts"]  # a dgCMatrix: genes x cells, CSC
    n_genes, n_cells = (int(v) for v in counts.Dim)
    matrix = sparse.csc_matrix(
        (np.asarray(counts.x, dtype=np.float32), np.asarray(counts.i), np.asarray(counts.p)),
        shape=(n_genes, n_cells),
    ).T.tocsr()
    columns = {str(k): np.asarray(v) for k, v in experiment.colData.listData.items()}
    obs = pd.DataFrame(columns)
    _require_columns(obs, _COLUMNS, f"the column data of {path.name}")
    conditions = set(obs["condition"].astype(str))
    if conditions != {"ctrl", "panobinostat"}:
        raise ValueError(f"{path.name}: unexpected conditions {sorted(conditions)}.")
    treated = (obs["condition"].astype(str) == "panobinostat").to_numpy()
    smiles = sciplex3_smiles(cache_dir).set_index("name")["smiles"]
    obs.insert(0, "perturbation", np.where(treated, "Panobinostat", CONTROL_VALUE))
    obs.insert(1, "dose", np.where(treated, PANOBINOSTAT_DOSE_UM, 0.0))
    obs.insert(2, "smiles", np.where(treated, smiles["Panobinostat"], ""))
    obs.insert(3, "patient", obs.pop("patient_id").astype(str))
    obs.index = pd.Index(obs.pop("id").astype(str).to_numpy())
    for key in (
        "perturbation",
        "patient",
        "gender",
        "location",
        "diagnosis",
        "treatment",
        "condition",
        "sample_id",
        "treatment_id",
    ):
        if key in obs.columns:
            obs[key] = pd.Categorical(obs[key].astype(str))
    genes = {
        str(k): np.asarray(v) for k, v in experiment.rowRanges.elementMetadata.listData.items()
    }
    var = pd.DataFrame(
        {
            "gene_id": genes["gene_id"].astype(str),
            "chromosome": genes["chromosome"].astype(str),
            "gene_length": genes["gene_length"].astype(np.int64),
        },
        index=pd.Index(genes["symbol"].astype(str)),
    )
    adata = ad.AnnData(matrix, obs=obs, var=var)
    adata.var_names_make_unique()
    if not np.array_equal(matrix.data, np.round(matrix.data)) or (matrix.data < 0).any():
        raise ValueError(f"{path.name}: the counts assay holds non-integer or negative values.")
    adata.uns["perturbx_dataset"] = _dataset_info(
        "zhao2021_glioblastoma",
        dose_key="dose",
        smiles_key="smiles",
        covariate_keys=["patient"],
        likelihood="nb",
        source_url=_FILES[GLIOBLASTOMA_FILE].url,
    )
    return adata
