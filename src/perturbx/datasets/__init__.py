"""Public perturbation data sets, downloaded with pooch and returned as ready-to-use AnnData.

(To split, simulate or register data, see :mod:`perturbx.data`.)

Every loader downloads its files once from a pinned upstream URL, checks the sha256, caches
them, and returns an :class:`~anndata.AnnData` whose ``.obs`` follows the perturbx
conventions (``perturbation`` with the control label ``"control"`` and combinations written
``"A+B"``, ``dose``, ``cell_type``). What :meth:`PerturbX.setup_anndata` needs is recorded in
``adata.uns["perturbx_dataset"]``: ``name``, ``control_value``, ``perturbation_key``,
``dose_key``, ``smiles_key``, ``covariate_keys``, ``likelihood`` and ``source_url``.

The cache folder is, in order of precedence, the ``cache_dir`` argument, the environment
variable ``PERTURBX_DATA_DIR``, or ``pooch.os_cache("perturbx")``.
"""

from perturbx.datasets._common import CONTROL_VALUE
from perturbx.datasets._devel import norman_mcfaline_devel, sciplex3_smiles
from perturbx.datasets._fetch import (
    CACHE_ENV_VAR,
    DataChecksumError,
    data_cache_dir,
    fetch_file,
)
from perturbx.datasets._glioblastoma import zhao2021_glioblastoma
from perturbx.datasets._lincs import lincs_a375, read_gct
from perturbx.datasets._standardize import (
    NORMAN2019_URL,
    SCIPLEX3_URL,
    load_norman2019,
    load_sciplex3,
    standardize_obs,
)

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
    "zhao2021_glioblastoma",
    "standardize_obs",
]
