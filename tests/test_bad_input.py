"""The bad-input matrix: every bad input gets a clear error and leaves the AnnData unchanged.

Each case makes a fresh toy screen bad (``mutate``), optionally registers it (``prepare``),
snapshots it, runs the call that must fail (``action``) and checks the error type, that the
message names the culprit, and that ``obs``, ``obsm``, ``uns`` and ``X`` are unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

from _toy import SMALL_ARCH, TOY_SMILES, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.chem import InvalidSmilesError
from perturbx.conditions import MAX_DOSE, ConditionParseError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained model, its AnnData and its save folder."""
    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, seed=0, enable_progress_bar=False)
    path = tmp_path_factory.mktemp("model") / "m"
    model.save(path)
    return model, adata, path


@dataclass(frozen=True)
class BadInput:
    mutate: Callable[[AnnData], object]
    action: Callable[[AnnData, tuple], object]
    error: type[Exception]
    match: str
    prepare: Callable[[AnnData], object] = lambda adata: None


def _setup(**kwargs):
    return lambda adata, trained: setup_toy(adata, **kwargs)


def _init(**kwargs):
    return lambda adata, trained: PerturbX(adata, **kwargs)


def _predict(**kwargs):
    kwargs.setdefault("target", "aspirin")
    return lambda adata, trained: trained[0].predict(adata, n_cells_per_target=5, **kwargs)


def _evaluate(adata, trained):
    return trained[0].evaluate(adata, n_cells_per_target=5, baselines=())


def _load(adata, trained):
    return PerturbX.load(trained[2], adata=adata)


def _nothing(adata):
    return None


def _replace(column, old, new):
    def mutate(adata):
        adata.obs[column] = adata.obs[column].astype(object).replace(old, new)

    return mutate


def _replace_text(column, old, new):
    def mutate(adata):
        adata.obs[column] = adata.obs[column].str.replace(old, new, regex=False)

    return mutate


def _set_first(drug, column, value):
    def mutate(adata):
        row = adata.obs_names[adata.obs["drug"].to_numpy() == drug][0]
        adata.obs[column] = adata.obs[column].astype(object)
        adata.obs.loc[row, column] = value

    return mutate


def _numeric_doses_with_a_nan(adata):
    adata.obs["drug"] = adata.obs["drug"].replace("aspirin+caffeine", "aspirin")
    dose = adata.obs["dose"].map(lambda d: float(d.split("+")[0]))
    dose.iloc[np.flatnonzero(adata.obs["drug"] == "caffeine")[0]] = np.nan
    adata.obs["dose"] = dose


def _drop_controls(adata):
    adata._inplace_subset_obs(adata.obs["drug"].to_numpy() != "control")


def _duplicate_names(adata):
    adata.obs_names = ["c0", "c0"] + list(adata.obs_names[2:])


def _dense_with(value, row=3, column=4):
    def mutate(adata):
        dense = adata.X.toarray()
        dense[row, column] = value
        adata.X = dense

    return mutate


def _sparse_inf(adata):
    adata.X.data[7] = np.inf


def _halve_counts(adata):
    adata.X = adata.X.multiply(0.5).tocsr()


def _drop_last_genes(adata):
    adata._inplace_subset_var(adata.var_names[:-2])


def _drop_column(column):
    def drop(adata):
        del adata.obs[column]

    return drop


