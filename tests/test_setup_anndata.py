"""Registration of perturbations, doses, SMILES and covariates."""

import numpy as np
import pytest

from _toy import TOY_SMILES, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.chem import InvalidSmilesError
from perturbx.conditions import ConditionParseError, split_smiles_combination
from perturbx.data._fields import OBSM_KEY


def _set_first(adata, drug, column, value):
    row = adata.obs_names[adata.obs["drug"].to_numpy() == drug][0]
    adata.obs.loc[row, column] = value


def _registered(adata):
    model_free = adata.obsm[OBSM_KEY]
    width = (model_free.shape[1] - 1) // 2
    return model_free[:, 1 : 1 + width].astype(int), model_free[:, 1 + width :]


def test_vocabulary_indices_and_doses_follow_member_order():
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata)
    vocab = model.perturbations
    assert vocab == sorted(["KLF1", "aspirin", "caffeine"])
    index, dose = _registered(adata)
    combo = np.flatnonzero(adata.obs["drug"].to_numpy() == "aspirin+caffeine")[0]
    # "aspirin+caffeine" with "1.0+10.0": aspirin at 1, caffeine at 10
    assert [vocab[i - 1] for i in index[combo]] == ["aspirin", "caffeine"]
    assert dose[combo].tolist() == [1.0, 10.0]
    control = np.flatnonzero(adata.obs["drug"].to_numpy() == "control")[0]
    assert index[control].tolist() == [0, 0] and dose[control].tolist() == [0.0, 0.0]


def test_smiles_registered_canonically_and_genes_learned():
    adata = toy_screen()
    setup_toy(adata)
    model = PerturbX(adata)
    state = model.perturbation_registry
    smiles = dict(zip(state["vocabulary"], state["smiles"], strict=True))
    assert smiles["KLF1"] is None
    from rdkit import Chem

    expected = Chem.MolToSmiles(Chem.MolFromSmiles(TOY_SMILES["aspirin"]))
    assert smiles["aspirin"] == expected
    assert state["fingerprint"] == {"radius": 2, "n_bits": 2048, "counts": True, "chirality": False}


def test_no_dose_column_means_dose_one():
    adata = toy_screen()
    adata.obs = adata.obs.drop(columns="dose")
    setup_toy(adata, dose_key=None)
    _, dose = _registered(adata)
    treated = adata.obs["drug"].to_numpy() != "control"
    first = dose[treated, 0]
    assert np.all(first == 1.0)


def test_smiles_mapping_instead_of_column():
    adata = toy_screen()
    setup_toy(adata, smiles_key=dict(TOY_SMILES))
    model = PerturbX(adata)
    assert sum(s is not None for s in model.perturbation_registry["smiles"]) == 2


def test_smiles_split_respects_bracket_charges():
    nitro = "C[N+](=O)[O-]"
    assert split_smiles_combination(f"{nitro}+CCO") == [nitro, "CCO"]


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (lambda a: None, {"control_value": "ctrl"}, ValueError, "did you mean 'control'"),
        (lambda a: None, {"perturbation_key": "drugs"}, KeyError, "perturbation_key='drugs'"),
        (lambda a: None, {"dose_key": "dosage"}, KeyError, "dose_key='dosage'"),
        (lambda a: None, {"covariate_keys": ["donor"]}, KeyError, "'donor'"),
        (lambda a: None, {"smiles_key": "structure"}, KeyError, "smiles_key='structure'"),
        (
            lambda a: a.obs.__setitem__("dose", a.obs["dose"].replace("1.0+10.0", "1.0")),
            {},
            ConditionParseError,
            "paired",
        ),
        (
            lambda a: a.obs.__setitem__("dose", a.obs["dose"].replace("3.0", "-3")),
            {},
            ConditionParseError,
            "negative",
        ),
        (
            lambda a: a.obs.__setitem__("dose", a.obs["dose"].replace("3.0", "three")),
            {},
            ConditionParseError,
            "'three'",
        ),
        (
            lambda a: a.obs.__setitem__(
                "smiles", a.obs["smiles"].str.replace(TOY_SMILES["caffeine"], "C1CC(", regex=False)
            ),
            {},
            InvalidSmilesError,
            "caffeine.*C1CC\\(",
        ),
        (
            lambda a: _set_first(a, "caffeine", "smiles", "CCO"),
            {},
            ValueError,
            "two different SMILES",
        ),
        (lambda a: _set_first(a, "caffeine", "cell_type", np.nan), {}, ValueError, "cell_type"),
    ],
)
def test_bad_input_gives_clear_error_and_leaves_adata_unchanged(mutate, kwargs, error, match):
    adata = toy_screen()
    mutate(adata)
    before_obs = adata.obs.copy()
    before_obsm = set(adata.obsm)
    with pytest.raises(error, match=match):
        setup_toy(adata, **kwargs)
    assert adata.obs.equals(before_obs)
    assert set(adata.obsm) == before_obsm


def test_counts_likelihood_rejects_log_normalised_data():
    adata = toy_screen()
    adata.X = adata.X.multiply(0.5).tocsr()
    setup_toy(adata)
    with pytest.raises(ValueError, match="non-integer"):
        PerturbX(adata, likelihood="nb")
    PerturbX(adata, likelihood="gaussian")  # fine for log-normalised data


def test_nan_in_expression_is_rejected():
    adata = toy_screen()
    adata.X = adata.X.toarray()
    adata.X[3, 4] = np.nan
    setup_toy(adata)
    with pytest.raises(ValueError, match="NaN"):
        PerturbX(adata, likelihood="gaussian")
