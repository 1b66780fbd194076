"""Structure-to-effect maps of the simulator: the target-class world and shared helpers."""

from __future__ import annotations

import numpy as np


def unit_rms_columns(values: np.ndarray) -> np.ndarray:
    """Scale each column to unit root-mean-square over rows (all-zero columns stay zero)."""
    rms = np.sqrt(np.mean(values**2, axis=0))
    return values / np.where(rms > 0, rms, 1.0)


def target_class_world(
    bits: np.ndarray,
    centred: np.ndarray,
    n_genes: int,
    n_classes: int,
    n_affected_genes: int,
    n_cell_types: int,
    effect_size: float,
    shared_effect: float,
    idiosyncratic_effect: float,
    cell_type_specificity: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Effects of ``world="targets"`` (see :func:`simulate_drug_screen`).

    ``bits``: ``(n_drugs, F)`` bool substructure presence; ``centred``: the centred log1p
    count fingerprints. Each class has three rules, each a pair of bits whose joint presence
    (AND) is seen in 5-40% of the library (if no pair qualifies, the most frequent pairs), a
    weight per rule and a signed program on ``n_affected_genes`` genes. A drug's class is the
    one whose matched rules weigh most (none: inactive), its potency that weight.
    """
    n_drugs = bits.shape[0]
    frequency = bits.mean(axis=0)
    candidates = np.flatnonzero((frequency >= 0.1) & (frequency <= 0.8))
    if len(candidates) < 2:
        candidates = np.argsort(-frequency)[: max(2, min(20, bits.shape[1]))]
    sub = bits[:, candidates].astype(np.float64)
    joint = (sub.T @ sub) / n_drugs  # joint presence of each pair of candidate bits
    i, j = np.triu_indices(len(candidates), k=1)
    pair_frequency = joint[i, j]
    usable = np.flatnonzero((pair_frequency >= 0.05) & (pair_frequency <= 0.4))
    if len(usable) < 3 * n_classes:
        usable = np.argsort(-pair_frequency)[: max(3 * n_classes, 1)]
    chosen = rng.choice(usable, size=(n_classes, 3), replace=len(usable) < 3 * n_classes)
    weights = rng.uniform(0.5, 1.5, size=(n_classes, 3))
    score = np.zeros((n_drugs, n_classes))
    for t in range(n_classes):
        for r in range(3):
            a, b = candidates[i[chosen[t, r]]], candidates[j[chosen[t, r]]]
            score[:, t] += weights[t, r] * (bits[:, a] & bits[:, b])
    drug_class = np.where(score.max(axis=1) > 0, score.argmax(axis=1), -1)
    potency = np.where(drug_class >= 0, score.max(axis=1), 0.0)
    active = drug_class >= 0
    if active.any():  # mean potency 1 over active drugs, at most 2
        potency = np.minimum(potency / potency[active].mean(), 2.0)

    def sparse_programs(n: int) -> np.ndarray:
        programs = np.zeros((n, n_genes))
        for row in programs:
            genes = rng.choice(n_genes, size=n_affected_genes, replace=False)
            values = rng.normal(size=n_affected_genes)
            row[genes] = values / np.abs(values).mean()
        return programs

    class_programs = sparse_programs(n_classes)
    idiosyncratic = sparse_programs(n_drugs)
    shared = rng.normal(size=n_genes)
    lfc_max = np.zeros((n_drugs, n_genes))
    lfc_max[active] = potency[active, None] * class_programs[drug_class[active]]
    lfc_max += idiosyncratic_effect * idiosyncratic
    lfc_max = effect_size * lfc_max
    shared_lfc = effect_size * shared_effect * shared
    lfc_max[active] += shared_lfc  # the response common to every active drug
    class_log_multiplier = rng.normal(size=(n_classes, n_cell_types))
    class_log_multiplier -= class_log_multiplier.mean(axis=1, keepdims=True)
    multiplier = np.ones((n_drugs, n_cell_types))
    multiplier[active] = np.exp(cell_type_specificity * class_log_multiplier[drug_class[active]])
    projection = rng.normal(size=(centred.shape[1],))
    s_ec50 = np.tanh(unit_rms_columns((centred @ projection)[:, None])[:, 0])
    return {
        "lfc_max": lfc_max,
        "shared_lfc": shared_lfc,
        "drug_class": drug_class,
        "multiplier": multiplier,
        "s_ec50": s_ec50,
    }
