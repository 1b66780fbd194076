"""Tests of perturbx.chem: canonical SMILES, Morgan fingerprints, caching, Tanimoto."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from perturbx import chem
from perturbx.chem import (
    InvalidSmilesError,
    MorganFeaturizer,
    canonical_smiles,
    canonical_smiles_array,
    nearest_reference,
    tanimoto_similarity,
)

ASPIRIN_SPELLINGS = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "OC(=O)c1ccccc1OC(C)=O",
    "CC(=O)OC1=CC=CC=C1C(=O)O",  # Kekulé
    " O=C(O)c1ccccc1OC(=O)C ",  # surrounding whitespace
]


@pytest.mark.parametrize(
    "spellings",
    [
        ["CCO", "OCC", "C(O)C", "[CH3][CH2][OH]", "[H]OCC"],
        ["c1ccccc1", "C1=CC=CC=C1", "C1C=CC=CC=1"],
        ASPIRIN_SPELLINGS,
    ],
)
def test_canonical_smiles_equal_for_all_spellings(spellings):
    canonical = {canonical_smiles(s) for s in spellings}
    assert len(canonical) == 1
    (value,) = canonical
    # The canonical string is itself a fixed point.
    assert canonical_smiles(value) == value


def test_canonical_smiles_distinguishes_molecules():
    assert canonical_smiles("CCO") != canonical_smiles("CCCO")
    assert canonical_smiles("c1ccccc1O") != canonical_smiles("c1ccccc1")


@pytest.mark.parametrize("bad", ["C1CC", "c1cccc1", "xyz", "CC(C", "C%"])
def test_invalid_smiles_error_names_drug_and_string(bad, capfd):
    with pytest.raises(InvalidSmilesError) as info:
        canonical_smiles(bad, name="Drug X")
    message = str(info.value)
    assert "Drug X" in message and repr(bad) in message
    assert isinstance(info.value, ValueError)
    # RDKit's own parse error must not reach the user's terminal.
    assert "SMILES Parse Error" not in capfd.readouterr().err


@pytest.mark.parametrize("missing", ["", "   ", None, float("nan")])
def test_missing_or_empty_smiles_raise(missing):
    with pytest.raises(InvalidSmilesError, match="Drug Y"):
        canonical_smiles(missing, name="Drug Y")


def test_canonical_smiles_array_maps_and_validates():
    out = canonical_smiles_array(["OCC", "CCO", "C1=CC=CC=C1"])
    assert out.tolist() == ["CCO", "CCO", "c1ccccc1"]
    with pytest.raises(InvalidSmilesError) as info:
        canonical_smiles_array(["CCO", "C1CC", "CCO", "Q"], names=["ok", "bad1", "ok", "bad2"])
    message = str(info.value)
    assert "bad1" in message and "'C1CC'" in message
    assert "bad2" in message and "'Q'" in message
    assert "'ok'" not in message


def test_bits_are_binary_and_counts_dominate_bits():
    smiles = ["CCCCCCCC", "c1ccccc1CC(=O)O", *ASPIRIN_SPELLINGS[:1]]
    bits = MorganFeaturizer(counts=False)(smiles)
    counts = MorganFeaturizer(counts=True)(smiles)
    assert bits.dtype == np.float32 and counts.dtype == np.float32
    assert set(np.unique(bits)) <= {0.0, 1.0}
    assert np.all(counts >= bits)
    np.testing.assert_array_equal(counts > 0, bits > 0)
    assert counts.max() > 1  # octane repeats its CH2 environments


def test_hand_counted_fingerprints():
    # Butane at radius 0 has two atom environments (CH3 twice, CH2 twice).
    counts = MorganFeaturizer(radius=0, counts=True)(["CCCC"])[0]
    assert sorted(counts[counts > 0].tolist()) == [2.0, 2.0]
    # Ethanol at radius 1: 3 atom types + 3 one-bond environments, each once.
    bits = MorganFeaturizer(radius=1)(["CCO"])[0]
    assert bits.sum() == 6


def test_matches_rdkit_generator():
    smiles = ASPIRIN_SPELLINGS[0]
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=3, fpSize=512)
    expected = generator.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(smiles))
    got = MorganFeaturizer(radius=3, n_bits=512, counts=True)([smiles])[0]
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_radius_and_n_bits_change_the_output():
    smiles = ["CC(=O)Nc1ccc(O)cc1", "CN1CCC[C@H]1c1cccnc1"]
    assert MorganFeaturizer(n_bits=256)(smiles).shape == (2, 256)
    assert MorganFeaturizer(n_bits=1024)(smiles).shape == (2, 1024)
    on_bits = [MorganFeaturizer(radius=r)(smiles).sum(1) for r in (0, 1, 2)]
    assert np.all(on_bits[0] < on_bits[1]) and np.all(on_bits[1] < on_bits[2])


def test_spellings_give_identical_rows_and_repeats_broadcast():
    featurize = MorganFeaturizer()
    x = featurize(["CCO", "OCC", "c1ccccc1", "CCO"])
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[0], x[3])
    assert not np.array_equal(x[0], x[2])
    distinct, codes = featurize.featurize_unique(["CCO", "OCC", "c1ccccc1", "CCO"])
    assert distinct.shape == (3, 2048) and codes.tolist() == [0, 1, 2, 0]
    np.testing.assert_array_equal(distinct[codes], x)


def test_each_distinct_string_is_parsed_once(monkeypatch):
    calls: list[str] = []
    real = chem.Chem.MolFromSmiles

    def counting(smiles, *args, **kwargs):
        calls.append(smiles)
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(chem.Chem, "MolFromSmiles", counting)
    featurize = MorganFeaturizer(radius=1, n_bits=128)
    smiles = ["CCO"] * 1000 + ["c1ccccc1"] * 500 + ["CC(=O)O"] * 10
    x = featurize(smiles)
    assert x.shape == (1510, 128)
    assert sorted(calls) == sorted(["CCO", "c1ccccc1", "CC(=O)O"])
    featurize(smiles[::-1])  # a second call reuses the cache
    assert len(calls) == 3
    featurize(["OCC"])  # a new spelling is parsed, but the molecule is not new
    assert len(calls) == 4 and featurize.n_cached == 3


def test_invalid_anywhere_raises_with_all_offenders():
    featurize = MorganFeaturizer()
    with pytest.raises(InvalidSmilesError) as info:
        featurize(["CCO"] * 5 + ["C1CC", "c1ccccc1", None], names=[*"abcde", "ring", "ok", "gone"])
    message = str(info.value)
    assert "'ring'" in message and "'C1CC'" in message and "'gone'" in message
    with pytest.raises(ValueError, match="names has 1 entries"):
        featurize(["CCO", "CC"], names=["one"])
    with pytest.raises(ValueError, match="not a single string"):
        featurize("CCO")


def test_empty_input_gives_empty_matrix():
    assert MorganFeaturizer(n_bits=64)([]).shape == (0, 64)


def test_settings_round_trip_through_dict_json_and_pickle():
    featurize = MorganFeaturizer(radius=3, n_bits=1024, counts=True)
    settings = json.loads(json.dumps(featurize.to_dict()))
    assert settings == {"radius": 3, "n_bits": 1024, "counts": True, "chirality": False}
    rebuilt = MorganFeaturizer.from_dict(settings)
    assert rebuilt == featurize and rebuilt != MorganFeaturizer()
    np.testing.assert_array_equal(rebuilt(["CCO"]), featurize(["CCO"]))
    unpickled = pickle.loads(pickle.dumps(featurize))
    np.testing.assert_array_equal(unpickled(["c1ccccc1"]), featurize(["c1ccccc1"]))
    with pytest.raises(ValueError, match="Unknown MorganFeaturizer setting"):
        MorganFeaturizer.from_dict({"radius": 2, "nbits": 10})


@pytest.mark.parametrize(
    "kwargs", [{"radius": -1}, {"radius": 1.5}, {"n_bits": 0}, {"counts": "yes"}]
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        MorganFeaturizer(**kwargs)


def test_tanimoto_hand_computed_and_matches_rdkit():
    # Radius 1: ethanol has 6 environments, propanol 7; 5 are shared -> 5 / (6 + 7 - 5).
    value = tanimoto_similarity(["CCO"], ["CCCO"], radius=1)
    assert value.shape == (1, 1) and math.isclose(value[0, 0], 5 / 8)

    query = ["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "CCO"]
    reference = ["OC(=O)c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "c1ccncc1", "CCCO"]
    similarity = tanimoto_similarity(query, reference, radius=2, n_bits=2048)
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = {s: generator.GetFingerprint(Chem.MolFromSmiles(s)) for s in query + reference}
    for i, q in enumerate(query):
        for j, r in enumerate(reference):
            expected = DataStructs.TanimotoSimilarity(fps[q], fps[r])
            assert math.isclose(similarity[i, j], expected, rel_tol=1e-12)


def test_tanimoto_self_similarity_is_one():
    smiles = ["CCO", "c1ccccc1", ASPIRIN_SPELLINGS[0], ASPIRIN_SPELLINGS[2]]
    similarity = tanimoto_similarity(smiles, smiles)
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    assert similarity[2, 3] == 1.0  # two spellings of aspirin
    assert np.all((similarity >= 0) & (similarity <= 1))


def test_nearest_reference_reports_most_similar_training_drug():
    reference = ["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "CCCCCCCC"]
    names = ["aspirin", "nicotine", "octane"]
    query = ["OC(=O)c1ccccc1OC(C)=O", "CCCCCCCCO", "CN1CCCC1c1cccnc1"]
    table = nearest_reference(query, reference, names, query_names=["q_asp", "q_non", "q_nic"])
    assert isinstance(table, pd.DataFrame)
    assert table.index.tolist() == ["q_asp", "q_non", "q_nic"]
    assert table["nearest_reference"].tolist() == ["aspirin", "octane", "nicotine"]
    assert table.loc["q_asp", "max_similarity"] == 1.0
    assert 0 < table.loc["q_non", "max_similarity"] < 1
    similarity = tanimoto_similarity(query, reference)
    np.testing.assert_allclose(table["max_similarity"], similarity.max(1))
    assert table.loc["q_nic", "nearest_reference_smiles"] == reference[1]
    with pytest.raises(ValueError, match="reference is empty"):
        nearest_reference(query, [])
    with pytest.raises(InvalidSmilesError, match="weird"):
        nearest_reference(query, ["C1CC"], ["weird"])
