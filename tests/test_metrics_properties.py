"""Property tests of the vectorised metrics (hypothesis draws shapes and seeds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr

import perturbx.metrics as pm
from perturbx.metrics._calibration import calibrate
from perturbx.metrics._registry import metric_arrays

TOP_K = (3, 7)
FAST = settings(max_examples=40, deadline=None)


@st.composite
def means(draw):
    """Random continuous means (no ties): conditions x genes, plus control, centroid, DE."""
    n = draw(st.integers(2, 7))
    g = draw(st.integers(4, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    control = rng.gamma(2.0, 1.0, g)
    true = control + rng.normal(0, 1.0, (n, g))
    pred = control + rng.normal(0, 1.0, (n, g))
    centroid = true.mean(axis=0)
    de = rng.normal(0, 3.0, (n, g))
    return pred, true, control, centroid, de


def _best(metric: str) -> float:
    return float(pm.metric_info(TOP_K).loc[metric, "perfect_value"])


@FAST
@given(means())
def test_perfect_prediction_gets_the_best_value_of_every_metric(data):
    _, true, control, centroid, de = data
    values, _ = metric_arrays(true, true, control, centroid, de, top_k=TOP_K)
    for metric in pm.metric_info(TOP_K).index:
        np.testing.assert_allclose(values[metric], _best(metric), atol=1e-9, err_msg=metric)


@FAST
@given(means())
def test_predicting_the_centroid_scores_zero_after_normalisation(data):
    pred, true, control, centroid, de = data
    neg, const = metric_arrays(centroid, true, control, centroid, de, top_k=TOP_K)
    for name in ("pearson_delta_centroid", *(f"pearson_delta_centroid_top{k}" for k in TOP_K)):
        assert np.isnan(neg[name]).all()
        assert const[name].all()
    # a user method that predicts the centroid, scored against the mean baseline and a
    # positive control (here: an arbitrary other prediction)
    pos, _ = metric_arrays(pred, true, control, centroid, de, top_k=TOP_K)
    n = len(true)
    metrics = list(pm.metric_info(TOP_K).index)
    frames = []
    for values, constant in ((neg, const), (neg, const), (pos, {})):
        frame = pd.DataFrame({m: values[m] for m in metrics})
        for name, mask in constant.items():
            frame.loc[mask, name] = 0.0
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    methods = pd.Series(["user"] * n + ["neg"] * n + ["pos"] * n)
    conditions = pd.Series([f"c{i}" for i in range(n)] * 3)
    _, normalised = calibrate(
        table, methods, conditions, pm.metric_info(TOP_K), negative="neg", positive="pos"
    )
    user = normalised[methods.to_numpy() == "user"].to_numpy()
    assert np.isfinite(user).any()
    np.testing.assert_allclose(user[np.isfinite(user)], 0.0, atol=1e-12)


@FAST
@given(means(), st.integers(0, 2**32 - 1))
def test_metrics_are_invariant_to_the_order_of_conditions_and_genes(data, seed):
    pred, true, control, centroid, de = data
    rng = np.random.default_rng(seed)
    rows, cols = rng.permutation(len(true)), rng.permutation(true.shape[1])
    first, _ = metric_arrays(pred, true, control, centroid, de, top_k=TOP_K)
    second, _ = metric_arrays(
        pred[rows][:, cols],
        true[rows][:, cols],
        control[cols],
        centroid[cols],
        de[rows][:, cols],
        top_k=TOP_K,
    )
    for name, values in first.items():
        np.testing.assert_allclose(second[name], values[rows], rtol=1e-9, atol=1e-12, err_msg=name)


@FAST
@given(means(), st.booleans())
def test_centroid_accuracy_matches_a_direct_loop(data, with_duplicates):
    pred, true, *_ = data
    if with_duplicates:  # exact ties: a duplicated true condition and a prediction on it
        true[1] = true[0]
        pred[0] = true[0]
    out = pm.centroid_accuracy(pred, true)
    n = len(true)
    for p in range(n):
        own = np.linalg.norm(pred[p] - true[p])
        farther = sum(
            np.linalg.norm(pred[p] - true[q]) > own * (1 + 1e-9) for q in range(n) if q != p
        )
        assert out[p] == farther / (n - 1)


@FAST
@given(means())
def test_pearson_and_overlap_match_simple_implementations(data):
    pred, true, control, _, _ = data
    for p, t in zip(pred, true, strict=True):
        assert np.isclose(pm.pearson_delta(p, t, control), pearsonr(p - control, t - control)[0])
        for k in TOP_K:
            top_true = set(np.argsort(-np.abs(t - control))[:k])
            top_pred = set(np.argsort(-np.abs(p - control))[:k])
            expected = len(top_true & top_pred) / min(k, len(t))
            assert pm.overlap_at_k(p, t, control, k) == expected
