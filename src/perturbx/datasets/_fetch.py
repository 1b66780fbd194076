"""Download and cache of the registered data files: cache folder, pooch, sha256 checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pooch

CACHE_ENV_VAR = "PERTURBX_DATA_DIR"


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
    "glioblastoma_example_data.rda": _RemoteFile(
        "https://raw.githubusercontent.com/const-ae/lemur/0e62bc1287b17deec678f7db435ec09098a475f2/"
        "data/glioblastoma_example_data.rda",
        "4e56d9cff16fb6750dd0054a0f7f05a7429c612906dc610c8dd44cb3e60de37e",
    ),
}


class DataChecksumError(ValueError):
    """A cached or downloaded data file does not have the expected sha256."""


def data_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder where data files are cached: ``cache_dir``, ``$PERTURBX_DATA_DIR`` or
    ``pooch.os_cache("perturbx")``, in that order.
    """
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
        ``perturbench_devel.h5ad``, ``glioblastoma_example_data.rda``.
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