CASES = {
    # --- setup_anndata: columns, controls, doses, perturbations, SMILES, covariates
    "missing perturbation column": BadInput(
        _nothing, _setup(perturbation_key="drugs"), KeyError, "perturbation_key='drugs'"
    ),
    "missing dose column": BadInput(_nothing, _setup(dose_key="dosage"), KeyError, "'dosage'"),
    "missing covariate column": BadInput(
        _nothing, _setup(covariate_keys=["donor"]), KeyError, "'donor'"
    ),
    "missing SMILES column": BadInput(
        _nothing, _setup(smiles_key="structure"), KeyError, "smiles_key='structure'"
    ),
    "missing layer": BadInput(_nothing, _setup(layer="counts"), ValueError, "counts"),
    "no control cells": BadInput(_drop_controls, _setup(), ValueError, "No control cells"),
    "misspelled control_value": BadInput(
        _nothing, _setup(control_value="contrl"), ValueError, "did you mean 'control'"
    ),
    "control label differs in case": BadInput(
        _replace("drug", "control", "Control"), _setup(), ValueError, "did you mean 'Control'"
    ),
    "NaN dose (string column)": BadInput(
        _set_first("aspirin", "dose", np.nan), _setup(), ConditionParseError, "cell.*missing"
    ),
    "NaN dose (numeric column)": BadInput(
        _numeric_doses_with_a_nan, _setup(), ConditionParseError, "dose.*missing"
    ),
    "negative dose": BadInput(
        _replace("dose", "3.0", "-3"), _setup(), ConditionParseError, "'-3' is negative"
    ),
    "non-numeric dose": BadInput(
        _replace("dose", "3.0", "three"), _setup(), ConditionParseError, "'three'"
    ),
    "infinite dose": BadInput(
        _replace("dose", "3.0", "inf"), _setup(), ConditionParseError, "'inf' is not finite"
    ),
    "extremely large dose": BadInput(
        _replace("dose", "3.0", "1e9"), _setup(), ConditionParseError, "'1e9' exceeds"
    ),
    "fewer doses than combination members": BadInput(
        _replace("dose", "1.0+10.0", "1.0"), _setup(), ConditionParseError, "'1.0' has 1 value"
    ),
    "more doses than members": BadInput(
        _replace("dose", "3.0", "3.0+1.0"), _setup(), ConditionParseError, "2 value.*1 member"
    ),
    "NaN perturbation": BadInput(
        _set_first("KLF1", "drug", np.nan), _setup(), ConditionParseError, "nan is not a string"
    ),
    "combination with an empty member": BadInput(
        _replace("drug", "KLF1", "KLF1+"), _setup(), ConditionParseError, "'KLF1\\+'"
    ),
    "combination repeating a member": BadInput(
        _replace("drug", "aspirin+caffeine", "aspirin+aspirin"),
        _setup(),
        ConditionParseError,
        "'aspirin\\+aspirin' repeats",
    ),
    "duplicate obs names": BadInput(_duplicate_names, _setup(), ValueError, "not unique.*c0"),
    "NaN covariate": BadInput(
        _set_first("caffeine", "cell_type", np.nan), _setup(), ValueError, "'cell_type'"
    ),
    "covariate repeats the perturbation column": BadInput(
        _nothing, _setup(covariate_keys=["drug"]), ValueError, "\\['drug'\\] repeat"
    ),
    "empty AnnData": BadInput(
        lambda a: a._inplace_subset_obs(np.zeros(a.n_obs, bool)), _setup(), ValueError, "empty"
    ),
    "invalid SMILES": BadInput(
        _replace_text("smiles", TOY_SMILES["caffeine"], "C1CC("),
        _setup(),
        InvalidSmilesError,
        "caffeine.*C1CC\\(",
    ),
    "two SMILES for one drug": BadInput(
        _set_first("caffeine", "smiles", "CCO"), _setup(), ValueError, "two different SMILES"
    ),
    "SMILES count differs from members": BadInput(
        _set_first("aspirin+caffeine", "smiles", "CCO"), _setup(), ValueError, "'CCO' has 1"
    ),
    "SMILES mapping names an absent drug": BadInput(
        _nothing, _setup(smiles_key={"ibuprofen": "CCO"}), ValueError, "ibuprofen"
    ),
    "invalid fingerprint size": BadInput(
        _nothing, _setup(fingerprint_bits=0), ValueError, "n_bits"
    ),
    # --- PerturbX(adata): expression values
    "NaN in X": BadInput(
        _dense_with(np.nan),
        _init(likelihood="gaussian"),
        ValueError,
        "adata.X.*NaN",
        prepare=setup_toy,
    ),
    "Inf in sparse X": BadInput(
        _sparse_inf, _init(), ValueError, "adata.X.*infinite", prepare=setup_toy
    ),
    "negative values with a counts likelihood": BadInput(
        _dense_with(-1.0), _init(likelihood="nb"), ValueError, "negative", prepare=setup_toy
    ),
    "non-integer values with a counts likelihood": BadInput(
        _halve_counts, _init(likelihood="zinb"), ValueError, "non-integer", prepare=setup_toy
    ),
    "unknown likelihood": BadInput(
        _nothing, _init(likelihood="poisson"), ValueError, "'poisson'", prepare=setup_toy
    ),
    # --- predict / evaluate on new cells, and targets
    "genes missing at predict time": BadInput(
        _drop_last_genes, _predict(), ValueError, "lacks 2.*'g48', 'g49'"
    ),
    "unknown perturbation in new cells": BadInput(
        _replace("drug", "KLF1", "KLF2"), _predict(), ValueError, "'KLF2'.*did you mean 'KLF1'"
    ),
    "unknown covariate value in new cells": BadInput(
        _replace("cell_type", "a", "z"), _predict(), ValueError, "cell_type"
    ),
    "unknown target perturbation": BadInput(
        _nothing, _predict(target="aspirinn"), ValueError, "'aspirinn'.*did you mean 'aspirin'"
    ),
    "unknown target covariate value": BadInput(
        _nothing,
        _predict(target={"drug": "aspirin", "cell_type": "c"}),
        ValueError,
        "covariate 'cell_type' value 'c'",
    ),
    "unknown target column": BadInput(
        _nothing, _predict(target={"drug": "aspirin", "celltype": "a"}), KeyError, "celltype"
    ),
    "extremely large target dose": BadInput(
        _nothing, _predict(target={"drug": "aspirin", "dose": 1e12}), ValueError, "exceeds"
    ),
    "invalid target SMILES": BadInput(
        _nothing,
        _predict(target={"drug": "newdrug", "smiles": "C1CC("}),
        InvalidSmilesError,
        "newdrug.*C1CC\\(",
    ),
    "charged SMILES given as the target perturbation": BadInput(
        _nothing, _predict(target="C[N+](C)(C)C"), ValueError, "must go in the 'smiles' column"
    ),
    "target dose count differs from members": BadInput(
        _nothing,
        _predict(target={"drug": "aspirin+caffeine", "dose": "1"}),
        ConditionParseError,
        "1 value.*2 member",
    ),
    "genes missing at evaluate time": BadInput(_drop_last_genes, _evaluate, ValueError, "lacks"),
    "registered column missing at evaluate time": BadInput(
        _drop_column("cell_type"), _evaluate, KeyError, "'cell_type'"
    ),
    # --- round two (issue 31): arguments of predict and the embedding queries
    "NaN target dose": BadInput(
        _nothing,
        _predict(target={"drug": "aspirin", "dose": np.nan}),
        ValueError,
        "'dose' of 'aspirin' is missing",
    ),
    "None target dose in a list": BadInput(
        _nothing,
        _predict(target=[{"drug": "aspirin", "dose": None}, {"drug": "caffeine"}]),
        ValueError,
        "row 0.*'dose' of 'aspirin' is missing",
    ),
    "library_size zero": BadInput(_nothing, _predict(library_size=0), ValueError, "library_size=0"),
    "library_size negative": BadInput(
        _nothing, _predict(library_size=-1e4), ValueError, "library_size=-10000"
    ),
    "library_size misspelled": BadInput(
        _nothing, _predict(library_size="observd"), ValueError, "library_size='observd'"
    ),
    "n_cells_per_target zero": BadInput(
        _nothing,
        lambda adata, trained: trained[0].predict(adata, target="aspirin", n_cells_per_target=0),
        ValueError,
        "n_cells_per_target=0",
    ),
    "source mask all False": BadInput(
        _nothing,
        lambda adata, trained: trained[0].predict(
            adata, target="aspirin", source=np.zeros(adata.n_obs, bool)
        ),
        ValueError,
        "all False",
    ),
    "source as obs names": BadInput(
        _nothing,
        lambda adata, trained: trained[0].predict(
            adata, target="aspirin", source=list(adata.obs_names[:5])
        ),
        TypeError,
        "obs names",
    ),
    "source index out of range": BadInput(
        _nothing,
        lambda adata, trained: trained[0].predict(
            adata, target="aspirin", source=[0, adata.n_obs + 3]
        ),
        IndexError,
        "outside 0",
    ),
    "source index negative": BadInput(
        _nothing,
        lambda adata, trained: trained[0].predict(adata, target="aspirin", source=[-1, 2]),
        IndexError,
        r"\[-1\]",
    ),
    "known name with another molecule's SMILES": BadInput(
        _nothing,
        _predict(target={"drug": "aspirin", "smiles": "CCO"}),
        ValueError,
        "'aspirin' is known to the model as the molecule",
    ),
    "learned perturbation given a SMILES": BadInput(
        _nothing,
        _predict(target={"drug": "KLF1", "smiles": "CCO"}),
        ValueError,
        "'KLF1' is known to the model as a learned perturbation",
    ),
    "'+' inside a name in the target": BadInput(
        _nothing,
        _predict(target="(+)-catechin"),
        ValueError,
        "'\\(\\+\\)-catechin'.*'\\+' joins",
    ),
    "misspelled plan_kwargs key": BadInput(
        _nothing,
        lambda adata, trained: PerturbX(adata, **SMALL_ARCH).train(
            max_epochs=1, plan_kwargs={"adversary_wieght": 10.0}
        ),
        ValueError,
        "'adversary_wieght'.*did you mean 'adversary_weight'",
        prepare=setup_toy,
    ),
    "NaN in a setup obs 'drug' entry": BadInput(
        _set_first("aspirin", "drug", np.nan),
        _setup(),
        ValueError,
        "missing|not a string",
    ),
    "'+' inside a name at setup": BadInput(
        _replace("drug", "KLF1", "(+)-catechin"),
        _setup(),
        ConditionParseError,
        "\\(\\+\\)-catechin.*'\\+' joins",
    ),
    "duplicated gene names at setup": BadInput(
        lambda a: setattr(a, "var_names", ["g0"] + list(a.var_names[:-1])),
        _setup(),
        ValueError,
        "duplicated gene name.*'g0'",
    ),
    "unknown covariate value, categories reordered": BadInput(
        lambda a: a.obs.__setitem__(
            "cell_type",
            pd.Categorical(a.obs["cell_type"].astype(str).replace("a", "z"), categories=["z", "b"]),
        ),
        _predict(),
        ValueError,
        "obs\\['cell_type'\\].*\\['z'\\]",
    ),
    # --- load against another gene set
    "load with fewer genes": BadInput(_drop_last_genes, _load, ValueError, "lacks 2"),
    "load with other gene names": BadInput(
        lambda a: setattr(a, "var_names", [f"h{i}" for i in range(a.n_vars)]),
        _load,
        ValueError,
        "does not know",
    ),
}


