"""Tests of the real-data loaders on the seeded cache, of the checksum errors and the net guard."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import shutil
import socket
import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from perturbx import datasets
from perturbx.conditions import parse_condition_columns
from perturbx.datasets import _fetch

LINCS_DOSES_UM = [0.04, 0.12, 0.37, 1.11, 3.33, 10.0]
UNS_KEYS = {
    "name",
    "control_value",
    "perturbation_key",
    "dose_key",
    "smiles_key",
    "covariate_keys",
    "likelihood",
    "source_url",
}


@pytest.fixture(scope="module")
def lincs(data_cache):
    return datasets.lincs_a375(data_cache)


@pytest.fixture(scope="module")
def devel(data_cache):
    return datasets.norman_mcfaline_devel(data_cache)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- LINCS A375


def test_lincs_shape_and_expression(lincs, shared_data_dir):
    assert lincs.shape == (377, 978)
    assert isinstance(lincs.X, np.ndarray) and lincs.X.dtype == np.float32
    # First data line of the file: probe 200814_at (PSME1, Entrez 5720) = 11.3819 in well A03.
    assert lincs.var_names[0] == "PSME1"
    assert lincs.var.loc["PSME1", "gene_id"] == "5720"
    assert lincs.var.loc["PSME1", "probe_id"] == "200814_at"
    assert lincs.obs_names[0] == "LJP005_A375_24H_X1_B19:A03"
    assert lincs.X[0, 0] == pytest.approx(11.3819, abs=1e-4)
    assert lincs.var_names.is_unique and lincs.var["is_landmark"].all()
    assert 0 < lincs.X.min() and lincs.X.max() < 20  # log2 scale, not raw intensities


def test_lincs_perturbations_doses_and_controls(lincs):
    obs = lincs.obs
    counts = obs["perturbation_type"].value_counts()
    assert counts.to_dict() == {"drug": 328, "vehicle": 26, "positive_control": 23}
    is_control = (obs["perturbation"] == "control").to_numpy()
    assert is_control.sum() == 26
    assert (obs.loc[is_control, "perturbation_type"] == "vehicle").all()
    assert (obs.loc[is_control, "dose"] == 0.0).all()
    assert obs.loc[obs["perturbation_type"] == "drug", "perturbation"].nunique() == 55
    assert set(obs.loc[obs["perturbation_type"] == "positive_control", "perturbation"]) == {
        "geldanamycin",
        "mitoxantrone",
        "radicicol",
        "withaferin-a",
    }
    treated = obs.loc[~is_control, "dose"].to_numpy()
    nearest = np.abs(treated[:, None] - np.array(LINCS_DOSES_UM)[None, :]).min(axis=1)
    assert (nearest < 0.01).all() and (treated > 0).all()
    assert (obs.loc[~is_control, "brd_id"].str.len() == 13).all()
    assert (obs.loc[~is_control, "brd_id"].str.startswith("BRD-")).all()
    assert (obs["cell_type"] == "A375").all()
    assert {"det_plate", "det_well", "pert_id", "pert_iname"} <= set(obs.columns)
    # The perturbx parser accepts these columns as they are.
    conditions, _ = parse_condition_columns(obs, "perturbation", "dose", "control")
    assert len(conditions) == 1 + 328 + 23  # one well per drug and dose


def test_lincs_smiles_join(lincs, shared_data_dir):
    with open(shared_data_dir / "lincs_drugs_smiles.csv", newline="") as handle:
        table = {row[0].strip(): row[1].strip() for row in csv.reader(handle)}
    obs = lincs.obs
    per_drug = obs[obs["perturbation"] != "control"].drop_duplicates("perturbation")
    drugs = per_drug[per_drug["perturbation_type"] == "drug"]
    controls = per_drug[per_drug["perturbation_type"] == "positive_control"]
    assert drugs["has_smiles"].sum() == 47 and len(drugs) == 55
    assert controls["has_smiles"].all() and len(controls) == 4
    for _, row in per_drug.iterrows():
        assert row["smiles"] == table.get(row["brd_id"], "")
    assert ((obs["smiles"] != "") == obs["has_smiles"]).all()
    assert not obs.loc[obs["perturbation"] == "control", "has_smiles"].any()


def test_lincs_smiles_are_valid_molecules(lincs):
    from rdkit import Chem

    smiles = lincs.obs.loc[lincs.obs["has_smiles"], "smiles"].unique()
    assert all(Chem.MolFromSmiles(s) is not None for s in smiles)


def test_lincs_drop_missing_smiles(data_cache, lincs):
    kept = datasets.lincs_a375(data_cache, drop_missing_smiles=True)
    assert kept.n_obs == 377 - 8 * 6  # the 8 drugs without SMILES have 6 doses each
    treated = kept.obs["perturbation"] != "control"
    assert kept.obs.loc[treated, "has_smiles"].all()
    assert (kept.obs["perturbation"] == "control").sum() == 26
    np.testing.assert_array_equal(kept.X, lincs[kept.obs_names].X)


def test_lincs_uns_describes_setup(lincs):
    info = lincs.uns["perturbx_dataset"]
    assert UNS_KEYS <= set(info)
    assert info["control_value"] == "control" and info["likelihood"] == "gaussian"
    columns = [info["perturbation_key"], info["dose_key"], info["smiles_key"]]
    assert set(columns + list(info["covariate_keys"])) <= set(lincs.obs.columns)
    assert info["source_url"].startswith("https://") and "test_l1000.gct" in info["source_url"]


def test_lincs_roundtrips_through_h5ad(lincs, tmp_path):
    lincs.write_h5ad(tmp_path / "lincs.h5ad")
    back = ad.read_h5ad(tmp_path / "lincs.h5ad")
    assert back.uns["perturbx_dataset"]["name"] == "lincs_a375"
    pd.testing.assert_series_equal(back.obs["dose"], lincs.obs["dose"])


# ----------------------------------------------------------------------------- PerturBench devel


def test_devel_loader(devel):
    assert devel.shape == (5961, 500)
    assert sparse.issparse(devel.X)
    obs = devel.obs
    assert (obs["perturbation"] == "control").sum() == 400
    is_combo = obs["perturbation"].astype(str).str.contains("+", regex=False)
    assert set(obs.loc[is_combo, "dose"]) == {"1+1"}
    assert set(obs.loc[~is_combo, "dose"]) == {"1"}
    assert set(obs["cell_type"]) == {"k562", "A172", "T98G", "U87MG"}
    assert set(obs["dataset"]) == {"norman19", "mcfaline23"}
    assert set(obs.loc[obs["dataset"] == "norman19", "perturbation_type"]) == {"CRISPRa"}
    info = devel.uns["perturbx_dataset"]
    assert UNS_KEYS <= set(info) and info["smiles_key"] is None
    assert info["likelihood"] == "gaussian"


def test_sciplex3_smiles(data_cache):
    table = datasets.sciplex3_smiles(data_cache)
    assert list(table.columns) == ["name", "smiles", "pathway"]
    assert len(table) == 188 and table["name"].is_unique
    assert (table["smiles"] != "").all()
    control = table[table["name"] == "control"].iloc[0]
    assert control["smiles"] == "CS(C)=O" and control["pathway"] == "Vehicle"
    assert table.loc[table["name"] == "ABT-737", "pathway"].item() == "Apoptosis"


# ----------------------------------------------------------------------------- glioblastoma


@pytest.fixture(scope="module")
def glioblastoma(data_cache):
    return datasets.zhao2021_glioblastoma(data_cache)


def test_glioblastoma_counts_cells_and_genes(glioblastoma):
    adata = glioblastoma
    assert adata.shape == (5000, 300) and sparse.isspmatrix_csr(adata.X)
    values = adata.X.data
    assert (values >= 0).all() and np.array_equal(values, np.round(values))
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.var["gene_id"].str.startswith("ENSG").all()
    assert "SPP1" in adata.var_names  # symbols, not Ensembl ids


def test_glioblastoma_conditions_patients_and_smiles(glioblastoma):
    from perturbx.chem import canonical_smiles

    obs = glioblastoma.obs
    per_group = obs.groupby(["patient", "perturbation"], observed=True).size()
    assert len(per_group) == 10 and (per_group == 500).all()
    assert set(obs["perturbation"]) == {"control", "Panobinostat"}
    treated = obs["perturbation"] == "Panobinostat"
    assert set(obs.loc[treated, "dose"]) == {0.2} and set(obs.loc[~treated, "dose"]) == {0.0}
    assert set(obs.loc[~treated, "smiles"]) == {""}
    (smiles,) = set(obs.loc[treated, "smiles"])
    assert canonical_smiles(smiles)  # a valid molecule: panobinostat's
    assert {"treatment_id", "age", "gender", "location", "condition"} <= set(obs.columns)
    info = glioblastoma.uns["perturbx_dataset"]
    assert set(info) >= UNS_KEYS and info["covariate_keys"] == ["patient"]
    assert info["likelihood"] == "nb"


def test_glioblastoma_checksum_mismatch_is_an_error(tmp_path, shared_data_dir):
    good = (shared_data_dir / "glioblastoma_example_data.rda").read_bytes()
    (tmp_path / "glioblastoma_example_data.rda").write_bytes(good[:-10])
    with pytest.raises(datasets.DataChecksumError, match="glioblastoma_example_data.rda"):
        datasets.zhao2021_glioblastoma(tmp_path)


# ----------------------------------------------------------------------------- cache, checksums


def test_cached_file_with_wrong_checksum_raises(tmp_path, shared_data_dir):
    good = (shared_data_dir / "trapnell_drugs_smiles.csv").read_bytes()
    corrupt = tmp_path / "trapnell_drugs_smiles.csv"
    corrupt.write_bytes(good[:-100])  # a truncated download
    with pytest.raises(datasets.DataChecksumError) as info:
        datasets.sciplex3_smiles(tmp_path)
    message = str(info.value)
    assert "trapnell_drugs_smiles.csv" in message
    assert "3fe1296157f35d19baf9c3cd80df08a4894a9d3fc6d8695cd0da868d41c26dcc" in message
    assert _sha256(corrupt) in message
    assert "Delete it" in message and corrupt.exists()


def test_env_var_points_the_cache(monkeypatch, data_cache, tmp_path):
    monkeypatch.setenv(datasets.CACHE_ENV_VAR, str(data_cache))
    assert datasets.data_cache_dir() == data_cache
    assert datasets.data_cache_dir(tmp_path) == tmp_path  # the argument wins
    assert len(datasets.sciplex3_smiles()) == 188  # found in the cache: no download attempted


def test_unknown_file_name():
    with pytest.raises(KeyError, match="known files"):
        datasets.fetch_file("nope.csv")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "served"``."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_with_pooch_from_local_server(local_server, tmp_path, shared_data_dir):
    served, base_url = local_server
    shutil.copyfile(shared_data_dir / "trapnell_drugs_smiles.csv", served / "drugs.csv")
    expected = _sha256(served / "drugs.csv")
    cache = tmp_path / "cache"
    path = _fetch._retrieve("drugs.csv", f"{base_url}/drugs.csv", expected, cache)
    assert path == cache / "drugs.csv" and _sha256(path) == expected


def test_download_with_wrong_checksum_raises(local_server, tmp_path):
    served, base_url = local_server
    (served / "drugs.csv").write_text("a,b\n")
    cache = tmp_path / "cache"
    with pytest.raises(datasets.DataChecksumError) as info:
        _fetch._retrieve("drugs.csv", f"{base_url}/drugs.csv", "0" * 64, cache)
    message = str(info.value)
    assert "drugs.csv" in message and "0" * 64 in message
    assert _sha256(served / "drugs.csv") in message  # pooch's report of the actual hash
    assert not (cache / "drugs.csv").exists()


# ----------------------------------------------------------------------------- GCT reader

_SMALL_GCT = (
    "#1.3\n"
    "2\t3\t1\t2\n"
    "id\tgene\ts1\ts2\ts3\n"
    "pert\tna\tdrugA\tDMSO\tdrugB\n"
    "dose\tna\t1\t-666\t10\n"
    "p1\tTP53\t1.5\t2.5\t3.5\n"
    "p2\tMYC\t-1\t0\t7.25\n"
)


def test_read_gct_small_file(tmp_path):
    path = tmp_path / "small.gct"
    path.write_text(_SMALL_GCT)
    adata = datasets.read_gct(path)
    assert list(adata.obs_names) == ["s1", "s2", "s3"]
    assert list(adata.var_names) == ["p1", "p2"]
    np.testing.assert_array_equal(adata.X, np.array([[1.5, -1], [2.5, 0], [3.5, 7.25]]))
    assert list(adata.obs["pert"]) == ["drugA", "DMSO", "drugB"]
    assert pd.isna(adata.obs.loc["s2", "dose"]) and adata.obs.loc["s3", "dose"] == "10"
    assert list(adata.var["gene"]) == ["TP53", "MYC"]


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        (_SMALL_GCT.replace("#1.3", "#2.0"), "not a GCT"),
        (_SMALL_GCT.replace("2\t3\t1\t2", "3\t3\t1\t2"), "expected 2 column-metadata \\+ 3 data"),
        (_SMALL_GCT.replace("7.25", "oops"), "non-numeric"),
        (_SMALL_GCT.replace("\ts3\n", "\ts1\n"), "not unique"),
    ],
)
def test_read_gct_rejects_malformed_files(tmp_path, broken, match):
    path = tmp_path / "broken.gct"
    path.write_text(broken)
    with pytest.raises(ValueError, match=match):
        datasets.read_gct(path)


# ----------------------------------------------------------------------------- full public data


def _scperturb_like(perturbations, doses=None, cell_lines=None) -> ad.AnnData:
    index = [f"c{i}" for i in range(len(perturbations))]
    obs = pd.DataFrame({"perturbation": perturbations}, index=index)
    if doses is not None:
        obs["dose_value"] = doses
    if cell_lines is not None:
        obs["cell_line"] = cell_lines
    counts = np.arange(len(obs) * 2, dtype=np.float32).reshape(len(obs), 2)
    return ad.AnnData(X=counts, obs=obs)


def test_standardize_obs_combinations_and_controls():
    adata = _scperturb_like(["control", "KLF1_MAP2K6", "KLF1", "ctrl_SET", "ctrl"])
    before = adata.obs.copy()
    result = datasets.standardize_obs(
        adata,
        perturbation_key="perturbation",
        control_values=("control", "ctrl"),
        combination_separator="_",
        cell_type="K562",
        perturbation_type="CRISPRa",
    )
    assert list(result.obs["perturbation"]) == ["control", "KLF1+MAP2K6", "KLF1", "SET", "control"]
    assert list(result.obs["dose"]) == ["0", "1.0+1.0", "1.0", "1.0", "0"]
    assert list(result.obs["perturbation_original"]) == list(before["perturbation"])
    assert set(result.obs["cell_type"]) == {"K562"}
    pd.testing.assert_frame_equal(adata.obs, before)  # the input is untouched


def test_standardize_obs_scales_numeric_doses():
    adata = _scperturb_like(
        ["control", "drugA", "drugA"],
        doses=[0.0, 10.0, 10000.0],
        cell_lines=["A549", "K562", "MCF7"],
    )
    result = datasets.standardize_obs(
        adata,
        perturbation_key="perturbation",
        dose_key="dose_value",
        dose_scale=1e-3,
        cell_type_key="cell_line",
    )
    np.testing.assert_allclose(result.obs["dose"], [0.0, 0.01, 10.0])
    assert list(result.obs["cell_type"]) == ["A549", "K562", "MCF7"]


def test_standardize_obs_errors():
    adata = _scperturb_like(["A_B"], doses=["1"])
    with pytest.raises(ValueError, match="2 members but dose '1' has 1"):
        datasets.standardize_obs(
            adata,
            perturbation_key="perturbation",
            dose_key="dose_value",
            combination_separator="_",
            cell_type="K562",
        )
    with pytest.raises(KeyError, match="'drug'"):
        datasets.standardize_obs(adata, perturbation_key="drug", cell_type="K562")
    with pytest.raises(ValueError, match="exactly one of cell_type_key"):
        datasets.standardize_obs(adata, perturbation_key="perturbation")


def test_load_full_files_from_local_copies(tmp_path, data_cache):
    sciplex_path = tmp_path / "sciplex.h5ad"
    _scperturb_like(
        ["control", "ABT-737", "not-in-table"],
        doses=[0.0, 100.0, 1000.0],
        cell_lines=["A549", "A549", "MCF7"],
    ).write_h5ad(sciplex_path)
    sciplex = datasets.load_sciplex3(sciplex_path, data_cache)
    assert list(sciplex.obs["has_smiles"]) == [False, True, False]
    np.testing.assert_allclose(sciplex.obs["dose"], [0.0, 0.1, 1.0])
    assert sciplex.uns["perturbx_dataset"]["likelihood"] == "nb"  # integer counts

    norman_path = tmp_path / "norman.h5ad"
    _scperturb_like(["control", "CEBPE_KLF1", "KLF1"]).write_h5ad(norman_path)
    norman = datasets.load_norman2019(norman_path)
    assert list(norman.obs["perturbation"]) == ["control", "CEBPE+KLF1", "KLF1"]
    assert norman.uns["perturbx_dataset"]["dose_key"] == "dose"
    with pytest.raises(FileNotFoundError):
        datasets.load_norman2019(tmp_path / "missing.h5ad")


# ----------------------------------------------------------------------------- network guard


def test_network_guard_blocks_remote_connections():
    with pytest.raises(RuntimeError, match="must not use the network"):
        socket.create_connection(("example.com", 80), timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(RuntimeError, match="must not use the network"):
            sock.connect(("192.0.2.1", 80))  # TEST-NET-1, never routed
        with pytest.raises(RuntimeError, match="must not use the network"):
            sock.connect_ex(("192.0.2.1", 80))


def test_network_guard_allows_loopback_and_unix(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            pass
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
