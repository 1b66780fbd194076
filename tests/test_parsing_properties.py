"""Property tests (hypothesis) of condition parsing, and order invariance of evaluation."""

from __future__ import annotations

import string

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem

import perturbx.metrics as pm
from _toy import SMALL_ARCH, setup_toy, toy_screen
from perturbx import PerturbX
from perturbx.conditions import (
    MAX_DOSE,
    ConditionParseError,
    _balanced,
    format_condition,
    parse_condition,
    parse_condition_columns,
    split_smiles_combination,
)
from perturbx.data._fields import _label

FAST = settings(max_examples=60, deadline=None)
CONTROL = "control"

# Names whose brackets close: a combination member like ")-catechin" (from "(+)-catechin") is
# rejected on purpose (test_setup_anndata / test_bad_input).
names_strategy = st.text(
    string.ascii_letters + string.digits + "-_.()", min_size=1, max_size=8
).filter(lambda n: n != CONTROL and _balanced(n))
doses_strategy = st.floats(0.0, MAX_DOSE, allow_nan=False, allow_infinity=False)


@st.composite
def conditions(draw, min_members: int = 1, max_members: int = 4):
    names = draw(st.lists(names_strategy, min_size=min_members, max_size=max_members, unique=True))
    doses = draw(st.lists(doses_strategy, min_size=len(names), max_size=len(names)))
    return tuple(names), tuple(doses)


# ------------------------------------------------------------------- parse / format
@FAST
@given(conditions(min_members=0))
def test_format_then_parse_gives_the_condition_back_exactly(condition):
    names, doses = condition
    perturbation, dose = format_condition(names, doses, control_value=CONTROL)
    assert parse_condition(perturbation, dose or None, control_value=CONTROL) == condition


@FAST
@given(conditions(), st.data())
def test_parse_then_format_is_a_fixed_point(condition, data):
    names, doses = condition
    # Doses written loosely ("3", "3.50", "1e2"): one parse/format pass canonicalises them.
    loose = "+".join(data.draw(st.sampled_from([f"{d:g}", f"{d:.6e}", repr(d)])) for d in doses)
    parsed = parse_condition("+".join(names), loose, control_value=CONTROL)
    text = format_condition(*parsed, control_value=CONTROL)
    assert format_condition(*parse_condition(*text, control_value=CONTROL)) == text
    assert parsed[0] == names
    np.testing.assert_allclose(parsed[1], doses, rtol=1e-5)


@FAST
@given(conditions(min_members=2), st.randoms(use_true_random=False))
def test_member_order_keeps_dose_pairing_and_adversary_label(condition, random):
    names, doses = condition
    order = list(range(len(names)))
    random.shuffle(order)
    perturbation = "+".join(names[i] for i in order)
    dose = "+".join(repr(doses[i]) for i in order)
    shuffled = parse_condition(perturbation, dose, control_value=CONTROL)
    assert dict(zip(*shuffled, strict=True)) == dict(zip(names, doses, strict=True))
    assert _label(shuffled[0]) == _label(names)


def test_exponent_signs_are_not_combination_separators():
    assert parse_condition("A+B", "1e+03+2.5E-1") == (("A", "B"), (1000.0, 0.25))
    assert parse_condition("A", "1E+2") == (("A",), (100.0,))
    with pytest.raises(ConditionParseError, match="'1e\\+'"):
        parse_condition("A", "1e+")


@FAST
@given(conditions(), st.integers(0, 4))
def test_wrong_number_of_doses_is_always_an_error(condition, n_doses):
    names, doses = condition
    if n_doses == len(names):
        n_doses += 1
    dose = "+".join(["1.0"] * n_doses) if n_doses else ""
    with pytest.raises(ConditionParseError):
        parse_condition("+".join(names), dose, control_value=CONTROL)


@FAST
@given(conditions(), st.integers(0, 3))
def test_control_members_are_dropped_with_their_dose(condition, position):
    names, doses = condition
    position = min(position, len(names))
    with_control = (*names[:position], CONTROL, *names[position:])
    with_dose = (*doses[:position], 7.0, *doses[position:])
    text = "+".join(with_control), "+".join(map(repr, with_dose))
    assert parse_condition(*text, control_value=CONTROL) == condition