def _snapshot(adata: AnnData) -> dict:
    return {
        "obs": adata.obs.copy(),
        "obsm": {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        "uns": copy.deepcopy(dict(adata.uns)),
        "X": adata.X.copy(),
        "var_names": adata.var_names.copy(),
    }


def _assert_unchanged(adata: AnnData, before: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert set(adata.obsm) == set(before["obsm"])
    for key, value in before["obsm"].items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), value)
    assert set(adata.uns) == set(before["uns"])
    for key, value in before["uns"].items():
        assert adata.uns[key] == value, key
    assert adata.var_names.equals(before["var_names"])
    if sparse.issparse(before["X"]):
        assert sparse.issparse(adata.X) and (adata.X != before["X"]).nnz == 0
    else:
        np.testing.assert_array_equal(adata.X, before["X"])


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_has_clear_error_and_leaves_adata_unchanged(case: BadInput, trained):
    adata = toy_screen(n_cells=120, seed=1)
    case.mutate(adata)
    case.prepare(adata)
    before = _snapshot(adata)
    with pytest.raises(case.error, match=case.match):
        case.action(adata, trained)
    _assert_unchanged(adata, before)


def test_matrix_covers_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_unused_categories_are_harmless(trained):
    model, _, _ = trained
    adata = toy_screen(n_cells=120, seed=1)
    present = sorted(adata.obs["drug"].unique())
    adata.obs["drug"] = pd.Categorical(adata.obs["drug"], categories=[*present, "unused_drug"])
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"], categories=["a", "b", "z"])
    setup_toy(adata)
    fresh = PerturbX(adata, **SMALL_ARCH)
    # Perturbations come from the values present; the unused covariate level is registered.
    assert fresh.perturbations == ["KLF1", "aspirin", "caffeine"]
    assert fresh.covariate_categories == {"cell_type": ["a", "b", "z"]}
    with pytest.raises(ValueError, match="No source cells match"):
        fresh.predict(target={"drug": "aspirin", "cell_type": "z"})


