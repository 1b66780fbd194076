"""The linear and additive baselines against hand-computed predictions."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbx.baselines import additive_baseline, linear_baseline


def _cells(rows: dict[str, np.ndarray], cell_type: str = "k562", n: int = 3) -> ad.AnnData:
    """``n`` cells per condition with exactly the given (log-normalised) expression."""
    names = [name for name in rows for _ in range(n)]
    x = np.vstack([rows[name] for name in names])
    obs = pd.DataFrame(
        {
            "perturbation": names,
            "dose": [
                "0" if name == "control" else "+".join(["1"] * len(name.split("+")))
                for name in names
            ],
            "cell_type": cell_type,
        },
        index=[f"{cell_type}_{i}" for i in range(len(names))],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))


def test_additive_baseline_adds_the_single_deltas():
    control = np.array([1.0, 2.0, 0.5])
    a, b = np.array([1.5, 2.0, 0.0]), np.array([1.0, 3.0, 0.7])
    train = _cells({"control": control, "A": a, "B": b})
    targets = pd.DataFrame({"perturbation": ["B+A"], "dose": ["1+1"], "cell_type": ["k562"]})
    pred = additive_baseline(
        train,
        targets,
        perturbation_key="perturbation",
        dose_key="dose",
        covariate_keys=["cell_type"],
        counts=False,
    )
    np.testing.assert_allclose(pred.X[0], control + (a - control) + (b - control))
    assert pred.obs["perturbation"].tolist() == ["A+B"]
    assert pred.obs["method"].tolist() == ["additive"]


def test_additive_baseline_names_a_member_not_measured_alone():
    train = _cells({"control": np.zeros(3), "A": np.ones(3)})
    targets = pd.DataFrame({"perturbation": ["A+C"], "dose": ["1+1"], "cell_type": ["k562"]})
    with pytest.raises(ValueError, match="'C'.*not measured"):
        additive_baseline(
            train,
            targets,
            perturbation_key="perturbation",
            dose_key="dose",
            covariate_keys=["cell_type"],
            counts=False,
        )


def test_linear_baseline_recovers_a_linear_world():
    # delta = f @ W exactly; an unseen drug with features [2, 1] has delta 2 w0 + w1.
    w = np.array([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4]])
    control = np.array([1.0, 2.0, 0.5])
    features = {
        "d1": np.array([1.0, 0.0]),
        "d2": np.array([0.0, 1.0]),
        "d3": np.array([1.0, 1.0]),
        "new": np.array([2.0, 1.0]),
    }
    rows = {"control": control}
    rows.update({d: control + features[d] @ w for d in ("d1", "d2", "d3")})
    train = _cells(rows)
    targets = pd.DataFrame({"perturbation": ["new"], "cell_type": ["k562"]})
    pred = linear_baseline(
        train,
        targets,
        features,
        perturbation_key="perturbation",
        covariate_keys=["cell_type"],
        counts=False,
        alphas=[1e-8],
    )
    np.testing.assert_allclose(pred.X[0], control + features["new"] @ w, atol=1e-5)


def test_linear_baseline_uses_each_cell_types_controls():
    features = {"d1": np.array([1.0]), "d2": np.array([2.0]), "new": np.array([3.0])}
    parts = []
    for cell_type, offset in (("a", 0.0), ("b", 10.0)):
        control = np.full(3, offset)
        parts.append(
            _cells({"control": control, "d1": control + 1, "d2": control + 2}, cell_type=cell_type)
        )
    train = ad.concat(parts)
    targets = pd.DataFrame({"perturbation": ["new", "new"], "cell_type": ["a", "b"]})
    pred = linear_baseline(
        train,
        targets,
        features,
        perturbation_key="perturbation",
        covariate_keys=["cell_type"],
        counts=False,
        alphas=[1e-8],
    )
    np.testing.assert_allclose(pred.X, [[3.0] * 3, [13.0] * 3], atol=1e-5)


def test_linear_baseline_requires_features_for_every_target():
    train = _cells({"control": np.zeros(3), "d1": np.ones(3), "d2": np.ones(3)})
    targets = pd.DataFrame({"perturbation": ["nosmiles"], "cell_type": ["k562"]})
    with pytest.raises(ValueError, match="nosmiles"):
        linear_baseline(
            train,
            targets,
            {"d1": np.ones(2), "d2": np.zeros(2)},
            perturbation_key="perturbation",
            covariate_keys=["cell_type"],
            counts=False,
        )


# ----------------------------------------------------------------- kernel ridge baseline
def _kernel_world():
    """Three training drugs with disjoint fingerprints, their deltas hand-set."""
    control = np.array([1.0, 2.0, 0.5])
    deltas = {
        "d1": np.array([1.0, 0.0, 0.0]),
        "d2": np.array([0.0, -1.0, 0.0]),
        "d3": np.array([0.0, 0.0, 2.0]),
    }
    features = {
        "d1": np.array([3.0, 0, 0, 0, 0]),
        "d2": np.array([0, 2.0, 0, 0, 0]),
        "d3": np.array([0, 0, 1.0, 0, 0]),
        "twin_of_d1": np.array([3.0, 0, 0, 0, 0]),  # same fingerprint as d1
        "stranger": np.array([0, 0, 0, 4.0, 1.0]),
    }  # shares no feature
    rows = {"control": control, **{d: control + v for d, v in deltas.items()}}
    return control, deltas, features, _cells(rows)


def test_kernel_ridge_interpolates_known_molecules_and_falls_back_to_the_centroid():
    from perturbx.baselines import kernel_ridge_baseline

    control, deltas, features, train = _kernel_world()
    targets = pd.DataFrame(
        {"perturbation": ["twin_of_d1", "stranger"], "cell_type": ["k562", "k562"]}
    )
    pred = kernel_ridge_baseline(
        train,
        targets,
        features,
        perturbation_key="perturbation",
        covariate_keys=["cell_type"],
        counts=False,
        alphas=[1e-9],
    )
    # a molecule identical to a training molecule gets its delta (nearly unpenalised)
    np.testing.assert_allclose(pred.X[0], control + deltas["d1"], atol=1e-6)
    # one similar to none gets the mean training delta: the perturbed centroid
    np.testing.assert_allclose(
        pred.X[1], control + np.mean(list(deltas.values()), axis=0), atol=1e-9
    )
    assert pred.obs["method"].tolist() == ["kernel ridge"] * 2


def test_kernel_ridge_shrinks_towards_the_centroid_as_the_penalty_grows():
    from perturbx.baselines import kernel_ridge_baseline

    control, deltas, features, train = _kernel_world()
    targets = pd.DataFrame({"perturbation": ["twin_of_d1"], "cell_type": ["k562"]})
    centroid = control + np.mean(list(deltas.values()), axis=0)
    gaps = []
    for alpha in (1e-3, 1.0, 1e3):
        pred = kernel_ridge_baseline(
            train,
            targets,
            features,
            perturbation_key="perturbation",
            covariate_keys=["cell_type"],
            counts=False,
            alphas=[alpha],
        )
        gaps.append(np.abs(pred.X[0] - centroid).sum())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


def test_minmax_similarity_is_tanimoto_on_bits_and_min_over_max_on_counts():
    from perturbx.chem import minmax_similarity

    bits = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=float)
    np.testing.assert_allclose(minmax_similarity(bits, bits)[0, 1], 1 / 3)
    assert minmax_similarity(bits, bits)[2, 2] == 0.0  # two empty fingerprints
    counts = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0]])
    np.testing.assert_allclose(minmax_similarity(counts, counts)[0, 1], (1 + 1) / (2 + 3 + 1))
    with pytest.raises(ValueError, match="non-negative"):
        minmax_similarity(-counts, counts)


def test_transferred_response_adds_the_other_groups_mean_response():
    from perturbx.baselines import transferred_response_baseline

    parts, deltas = [], {"p1": np.array([1.0, 0.0, -1.0]), "p2": np.array([3.0, 2.0, 1.0])}
    for patient, offset in (("p1", 0.0), ("p2", 5.0), ("p3", 10.0)):
        control = np.array([1.0, 2.0, 3.0]) + offset
        rows = {"control": control}
        if patient in deltas:
            rows["drug"] = control + deltas[patient]
        parts.append(_cells(rows, cell_type=patient))
    train = ad.concat(parts)
    targets = pd.DataFrame({"perturbation": ["drug"], "dose": ["1"], "cell_type": ["p3"]})
    pred = transferred_response_baseline(
        train,
        targets,
        perturbation_key="perturbation",
        dose_key="dose",
        covariate_keys=["cell_type"],
        transfer_key="cell_type",
        counts=False,
    )
    np.testing.assert_allclose(pred.X[0], np.array([11.0, 12.0, 13.0]) + [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="transfer_key='patient'"):
        transferred_response_baseline(
            train,
            targets,
            perturbation_key="perturbation",
            covariate_keys=["cell_type"],
            transfer_key="patient",
        )
    lonely = pd.DataFrame({"perturbation": ["other"], "dose": ["1"], "cell_type": ["p3"]})
    with pytest.raises(ValueError, match="No other 'cell_type' group"):
        transferred_response_baseline(
            train,
            lonely,
            perturbation_key="perturbation",
            dose_key="dose",
            covariate_keys=["cell_type"],
            transfer_key="cell_type",
            counts=False,
        )
