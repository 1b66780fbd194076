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