def test_genes_in_another_order_are_matched_by_name(trained):
    model, _, _ = trained
    adata = toy_screen(n_cells=120, seed=1)
    reordered = adata[:, adata.var_names[::-1]].copy()
    reordered.var["extra"] = 1  # var columns must not matter
    kw = dict(target="caffeine", n_cells_per_target=10, seed=0)
    expected = model.predict(adata, **kw)
    got = model.predict(reordered, **kw)
    assert list(got.var_names) == list(expected.var_names) == list(adata.var_names)
    np.testing.assert_array_equal(got.X, expected.X)
    # The user's reordered AnnData is left as it was (a matched copy is used).
    assert list(reordered.var_names) == list(adata.var_names[::-1])
    assert "_perturbx_perturbations" not in reordered.obsm


def test_extra_genes_are_ignored_at_predict_time(trained):
    model, _, _ = trained
    adata = toy_screen(n_cells=120, seed=1)
    extra = toy_screen(n_cells=120, n_genes=3, seed=2)
    extra.var_names = ["x0", "x1", "x2"]
    wider = AnnData(
        sparse.hstack([extra.X, adata.X]).tocsr(),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=[*extra.var_names, *adata.var_names]),
    )
    kw = dict(target="aspirin", n_cells_per_target=10, seed=0)
    np.testing.assert_array_equal(model.predict(wider, **kw).X, model.predict(adata, **kw).X)


def test_largest_allowed_dose_gives_finite_predictions(trained):
    model, _, _ = trained
    pred = model.predict(target={"drug": "aspirin", "dose": MAX_DOSE}, n_cells_per_target=5)
    assert np.isfinite(np.asarray(pred.X)).all()


def test_charged_new_molecule_in_the_smiles_column_is_predicted_and_annotated(trained):
    model, _, _ = trained
    target = {"drug": "tetramethylammonium", "smiles": "C[N+](C)(C)C"}
    pred = model.predict(target=target, n_cells_per_target=5)
    assert set(pred.obs["smiles"]) == {"C[N+](C)(C)C"}
    similarity = pred.obs["max_tanimoto_to_training"].to_numpy(float)
    assert np.all((similarity >= 0) & (similarity < 1))
    assert set(pred.obs["nearest_training_drug"]) <= set(TOY_SMILES)
