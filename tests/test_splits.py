"""Tests of the out-of-distribution splits on hand-made data and on the real data sets."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbx import datasets
from perturbx.data.splits import (
    split_unseen_cell_types,
    split_unseen_combinations,
    split_unseen_doses,
    split_unseen_perturbations,
)

SINGLES = ["A", "B", "C", "D", "E", "F"]
PATHWAY = {
    "A": "kinase",
    "B": "kinase",
    "C": "kinase",
    "D": "chromatin",
    "E": "chromatin",
    "F": "chromatin",
}
COMBOS = ["A+B", "C+D", "E+G"]  # G is never measured alone
CELLS_PER_CONDITION = 5
CONTROLS_PER_CELL_TYPE = 20


def make_toy() -> ad.AnnData:
    """Drugs A-F at doses 1 and 10, three pairs, 20 controls, in cell types X and Y."""
    rows = []
    for cell_type in ("X", "Y"):
        rows += [("control", "0", cell_type, None, True)] * CONTROLS_PER_CELL_TYPE
        for drug in SINGLES:
            for dose in ("1", "10"):
                rows += [(drug, dose, cell_type, PATHWAY[drug], drug != "F")] * CELLS_PER_CONDITION
        for combo in COMBOS:
            rows += [(combo, "1+1", cell_type, None, True)] * CELLS_PER_CONDITION
    obs = pd.DataFrame(rows, columns=["drug", "dose", "cell_type", "pathway", "has_smiles"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(X=np.zeros((len(obs), 3), dtype=np.float32), obs=obs)


def members(obs: pd.DataFrame, key: str = "drug") -> pd.Series:
    return obs[key].astype(str).str.split("+").map(set)


def names_in(obs: pd.DataFrame, split: str, key: str = "drug") -> set[str]:
    part = obs[(obs["split"] == split) & (obs[key] != "control")]
    return set().union(*members(part, key)) if len(part) else set()


def assert_controls_in_every_split(obs: pd.DataFrame, key: str = "drug") -> None:
    controls = obs[obs[key] == "control"]
    assert set(controls["split"]) == {"train", "validation", "test"}


def assert_unchanged(adata: ad.AnnData, obs_before: pd.DataFrame, uns_keys: set) -> None:
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert set(adata.uns) == uns_keys


@pytest.fixture
def toy() -> ad.AnnData:
    return make_toy()


@pytest.fixture(scope="module")
def devel(data_cache):
    return datasets.norman_mcfaline_devel(data_cache)


@pytest.fixture(scope="module")
def lincs(data_cache):
    return datasets.lincs_a375(data_cache)


# ----------------------------------------------------------------------------- unseen perturbations


def test_unseen_perturbations_holds_out_every_cell_with_the_drug(toy):
    summary = split_unseen_perturbations(toy, "drug", dose_key="dose", held_out=["A", "E"])
    obs = toy.obs
    has_held = members(obs).map(lambda m: bool(m & {"A", "E"}))
    assert (obs.loc[has_held, "split"] == "test").all()  # includes A+B and E+G
    non_control_test = obs[(obs["split"] == "test") & (obs["drug"] != "control")]
    assert set(non_control_test["drug"]) == {"A", "A+B", "E", "E+G"}
    assert not ({"A", "E"} & (names_in(obs, "train") | names_in(obs, "validation")))
    assert_controls_in_every_split(obs)
    # The summary agrees with a direct count.
    counted = pd.crosstab(obs["split"], obs["drug"] == "control")
    for split in ("train", "validation", "test"):
        rows = summary[summary["split"] == split]
        assert rows.loc[rows["kind"] == "control", "n_cells"].item() == counted.loc[split, True]
        assert rows.loc[rows["kind"] != "control", "n_cells"].sum() == counted.loc[split, False]
    test_rows = summary[summary["split"] == "test"].set_index("kind")
    assert test_rows.loc["single", "n_conditions"] == 4  # A and E at two doses
    assert test_rows.loc["combination", "n_conditions"] == 2
    assert toy.uns["perturbx_splits"]["split"]["held_out"] == ["A", "E"]


def test_unseen_perturbations_controls_split_per_covariate(toy):
    split_unseen_perturbations(
        toy, "drug", held_out="A", covariate_keys=["cell_type"], control_fractions=(0.8, 0.1, 0.1)
    )
    controls = toy.obs[toy.obs["drug"] == "control"]
    table = pd.crosstab(controls["cell_type"], controls["split"])
    for cell_type in ("X", "Y"):
        assert table.loc[cell_type].to_dict() == {"test": 2, "train": 16, "validation": 2}


def test_unseen_perturbations_is_reproducible(toy):
    def held(seed):
        adata = make_toy()
        split_unseen_perturbations(adata, "drug", n_held_out=2, seed=seed)
        return adata.obs["split"].to_numpy(), adata.uns["perturbx_splits"]["split"]["held_out"]

    first, held_first = held(3)
    again, held_again = held(3)
    np.testing.assert_array_equal(first, again)
    assert held_first == held_again and len(held_first) == 2
    others = {tuple(held(seed)[1]) for seed in range(6)}
    assert len(others) > 1  # different seeds give different splits


def test_unseen_perturbations_does_not_depend_on_row_order(toy):
    split_unseen_perturbations(toy, "drug", n_held_out=2, seed=5)
    shuffled = make_toy()
    order = np.random.default_rng(0).permutation(shuffled.n_obs)
    shuffled = shuffled[order].copy()
    split_unseen_perturbations(shuffled, "drug", n_held_out=2, seed=5)
    assert (
        toy.uns["perturbx_splits"]["split"]["held_out"]
        == shuffled.uns["perturbx_splits"]["split"]["held_out"]
    )


def test_unseen_perturbations_fraction_stratified_and_required(toy):
    # F lacks SMILES, G occurs only in E+G whose cells all have SMILES.
    for seed in range(5):
        split_unseen_perturbations(toy, "drug", n_held_out=0.5, require_key="has_smiles", seed=seed)
        held = toy.uns["perturbx_splits"]["split"]["held_out"]
        assert len(held) == 3 and "F" not in held  # round(0.5 * 6 candidates)
    for seed in range(5):
        split_unseen_perturbations(
            toy, "drug", n_held_out=2, stratify_key="pathway", require_key="has_smiles", seed=seed
        )
        held = toy.uns["perturbx_splits"]["split"]["held_out"]
        assert sorted(PATHWAY.get(p, "?") for p in held) == ["chromatin", "kinase"]


def test_unseen_perturbations_validation_units(toy):
    split_unseen_perturbations(
        toy,
        "drug",
        dose_key="dose",
        held_out=["A"],
        validation_fraction=0.3,
        validation_unit="condition",
    )
    obs = toy.obs[toy.obs["drug"] != "control"]
    splits_per_condition = obs.groupby(["drug", "dose"])["split"].nunique()
    assert (splits_per_condition == 1).all()  # whole conditions
    n_validation = obs[obs["split"] == "validation"].groupby(["drug", "dose"]).ngroups
    assert n_validation == round(0.3 * (10 + 2))  # 12 non-control conditions without A

    split_unseen_perturbations(
        toy,
        "drug",
        dose_key="dose",
        held_out=["A"],
        validation_fraction=0.4,
        validation_unit="cell",
        covariate_keys=["cell_type"],
    )
    obs = toy.obs[(toy.obs["drug"] != "control") & (toy.obs["split"] != "test")]
    per_group = obs.groupby(["drug", "dose", "cell_type"])["split"]
    assert (per_group.apply(lambda s: (s == "validation").sum()) == 2).all()  # round(0.4 * 5)
    assert (per_group.apply(lambda s: (s == "train").sum()) == 3).all()

    split_unseen_perturbations(
        toy,
        "drug",
        held_out=["A"],
        validation_fraction=0.2,
        validation_unit="perturbation",
        require_key="has_smiles",
    )
    chosen = toy.uns["perturbx_splits"]["split"]["validation_perturbations"]
    assert len(chosen) == 1 and chosen[0] in {"B", "C", "D", "E", "G"}  # round(0.2 * 5)
    has_chosen = members(toy.obs).map(lambda m: chosen[0] in m and "A" not in m)
    assert (toy.obs.loc[has_chosen, "split"] == "validation").all()
    assert chosen[0] not in names_in(toy.obs, "train")


def test_unseen_perturbations_errors_leave_adata_unchanged(toy):
    before, uns_keys = toy.obs.copy(), set(toy.uns)
    with pytest.raises(ValueError, match="asks to hold out 9 but there are only 7"):
        split_unseen_perturbations(toy, "drug", n_held_out=9)
    with pytest.raises(ValueError, match="unknown perturbation.*'Aa'.*close matches: 'A'"):
        split_unseen_perturbations(toy, "drug", held_out=["Aa"])
    with pytest.raises(KeyError, match="'drugs'"):
        split_unseen_perturbations(toy, "drugs", held_out=["A"])
    with pytest.raises(KeyError, match="'pathways'"):
        split_unseen_perturbations(toy, "drug", n_held_out=1, stratify_key="pathways")
    with pytest.raises(ValueError, match=r"\['F'\] have cells where obs\['has_smiles'\]"):
        split_unseen_perturbations(toy, "drug", held_out=["F"], require_key="has_smiles")
    with pytest.raises(ValueError, match="either held_out or n_held_out"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], n_held_out=1)
    with pytest.raises(ValueError, match="control_fractions"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], control_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="validation_fraction"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], validation_fraction=1.5)
    with pytest.raises(ValueError, match="validation_unit"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], validation_unit="batch")
    with pytest.raises(ValueError, match="control label 'ctrl'"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], control_value="ctrl")
    with pytest.raises(ValueError, match="split_key='drug' would overwrite"):
        split_unseen_perturbations(toy, "drug", held_out=["A"], split_key="drug")
    with pytest.raises(ValueError, match="leave none in train"):
        split_unseen_perturbations(toy, "drug", held_out=[*SINGLES, "G"])
    assert_unchanged(toy, before, uns_keys)


def test_unseen_perturbations_on_lincs(lincs):
    adata = lincs.copy()
    split_unseen_perturbations(
        adata, "perturbation", dose_key="dose", n_held_out=10, require_key="has_smiles", seed=1
    )
    obs = adata.obs
    held = set(adata.uns["perturbx_splits"]["split"]["held_out"])
    assert len(held) == 10
    assert obs.loc[obs["perturbation"].isin(held), "has_smiles"].all()
    assert set(obs.loc[obs["perturbation"].isin(held), "split"]) == {"test"}
    assert not held & set(obs.loc[obs["split"] == "train", "perturbation"])
    assert_controls_in_every_split(obs, "perturbation")


# ----------------------------------------------------------------------------- unseen combinations


def test_unseen_combinations_members_are_seen(toy):
    split_unseen_combinations(toy, "drug", dose_key="dose", held_out=["B+A"])  # order-free
    obs = toy.obs
    assert set(obs.loc[obs["split"] == "test", "drug"]) == {"A+B", "control"}
    train_singles = set(
        obs.loc[(obs["split"] == "train") & ~obs["drug"].str.contains("+", regex=False), "drug"]
    )
    assert {"A", "B"} <= train_singles
    assert_controls_in_every_split(obs)


def test_unseen_combinations_candidates_and_errors(toy):
    before, uns_keys = toy.obs.copy(), set(toy.uns)
    with pytest.raises(ValueError, match=r"'E\+G' has member\(s\) \['G'\] never seen"):
        split_unseen_combinations(toy, "drug", held_out=["E+G"])
    with pytest.raises(ValueError, match="asks to hold out 3 but there are only 2"):
        split_unseen_combinations(toy, "drug", n_held_out=3)  # A+B and C+D qualify
    with pytest.raises(ValueError, match=r"unknown combination.*'A\+C'"):
        split_unseen_combinations(toy, "drug", held_out=["A+C"])
    with pytest.raises(ValueError, match="not a combination"):
        split_unseen_combinations(toy, "drug", held_out=["A"])
    assert_unchanged(toy, before, uns_keys)
    for seed in range(4):
        split_unseen_combinations(toy, "drug", n_held_out=1, seed=seed)
        assert toy.uns["perturbx_splits"]["split"]["held_out"][0] in {"A+B", "C+D"}


def test_unseen_combinations_on_norman_devel(devel):
    adata = devel.copy()
    summary = split_unseen_combinations(
        adata, "perturbation", dose_key="dose", n_held_out=3, covariate_keys=["cell_type"], seed=0
    )
    obs = adata.obs
    test_combos = set(
        obs.loc[(obs["split"] == "test") & (obs["perturbation"] != "control"), "perturbation"]
    )
    assert len(test_combos) == 3 and all("+" in c for c in test_combos)
    train_singles = set(
        obs.loc[
            (obs["split"] == "train") & ~obs["perturbation"].str.contains("+", regex=False),
            "perturbation",
        ]
    )
    for combo in test_combos:
        assert set(combo.split("+")) <= train_singles
    for cell_type in ("k562", "A172", "T98G", "U87MG"):
        controls = obs[(obs["perturbation"] == "control") & (obs["cell_type"] == cell_type)]
        assert controls["split"].value_counts().to_dict() == {
            "train": 80,
            "validation": 10,
            "test": 10,
        }
    assert summary["n_cells"].sum() == adata.n_obs
    # Only 5 pairs of the subset have both genes measured alone.
    with pytest.raises(ValueError, match="only 5 combinations"):
        split_unseen_combinations(adata, "perturbation", n_held_out=6)


def test_unseen_combinations_reproducible(devel):
    first, second, other = devel.copy(), devel.copy(), devel.copy()
    for adata, seed in ((first, 4), (second, 4), (other, 5)):
        split_unseen_combinations(adata, "perturbation", n_held_out=2, seed=seed)
    np.testing.assert_array_equal(first.obs["split"], second.obs["split"])
    assert not np.array_equal(first.obs["split"], other.obs["split"])


# ----------------------------------------------------------------------------- unseen cell types


def test_unseen_cell_types(toy):
    split_unseen_cell_types(toy, "drug", "cell_type", "Y", perturbations=["A", "C"])
    obs = toy.obs
    test = obs[(obs["split"] == "test") & (obs["drug"] != "control")]
    assert set(test["cell_type"]) == {"Y"}
    assert set(test["drug"]) == {"A", "C", "A+B", "C+D"}
    assert {"A", "C"} <= names_in(obs[obs["cell_type"] == "X"], "train")
    controls_y = obs[(obs["drug"] == "control") & (obs["cell_type"] == "Y")]
    assert controls_y["split"].value_counts().to_dict() == {"train": 16, "validation": 2, "test": 2}
    untouched = obs[(obs["cell_type"] == "Y") & obs["drug"].isin(["B", "D"])]
    assert (untouched["split"] != "test").all()


def test_unseen_cell_types_errors(toy):
    before, uns_keys = toy.obs.copy(), set(toy.uns)
    with pytest.raises(ValueError, match="unknown cell type.*'y'"):
        split_unseen_cell_types(toy, "drug", "cell_type", "y")
    with pytest.raises(KeyError, match="'celltype'"):
        split_unseen_cell_types(toy, "drug", "celltype", "Y")
    with pytest.raises(ValueError, match="asks to hold out 8 but there are only 7"):
        split_unseen_cell_types(toy, "drug", "cell_type", "Y", perturbations=8)
    assert_unchanged(toy, before, uns_keys)


def test_unseen_cell_types_on_devel(devel):
    adata = devel.copy()
    split_unseen_cell_types(adata, "perturbation", "cell_type", "A172", perturbations=2, seed=3)
    held = set(adata.uns["perturbx_splits"]["split"]["held_out"])
    obs = adata.obs
    test = obs[(obs["split"] == "test") & (obs["perturbation"] != "control")]
    assert set(test["cell_type"]) == {"A172"} and set(test["perturbation"]) == held
    other_types_train = obs[(obs["cell_type"] != "A172") & (obs["split"] == "train")]
    assert held <= set(other_types_train["perturbation"])
    # KLF1 is only measured in K562, so it cannot be held out in A172.
    with pytest.raises(ValueError, match=r"\['KLF1'\] are not measured both in 'A172'"):
        split_unseen_cell_types(adata, "perturbation", "cell_type", "A172", perturbations=["KLF1"])


# ----------------------------------------------------------------------------- unseen doses


def test_unseen_doses_highest(toy):
    split_unseen_doses(toy, "drug", "dose", validation_unit="condition", validation_fraction=0.5)
    obs = toy.obs
    test = obs[(obs["split"] == "test") & (obs["drug"] != "control")]
    assert set(zip(test["drug"], test["dose"], strict=True)) == {(d, "10") for d in SINGLES}
    # Every drug keeps its other dose in train; pairs are never test.
    for drug in SINGLES:
        assert set(obs.loc[(obs["drug"] == drug) & (obs["split"] == "train"), "dose"]) == {"1"}
    assert_controls_in_every_split(obs)


def test_unseen_doses_values_and_errors(toy):
    split_unseen_doses(toy, "drug", "dose", which=[1.0])
    test = toy.obs[(toy.obs["split"] == "test") & (toy.obs["drug"] != "control")]
    assert set(test["dose"]) == {"1"} and set(test["drug"]) == set(SINGLES)
    before, uns_keys = toy.obs.copy(), set(toy.uns)
    with pytest.raises(ValueError, match=r"dose\(s\) \[3.0\] match no condition"):
        split_unseen_doses(toy, "drug", "dose", which=3.0)
    with pytest.raises(ValueError, match="every dose of"):
        split_unseen_doses(toy, "drug", "dose", which=[1.0, 10.0])
    with pytest.raises(ValueError, match="which must be"):
        split_unseen_doses(toy, "drug", "dose", which="middle")
    assert_unchanged(toy, before, uns_keys)


def test_unseen_doses_on_lincs(lincs):
    adata = lincs.copy()
    split_unseen_doses(adata, "perturbation", "dose", seed=2)
    obs = adata.obs
    treated = obs[obs["perturbation"] != "control"]
    highest = treated.groupby("perturbation", observed=True)["dose"].max()
    test = treated[treated["split"] == "test"]
    assert len(test) == len(highest)  # one well per drug and dose on this plate
    assert (test["dose"].to_numpy() == highest[test["perturbation"]].to_numpy()).all()
    train = treated[treated["split"] == "train"]
    assert set(train["perturbation"]) == set(highest.index)
    assert_controls_in_every_split(obs, "perturbation")
