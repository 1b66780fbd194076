"""Hand-computed values of the metric functions of perturbx.metrics."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from sklearn.metrics import r2_score

import perturbx.metrics as pm
from perturbx.metrics._registry import metric_arrays


def test_metrics_package_imports_no_torch_or_model():
    """perturbx.metrics must stay usable without torch: check every import statement."""
    package = Path(pm.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch", "scvi", "lightning", "perturbx.model")), (
                    f"{path.name} imports {name}"
                )


def test_mse_by_hand():
    assert pm.mse([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == pytest.approx(5 / 3)
    assert pm.mse([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], genes=[2]) == pytest.approx(4.0)


def test_pearson_delta_by_hand():
    # deltas [1, 2, 4] and [0, 2, 3]: centred [-4, -1, 5]/3 and [-5, 1, 4]/3,
    # sxy = 39/9, sxx = syy = 42/9, r = 39/42.
    pred, true, ref = [2.0, 3.0, 5.0], [1.0, 3.0, 4.0], [1.0, 1.0, 1.0]
    assert pm.pearson_delta(pred, true, ref) == pytest.approx(39 / 42)
    # Two genes, both deltas increasing: r = 1; a boolean mask selects the same genes.
    assert pm.pearson_delta(pred, true, ref, genes=[0, 2]) == pytest.approx(1.0)
    assert pm.pearson_delta(pred, true, ref, genes=np.array([True, False, True])) == 1.0


def test_pearson_delta_constant_vectors_are_nan_without_warnings():
    ref = np.array([1.0, 2.0, 3.0])
    with np.errstate(all="raise"):  # any floating-point warning would raise here
        assert math.isnan(pm.pearson_delta(ref + 5.0, [1.0, 3.0, 4.0], ref))  # constant pred
        assert math.isnan(pm.pearson_delta([1.0, 3.0, 4.0], ref, ref))  # constant truth
        assert math.isnan(pm.pearson_delta([1.0, 3.0, 4.0], [2.0, 1.0, 9.0], ref, genes=[1]))
    # float32 rounding of a prediction equal to its reference still counts as constant
    ref = np.random.default_rng(0).uniform(0, 8, 50)
    pred32 = ref.astype(np.float32).astype(np.float64)
    assert math.isnan(pm.pearson_delta(pred32, ref + np.arange(50), ref))


def test_r2_matches_sklearn_and_constant_truth_is_nan():
    true, pred = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0])
    assert pm.r2(pred, true) == pytest.approx(0.5)  # 1 - 1/2
    assert pm.r2(pred, true) == pytest.approx(r2_score(true, pred))
    assert pm.r2(pred, true, genes=[0, 1]) == pytest.approx(1.0)
    assert math.isnan(pm.r2([1.0, 2.0], [3.0, 3.0]))


def test_de_gene_weights_by_hand():
    # |t| = [1, 3, 2, 0]: ((|t| - 0) / 3)^2 = [1/9, 1, 4/9, 0], sum 14/9.
    w = pm.de_gene_weights([1.0, -3.0, 2.0, 0.0])
    np.testing.assert_allclose(w, [1 / 14, 9 / 14, 4 / 14, 0.0])
    assert np.isnan(pm.de_gene_weights([2.0, -2.0, 2.0])).all()  # constant |t|: undefined


def test_weighted_mse_and_weighted_r2_by_hand():
    w = np.array([1, 9, 4, 0]) / 14
    true = np.array([0.0, 1.0, 2.0, 3.0])
    pred = true + np.array([2.0, 1.0, 0.0, 5.0])
    assert pm.weighted_mse(pred, true, w) == pytest.approx((4 * 1 + 1 * 9) / 14)
    ref = np.array([0.5, -1.0, 2.0, 0.0])
    expected = r2_score(true - ref, pred - ref, sample_weight=w)
    assert pm.weighted_r2_delta(pred, true, ref, w) == pytest.approx(expected)
    # literal arithmetic: y = true - ref = [-0.5, 2, 0, 3], weighted mean = (-0.5 + 18)/14
    y = true - ref
    ybar = (w * y).sum()
    assert ybar == pytest.approx(17.5 / 14)
    ss_tot = (w * (y - ybar) ** 2).sum()
    assert pm.weighted_r2_delta(pred, true, ref, w) == pytest.approx(1 - (13 / 14) / ss_tot)


def test_centroid_accuracy_with_ties_by_hand():
    true = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    pred = np.array(
        [
            [1.0, 0.0],  # own 1; t1 at 1 (tie -> failure); t2 at sqrt(5) (success): 1/2
            [2.0, 0.0],  # own 0; t0 at 2, t2 at sqrt(8): 2/2
            [0.0, 0.0],  # own 2; t0 at 0 (closer), t1 at 2 (tie): 0/2
        ]
    )
    np.testing.assert_allclose(pm.centroid_accuracy(pred, true), [0.5, 1.0, 0.0])
    # Two groups are scored separately; a group of one condition is undefined.
    groups = np.array(["a", "a", "b"])
    out = pm.centroid_accuracy(pred, true, groups)
    np.testing.assert_allclose(out[:2], [0.0, 1.0])  # pred0: t1 is a tie -> 0/1
    assert np.isnan(out[2])
    # Identical true conditions are exact ties, even with large values.
    big = np.full((2, 3), 1e6)
    np.testing.assert_allclose(pm.centroid_accuracy(big, big), [0.0, 0.0])


def test_overlap_at_k_by_hand():
    ref = np.zeros(5)
    true = np.array([-5.0, 4.0, 3.0, 0.0, 0.0])  # top by |effect|: 0, 1, 2
    pred = np.array([0.0, 4.0, -5.0, 3.0, 0.0])  # top: 2, 1, 3
    assert pm.overlap_at_k(pred, true, ref, 2) == pytest.approx(1 / 2)  # {0,1} vs {2,1}
    assert pm.overlap_at_k(pred, true, ref, 3) == pytest.approx(2 / 3)
    assert pm.overlap_at_k(pred, true, ref, 10) == 1.0  # fewer genes than k: all genes
    assert pm.overlap_at_k(true, true, ref, 2) == 1.0


def test_direction_agreement_by_hand():
    ref = np.array([1.0, 1.0, 1.0, 1.0])
    pred = ref + np.array([1.0, -1.0, 2.0, 0.0])
    true = ref + np.array([2.0, 1.0, 3.0, 0.0])
    assert pm.direction_agreement(pred, true, ref, [0, 1, 2]) == pytest.approx(2 / 3)
    assert pm.direction_agreement(pred, true, ref, [3]) == 1.0  # 0 == 0
    assert math.isnan(pm.direction_agreement(pred, true, ref, []))


def test_top_de_genes_uses_what_exists():
    scores = np.array([0.0, 3.0, -5.0, 0.0, 1.0])
    np.testing.assert_array_equal(pm.top_de_genes(scores, 2), [2, 1])
    np.testing.assert_array_equal(pm.top_de_genes(scores, 5), [2, 1, 4])  # 3 DE genes only


def test_fewer_than_k_de_genes_in_vectorised_metrics():
    rng = np.random.default_rng(1)
    true, pred, control = rng.normal(size=(3, 2, 8))
    de = np.zeros((2, 8))
    de[0, [1, 4, 6]] = [2.0, -7.0, 1.0]  # row 0: three DE genes
    de[1] = np.arange(1, 9)  # row 1: eight
    values, _ = metric_arrays(pred, true, control, control + 1.0, de, top_k=(20,))
    genes = [4, 1, 6]
    expected = np.corrcoef(pred[0, genes] - control[0, genes], true[0, genes] - control[0, genes])
    assert values["pearson_delta_control_top20"][0] == pytest.approx(expected[0, 1])
    assert values["r2_top20"][0] == pytest.approx(r2_score(true[0, genes], pred[0, genes]))
    assert values["n_de_genes"].tolist() == [3.0, 8.0]
    assert values["pearson_delta_control_top20"][1] == pytest.approx(
        np.corrcoef(pred[1] - control[1], true[1] - control[1])[0, 1]
    )
    # no DE gene at all: top-k metrics undefined
    values, _ = metric_arrays(pred, true, control, control + 1.0, np.zeros((2, 8)), top_k=(5,))
    assert np.isnan(values["r2_top5"]).all()
    assert np.isnan(values["direction_agreement_top5"]).all()


def test_dynamic_range_fraction_and_normalised_score_by_hand():
    drf = pm.dynamic_range_fraction
    assert drf(0.8, 0.2, higher_is_better=True) == pytest.approx(0.6 / 0.8)
    assert drf(1.0, 4.0, higher_is_better=False, perfect=0.0) == pytest.approx(3 / 4)
    assert drf(-1.0, 0.5, higher_is_better=True) == -1.0  # -3 clipped
    assert math.isnan(drf(0.9, 1.0, higher_is_better=True))  # baseline already perfect
    assert pm.normalised_score(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert pm.normalised_score(2.5, 4.0, 1.0) == pytest.approx(0.5)  # lower is better
    assert math.isnan(pm.normalised_score(0.5, 0.3, 0.3))


def test_interpolated_duplicate_by_hand():
    out = pm.interpolated_duplicate([2.0, 4.0, 6.0], [0.0, 1.0, 0.25], [10.0, 20.0, 30.0])
    np.testing.assert_allclose(out, [2.0, 20.0, 0.75 * 6 + 0.25 * 30])
    with pytest.raises(ValueError, match="pvals_adj"):
        pm.interpolated_duplicate([1.0], [1.5], [0.0])


def test_perturbed_centroid_is_unweighted_mean_per_group():
    means = np.array([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0]])
    out = pm.perturbed_centroid(means, np.array([0, 0, 1]), np.array([1, 0, 2]))
    np.testing.assert_allclose(out[:2], [[10.0, 10.0], [1.0, 2.0]])
    assert np.isnan(out[2]).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_log_normalise_by_hand(sparse):
    counts = np.array([[1, 3], [0, 0], [2, 2]])
    matrix = sp.csr_matrix(counts) if sparse else counts
    out, note = pm.log_normalise(matrix, target_sum=4)
    out = out.toarray() if sparse else out
    np.testing.assert_allclose(out, np.log1p([[1, 3], [0, 0], [2, 2]]), rtol=1e-6)
    assert "normalised to 4 per cell" in note and "log1p" in note
    logged = np.log1p(counts.astype(float))
    same, note = pm.log_normalise(logged)  # not integers: used as given
    np.testing.assert_allclose(same, logged, rtol=1e-6)
    assert "as given" in note
    with pytest.raises(ValueError, match="negative"):
        pm.log_normalise(-np.ones((2, 2)), counts=True)


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_log_normalise_in_blocks_of_rows(layout, monkeypatch):
    from perturbx.metrics import _pseudobulk

    monkeypatch.setattr(_pseudobulk, "CELLS_PER_BLOCK", 4)  # blocks cut the 11 cells
    counts = np.random.default_rng(0).poisson(1.5, (11, 6))
    counts[3] = 0  # an empty cell stays zero
    expected = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 10.0)
    matrix = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts)}[layout]
    before = matrix.copy()
    out, _ = pm.log_normalise(matrix, counts=True, target_sum=10.0)
    assert sp.issparse(out) == (layout != "dense")
    np.testing.assert_allclose(out.toarray() if sp.issparse(out) else out, expected, rtol=1e-6)
    after = matrix.toarray() if sp.issparse(matrix) else matrix
    np.testing.assert_array_equal(after, before.toarray() if sp.issparse(before) else before)


def test_log_normalise_sums_duplicate_sparse_entries():
    # (0, 0) is stored twice: 1 + 2 counts; the cell has 3 + 1 = 4 counts
    matrix = sp.csr_matrix(
        (np.array([1.0, 2.0, 1.0]), np.array([0, 0, 1]), np.array([0, 3])), shape=(1, 2)
    )
    out, _ = pm.log_normalise(matrix, counts=True, target_sum=4.0)
    np.testing.assert_allclose(out.toarray(), np.log1p([[3.0, 1.0]]), rtol=1e-6)


def test_log_normalise_peak_memory_is_about_one_copy():
    import tracemalloc

    matrix = sp.random(
        100_000,
        100,
        density=0.1,
        format="csr",
        dtype=np.float32,
        random_state=0,
        data_rvs=lambda n: np.ones(n),
    )
    size = matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes
    tracemalloc.start()
    try:
        pm.log_normalise(matrix, counts=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * size, f"peak {peak / size:.2f} x the matrix"


def test_pseudobulk_means_in_log_space():
    counts = np.array([[1, 1], [3, 1], [0, 4], [2, 2]], dtype=np.float32)
    adata = AnnData(
        counts, obs=pd.DataFrame({"g": ["a", "a", "b", "b"]}, index=[f"c{i}" for i in range(4)])
    )
    out = pm.pseudobulk(adata, "g", target_sum=4)
    expected_a = (np.log1p([2.0, 2.0]) + np.log1p([3.0, 1.0])) / 2
    expected_b = (np.log1p([0.0, 4.0]) + np.log1p([2.0, 2.0])) / 2
    np.testing.assert_allclose(out.X, [expected_a, expected_b], rtol=1e-6)
    assert out.obs["n_cells"].tolist() == [2, 2]
    assert "log1p" in out.uns["normalisation"]
    with pytest.raises(KeyError, match="nope"):
        pm.pseudobulk(adata, ["nope"])


def test_condition_table_canonicalises_doses_and_combinations():
    obs = pd.DataFrame(
        {
            "drug": ["A+B", "B+A", "A", "A", "ctrl", "ctrl+A"],
            "dose": ["1+3", "3.0+1.0", "1", "1.0", "nan", "5+2"],
            "cell": ["x", "x", "x", "y", "x", "x"],
        },
        index=[f"c{i}" for i in range(6)],
    )
    table, codes = pm.condition_table(
        obs, perturbation_key="drug", dose_key="dose", covariate_keys=["cell"], control_value="ctrl"
    )
    # rows 0/1 are one condition; A at 1 vs 1.0 is one condition per cell line;
    # "ctrl+A" at 5+2 drops the control member -> A at 2.
    assert codes[0] == codes[1]
    assert codes[2] != codes[3]
    labels = table["condition"].to_numpy()[codes]
    assert labels[0] == "A+B @ 1.0+3.0 | cell=x"
    assert labels[2] == "A @ 1.0 | cell=x" and labels[3] == "A @ 1.0 | cell=y"
    assert labels[5] == "A @ 2.0 | cell=x"
    assert table["is_control"].to_numpy()[codes].tolist() == [False] * 4 + [True, False]


def test_metric_info_directions():
    info = pm.metric_info((5,))
    assert not info.loc["mse", "higher_is_better"] and info.loc["mse", "perfect_value"] == 0
    assert info.loc["pearson_delta_centroid_top5", "higher_is_better"]
    assert "overlap_at_5" in info.index and "direction_agreement_top5" in info.index
    with pytest.raises(ValueError, match="top_k"):
        pm.metric_info((0,))


def test_the_registry_describes_exactly_the_metrics_it_computes():
    rng = np.random.default_rng(0)
    true, control, centroid = (rng.normal(size=(4, 30)) for _ in range(3))
    pred = true + rng.normal(scale=0.1, size=true.shape)
    de = rng.normal(size=(4, 30))
    values, constant = metric_arrays(pred, true, control, centroid, de, top_k=(5, 10))
    registry = pm.metric_registry((5, 10))
    assert [m.name for m in registry] == list(pm.metric_info((5, 10)).index)
    assert list(values) == [m.name for m in registry] + ["n_de_genes"]
    assert set(constant) == {m.name for m in registry if m.name.startswith("pearson")}
    # each specification's function is the public metric function of the same name
    by_name = {m.name: m for m in registry}
    inputs = pm.MetricInputs(pred, true, control, centroid, de, top_k=(5, 10))
    np.testing.assert_allclose(by_name["mse"].compute(inputs)[0], pm.mse(pred, true))
    np.testing.assert_allclose(
        by_name["weighted_mse"].compute(inputs)[0],
        pm.weighted_mse(pred, true, pm.de_gene_weights(de)),
    )
    np.testing.assert_allclose(
        by_name["pearson_delta_control_top5"].compute(inputs)[0],
        [
            pm.pearson_delta(p, t, c, genes=pm.top_de_genes(d, 5))
            for p, t, c, d in zip(pred, true, control, de, strict=True)
        ],
    )