@FAST
@given(
    st.lists(st.sampled_from(["control", "A", "B", "A+B", "B+A"]), min_size=2, max_size=30),
    st.randoms(use_true_random=False),
)
def test_parsing_columns_does_not_depend_on_row_order(perturbations, random):
    dose_of = {"control": "0", "A": "1", "B": "2", "A+B": "1+2", "B+A": "2+1"}
    obs = pd.DataFrame(
        {"p": perturbations, "d": [dose_of[p] for p in perturbations]},
        index=[f"c{i}" for i in range(len(perturbations))],
    )
    order = list(range(len(obs)))
    random.shuffle(order)
    per_cell = {}
    for frame in (obs, obs.iloc[order]):
        conditions_, codes = parse_condition_columns(frame, "p", "d", CONTROL)
        per_cell[len(per_cell)] = {
            cell: dict(zip(*conditions_[code], strict=True))
            for cell, code in zip(frame.index, codes, strict=True)
        }
    assert per_cell[0] == per_cell[1]
    assert per_cell[0]["c0"] == dict(
        zip(
            *parse_condition(perturbations[0], dose_of[perturbations[0]], control_value=CONTROL),
            strict=True,
        )
    )


# ------------------------------------------------------------------- SMILES combinations
SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "C[N+](C)(C)C",
    "[O-][N+](=O)c1ccccc1",
    "[NH4+]",
    "CC(C)Cc1ccc(cc1)C(C)C(O)=O",
    "O=C([O-])CC[C@H]([NH3+])C(=O)[O-]",
    "Cl",
]


@FAST
@given(st.lists(st.sampled_from(SMILES), min_size=1, max_size=4))
def test_split_smiles_inverts_joining_canonical_smiles(members):
    canonical = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in members]
    assert split_smiles_combination("+".join(canonical)) == canonical


# ----------------------------------------------------------- evaluation and cell order
def _screen(seed: int = 0, n_genes: int = 40) -> AnnData:
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, n_genes) + 0.5
    blocks, obs = [], []
    for line in ("x", "y"):
        for drug, n in (("control", 60), ("A", 30), ("B", 30), ("C", 30)):
            effect = np.zeros(n_genes) if drug == "control" else rng.normal(0, 0.7, n_genes)
            blocks.append(rng.poisson(base * np.exp(effect) * 10, (n, n_genes)))
            obs += [(drug, line)] * n
    obs = pd.DataFrame(obs, columns=["drug", "cell_line"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = AnnData(np.vstack(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    return adata


def _assert_same_tables(first: pd.DataFrame, second: pd.DataFrame) -> None:
    keys = ["method", "condition"]
    first = first.sort_values(keys).reset_index(drop=True)
    second = second.sort_values(keys).reset_index(drop=True)
    numeric = first.select_dtypes("number").columns
    pd.testing.assert_frame_equal(first.drop(columns=numeric), second.drop(columns=numeric))
    # Means summed in another order differ in the last bits only.
    np.testing.assert_allclose(
        first[numeric].to_numpy(float),
        second[numeric].to_numpy(float),
        rtol=1e-9,
        atol=1e-12,
        equal_nan=True,
    )


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_score_does_not_depend_on_the_order_of_real_cells(seed):
    real = _screen()
    pred = _screen(seed=1)
    pred = pred[pred.obs["drug"].isin(["A", "B"]).to_numpy()].copy()
    pred.obs["method"] = "m"
    kw = dict(perturbation_key="drug", covariate_keys=["cell_line"], method_key="method")
    pm.clear_de_cache()
    expected = pm.score(pred, real, **kw).per_condition
    shuffled = real[np.random.default_rng(seed).permutation(real.n_obs)].copy()
    pm.clear_de_cache()
    _assert_same_tables(pm.score(pred, shuffled, **kw).per_condition, expected)


def test_model_evaluation_does_not_depend_on_the_order_of_cells_or_genes():
    adata = toy_screen(n_cells=300)
    setup_toy(adata)
    model = PerturbX(adata, **SMALL_ARCH)
    model.train(max_epochs=1, batch_size=64, seed=0, enable_progress_bar=False)
    held_out = toy_screen(n_cells=200, seed=5)
    cells = np.random.default_rng(0).permutation(held_out.n_obs)
    shuffled = held_out[cells][:, held_out.var_names[::-1]].copy()
    kw = dict(n_cells_per_target=20, baselines=("control_mean",), seed=0)
    pm.clear_de_cache()
    expected = model.evaluate(held_out, **kw).per_condition
    pm.clear_de_cache()
    _assert_same_tables(model.evaluate(shuffled, **kw).per_condition, expected)
