"""A simulated single-cell drug screen with known ground truth.

The package's built-in dataset: negative-binomial counts whose drug effects are a fixed random
function of each drug's chemical structure, so that molecules held out of training are
predictable from structure alone, and every expected value is known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import logsumexp

from perturbx.chem import MorganFeaturizer, canonical_smiles_array
from perturbx.data._builtin_drugs import BUILTIN_DRUGS
from perturbx.data._target_world import target_class_world, unit_rms_columns

__all__ = [
    "builtin_drug_smiles",
    "simulate_drug_screen",
    "true_condition_means",
    "true_expected_counts",
    "true_log_fold_change",
]

CONTROL_LABEL = "control"
#: Key of the ground truth in ``adata.uns``.
TRUTH_KEY = "simulation"
# Spread (sd of natural-log abundance) of baseline gene expression across genes.
_GENE_ABUNDANCE_SD = 1.5
# Spread of per-gene NB inverse dispersions around ``nb_theta`` (sd of log theta).
_THETA_LOG_SD = 0.3
# Cells per block when sampling counts: bounds peak memory to a few hundred MB.
_ENTRIES_PER_BLOCK = 4_000_000


def builtin_drug_smiles() -> pd.DataFrame:
    """The built-in drug library used by :func:`simulate_drug_screen` by default.

    Returns
    -------
    DataFrame with columns ``name`` and ``smiles`` (58 well-known drugs of many classes).
    """
    return pd.DataFrame(BUILTIN_DRUGS, columns=["name", "smiles"])


def _drug_table(smiles: Mapping[str, str] | pd.DataFrame | None) -> tuple[list[str], list[str]]:
    """Names and SMILES from the ``smiles`` argument, in the order given."""
    if smiles is None:
        return [n for n, _ in BUILTIN_DRUGS], [s for _, s in BUILTIN_DRUGS]
    if isinstance(smiles, pd.DataFrame):
        columns = {str(c).lower(): c for c in smiles.columns}
        if "smiles" in columns:
            smiles_column = smiles[columns["smiles"]]
            names = smiles[columns["name"]] if "name" in columns else smiles.index.to_series()
        elif smiles.shape[1] >= 2 and list(smiles.columns[:2]) == [0, 1]:
            # A header-less table read with header=None: name, SMILES[, ...].
            names, smiles_column = smiles.iloc[:, 0], smiles.iloc[:, 1]
        else:
            raise ValueError(
                "smiles DataFrame needs a 'smiles' column (and a 'name' column or drug names as "
                f"the index), or integer columns (name, SMILES, ...); got {list(smiles.columns)}."
            )
        return [str(n) for n in names], list(smiles_column)
    if isinstance(smiles, Mapping):
        return [str(n) for n in smiles], list(smiles.values())
    raise ValueError(
        "smiles must be a mapping name -> SMILES, a DataFrame or None; "
        f"got {type(smiles).__name__}."
    )


def _check_arguments(
    n_cells: int,
    n_genes: int,
    n_drugs: int,
    doses: np.ndarray,
    n_cell_types: int,
    control_fraction: float,
    n_affected_genes: int,
    positive: Mapping[str, float],
    non_negative: Mapping[str, float],
) -> None:
    for arg, value, minimum in [
        ("n_cells", n_cells, 1),
        ("n_genes", n_genes, 1),
        ("n_drugs", n_drugs, 2),
        ("n_cell_types", n_cell_types, 1),
        ("n_affected_genes", n_affected_genes, 1),
    ]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            extra = " (effects are structure contrasts within the library)" if minimum == 2 else ""
            raise ValueError(f"{arg} must be an integer >= {minimum}{extra}, got {value!r}.")
    if n_affected_genes > n_genes:
        raise ValueError(f"n_affected_genes={n_affected_genes} exceeds n_genes={n_genes}.")
    if doses.ndim != 1 or doses.size == 0:
        raise ValueError(f"doses must be a non-empty sequence of numbers, got {doses!r}.")
    if not np.all(np.isfinite(doses)) or np.any(doses <= 0):
        raise ValueError(f"doses must be positive and finite (µM), got {doses.tolist()}.")
    if len(np.unique(doses)) != doses.size:
        raise ValueError(f"doses contains repeated values: {doses.tolist()}.")
    if not 0.0 <= control_fraction < 1.0:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction!r}.")
    for arg, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{arg} must be positive and finite, got {value!r}.")
    for arg, value in non_negative.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{arg} must be >= 0 and finite, got {value!r}.")


def _hill_fraction(dose: float, ec50: float, hill: float) -> float:
    """Fraction of the maximal effect at ``dose``: d^h / (d^h + EC50^h), computed stably."""
    if dose <= 0:
        return 0.0
    # d^h / (d^h + e^h) = 1 / (1 + (e/d)^h), without overflow for large h.
    exponent = hill * (math.log(ec50) - math.log(dose))
    return 0.0 if exponent > 700 else 1.0 / (1.0 + math.exp(exponent))


def _sample_counts(
    rng: np.random.Generator,
    condition_mean: np.ndarray,
    condition_codes: np.ndarray,
    size_factors: np.ndarray,
    theta: np.ndarray,
) -> sp.csr_matrix:
    """NB counts as a Gamma–Poisson mixture, sampled in row blocks straight into CSR arrays.

    ``condition_mean``: (n_conditions, n_genes) expected counts at size factor 1;
    ``condition_codes``/``size_factors``: (n_cells,); ``theta``: (n_genes,) inverse dispersion.
    """
    n_cells, n_genes = len(condition_codes), condition_mean.shape[1]
    rows_per_block = max(1, _ENTRIES_PER_BLOCK // n_genes)
    theta32 = theta.astype(np.float32)
    scale = (condition_mean / theta[None, :]).astype(np.float32)  # Gamma scale = mu / theta
    data, indices, row_nnz = [], [], []
    for start in range(0, n_cells, rows_per_block):
        stop = min(start + rows_per_block, n_cells)
        shape = (stop - start, n_genes)
        # Gamma(theta, mu/theta) has mean mu and variance mu^2/theta; Poisson on top gives NB.
        rate = rng.standard_gamma(np.broadcast_to(theta32, shape), dtype=np.float32)
        rate *= scale[condition_codes[start:stop]]
        rate *= size_factors[start:stop, None].astype(np.float32)
        counts = rng.poisson(rate)
        row_index, column_index = np.nonzero(counts)  # row-major: already in CSR order
        data.append(counts[row_index, column_index].astype(np.float32))
        indices.append(column_index.astype(np.int32))
        row_nnz.append(np.bincount(row_index, minlength=stop - start))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))]).astype(np.int64)
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), indptr), shape=(n_cells, n_genes)
    )


def simulate_drug_screen(
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    n_drugs: int = 20,
    doses: Sequence[float] = (0.1, 1.0, 10.0),
    n_cell_types: int = 2,
    control_fraction: float = 0.1,
    smiles: Mapping[str, str] | pd.DataFrame | None = None,
    n_affected_genes: int = 50,
    effect_size: float = 1.0,
    seed: int = 0,
    *,
    library_size: float = 2_000.0,
    library_size_sd: float = 0.3,
    nb_theta: float = 5.0,
    cell_type_specificity: float = 0.5,
    cell_type_baseline_sd: float = 0.5,
    shared_effect: float = 0.2,
    ec50_sd: float = 0.5,
    effect_rank: int = 10,
    structure_radius: int = 1,
    structure_n_bits: int = 2048,
    world: str = "linear",
    n_target_classes: int = 6,
    idiosyncratic_effect: float = 0.25,
) -> ad.AnnData:
    """Simulate a single-cell drug screen (NB counts) whose effects follow chemical structure.

    Two worlds map structure to effect, and each favours some methods:

    * ``world="linear"``: effects are a fixed *linear* map of the fingerprint (steps 2-3
      below). A ridge regression on fingerprints is the correctly specified model here, so
      no other method can beat it by much; use it to check that a model recovers a linear
      world, not to rank methods.
    * ``world="targets"``: as in pharmacology, drugs act through a few target classes
      (``n_target_classes`` shared gene programs, like a MEK-like or an HDAC-like
      signature). A drug's class and potency depend on *combinations* of substructures
      (each class has three rules, each the presence of two fingerprint bits together), so
      near neighbours can fall in different classes (activity cliffs) and the map is not
      linear in the fingerprint; drugs matching no rule are inactive. EC50s are a
      nonlinear (tanh) function of structure, cell-type multipliers belong to the class,
      and every drug adds an idiosyncratic program (``idiosyncratic_effect`` of its size)
      that no structure explains. Similarity-based and nonlinear methods have something to
      gain here, and the linear ridge is misspecified.

    Generative model (all logarithms natural unless stated; ``rng`` seeded by ``seed``):

    1. **Baseline.** Gene log-abundances ``a_g ~ N(0, 1.5²)``; each cell type ``c`` shifts them
       by ``N(0, cell_type_baseline_sd²)`` and they are normalised to log-proportions
       ``eta[c, g]`` (``sum_g exp(eta[c, g]) = 1``).
    2. **Structure.** Each drug's Morgan count fingerprint (``structure_radius``,
       ``structure_n_bits``) is log1p-transformed and centred over the drug library: ``f_d``.
       Fixed random Gaussian projections of ``f_d`` (each scaled to unit RMS over the library)
       give a latent ``z_d`` (``effect_rank`` dims) and scalars ``s_ec50``, ``s_hill``,
       ``s_ct[c]``. Every property of a drug is therefore a function of its structure.
    3. **Gene effects.** Dense effects ``D_d = z_d @ B + shared_effect · u`` with
       ``B ~ N(0, 1/effect_rank)`` and a shared gene vector ``u ~ N(0, 1)`` (the only part
       common to all drugs; ``z`` is centred, so the library-mean effect is exactly
       ``shared_effect · u``). The ``n_affected_genes`` genes with the largest ``|D_d|`` are the
       drug's affected genes; the others get 0. Values are scaled so that the mean ``|lfc_max|``
       over affected genes equals ``effect_size``.
    4. **Dose response.** ``EC50_d = 10^(mean(log10 doses) + ec50_sd · s_ec50)`` µM,
       Hill coefficient ``h_d = 1.5 · exp(0.25 · s_hill)``;
       ``lfc(d, dose, c) = m[d, c] · lfc_max_d · dose^h / (dose^h + EC50^h)``.
    5. **Cell-type specificity.** ``log m[d, c] = cell_type_specificity · (s_ct[c] - mean_c)``,
       so the multipliers of one drug have geometric mean 1 over cell types.
    6. **Counts.** Size factors ``l_i = library_size · exp(N(0, sd²) - sd²/2)`` (mean
       ``library_size``); ``mu[i, g] = l_i · exp(eta[c_i, g] + lfc[i, g])``;
       ``x[i, g] ~ NB(mean mu, inverse dispersion theta_g)`` sampled as Poisson(Gamma), with
       ``theta_g = nb_theta · exp(N(0, 0.3²))``.

    Cells are split evenly over cell types and over (drug, dose) pairs; ``control_fraction`` of
    them are untreated controls.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix.
    n_drugs
        Number of drugs: the first ``n_drugs`` entries of ``smiles`` (at least 2).
    doses
        Doses in µM given to every drug.
    n_cell_types
        Number of cell types (``"cell_type_0"``, ...), each with its own baseline.
    control_fraction
        Fraction of cells that are controls (``drug == "control"``, ``dose == 0``).
    smiles
        The drug library: a mapping name -> SMILES, or a DataFrame with ``name``/``smiles``
        columns (or header-less: name, SMILES, ...). Default: :func:`builtin_drug_smiles`.
        Entries named ``"control"`` (a vehicle such as DMSO) are skipped.
    n_affected_genes
        Genes affected by each drug.
    effect_size
        Mean absolute maximal log-fold change (natural log) over affected genes.
    seed
        Seed of all randomness: equal seeds give identical data. Ground-truth parameters use
        their own random streams, so they do not change with ``n_cells``.
    library_size, library_size_sd
        Mean total counts per cell and the sd of its log across cells.
    nb_theta
        Typical NB inverse dispersion (variance = mu + mu²/theta).
    cell_type_specificity
        Sd of the log cell-type multipliers of drug effects (0: same effect in all cell types).
    cell_type_baseline_sd
        Sd of the cell-type shifts of baseline log-expression.
    shared_effect
        Size of the effect component shared by all drugs, relative to the drug-specific one.
    ec50_sd
        Spread of log10 EC50 across drugs.
    effect_rank
        Dimension of the structure-to-effect map.
    structure_radius, structure_n_bits
        Morgan fingerprint that drives the effects.
    world
        ``"linear"`` or ``"targets"`` (see above).
    n_target_classes
        Number of target classes (``world="targets"``).
    idiosyncratic_effect
        Size of each drug's structure-independent program relative to its class effect
        (``world="targets"``; inactive drugs have only this).

    Returns
    -------
    AnnData with ``X``: ``(n_cells, n_genes)`` CSR float32 integer counts; ``var_names``
    ``gene_0000, ...``; ``obs`` columns ``drug``, ``dose`` (float µM), ``smiles`` (canonical,
    ``""`` for controls), ``cell_type``, ``condition`` (``"{drug}_{dose:g}_{cell_type}"``);
    ground truth in ``uns["simulation"]`` (see :func:`true_log_fold_change`).

    Raises
    ------
    ValueError
        Bad arguments, or ``n_drugs`` larger than the library.
    perturbx.chem.InvalidSmilesError
        A SMILES in the library cannot be parsed.
    """
    doses_array = np.asarray(doses, dtype=np.float64)
    _check_arguments(
        n_cells,
        n_genes,
        n_drugs,
        doses_array,
        n_cell_types,
        control_fraction,
        n_affected_genes,
        positive={"library_size": library_size, "nb_theta": nb_theta},
        non_negative={
            "effect_size": effect_size,
            "library_size_sd": library_size_sd,
            "cell_type_specificity": cell_type_specificity,
            "cell_type_baseline_sd": cell_type_baseline_sd,
            "shared_effect": shared_effect,
            "ec50_sd": ec50_sd,
        },
    )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if isinstance(effect_rank, bool) or not isinstance(effect_rank, int) or effect_rank < 1:
        raise ValueError(f"effect_rank must be an integer >= 1, got {effect_rank!r}.")
    if world not in ("linear", "targets"):
        raise ValueError(f"world={world!r} must be 'linear' or 'targets'.")
    if (
        isinstance(n_target_classes, bool)
        or not isinstance(n_target_classes, int)
        or (n_target_classes < 1)
    ):
        raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes!r}.")
    if not idiosyncratic_effect >= 0:
        raise ValueError(f"idiosyncratic_effect={idiosyncratic_effect!r} must be >= 0.")
    all_names, all_smiles = _drug_table(smiles)
    # Entries named like the control (e.g. the DMSO vehicle row of sci-Plex) are not drugs.
    library = [(n, s) for n, s in zip(all_names, all_smiles, strict=True) if n != CONTROL_LABEL]
    if n_drugs > len(library):
        raise ValueError(
            f"n_drugs={n_drugs} but the drug library has only {len(library)} drugs "
            f"(entries named {CONTROL_LABEL!r} excluded); pass a larger `smiles` table or "
            "lower n_drugs."
        )
    names = [n for n, _ in library[:n_drugs]]
    raw_smiles = [s for _, s in library[:n_drugs]]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"Drug names must be unique; repeated: {duplicated}.")
    canonical = canonical_smiles_array(raw_smiles, names).tolist()

    # Independent streams, so the truth does not depend on n_cells and vice versa.
    gene_rng, structure_rng, design_rng, count_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )

    # 1. Baseline log-proportions per cell type.
    abundance = gene_rng.normal(0.0, _GENE_ABUNDANCE_SD, size=n_genes)
    shifts = gene_rng.normal(0.0, cell_type_baseline_sd, size=(n_cell_types, n_genes))
    eta = abundance[None, :] + shifts
    eta -= logsumexp(eta, axis=1, keepdims=True)
    theta = nb_theta * np.exp(gene_rng.normal(0.0, _THETA_LOG_SD, size=n_genes))

    # 2. Structure-driven latent variables.
    featurize = MorganFeaturizer(radius=structure_radius, n_bits=structure_n_bits, counts=True)
    fingerprints = np.log1p(featurize(canonical).astype(np.float64))
    centred = fingerprints - fingerprints.mean(axis=0)
    n_scalars = 2 + n_cell_types  # EC50, Hill, one per cell type
    projection = structure_rng.normal(size=(structure_n_bits, effect_rank + n_scalars))
    latent = unit_rms_columns(centred @ projection)
    z, s_ec50, s_hill = latent[:, :effect_rank], latent[:, effect_rank], latent[:, effect_rank + 1]
    s_cell_type = latent[:, effect_rank + 2 :]

    drug_class = np.full(n_drugs, -1)
    if world == "linear":
        # 3. Gene effects: dense structure map, then keep each drug's largest entries.
        loadings = structure_rng.normal(
            0.0, 1.0 / math.sqrt(effect_rank), size=(effect_rank, n_genes)
        )
        shared = structure_rng.normal(size=n_genes)
        dense = z @ loadings + shared_effect * shared[None, :]
        affected = np.sort(
            np.argpartition(-np.abs(dense), n_affected_genes - 1, axis=1)[:, :n_affected_genes],
            1,
        )
        rows = np.arange(n_drugs)[:, None]
        lfc_max = np.zeros_like(dense)
        lfc_max[rows, affected] = dense[rows, affected]
        mean_abs = np.abs(dense[rows, affected]).mean()
        lfc_max *= effect_size / mean_abs if mean_abs > 0 else 0.0
        shared_lfc = shared_effect * shared * (effect_size / mean_abs if mean_abs > 0 else 0.0)

        # 4.-5. Dose response and cell-type multipliers.
        ec50 = 10.0 ** (np.log10(doses_array).mean() + ec50_sd * s_ec50)
        hill = 1.5 * np.exp(0.25 * s_hill)
        multiplier = np.exp(
            cell_type_specificity * (s_cell_type - s_cell_type.mean(axis=1, keepdims=True))
        )
    else:
        world_truth = target_class_world(
            featurize(canonical) > 0,
            centred,
            n_genes,
            n_target_classes,
            n_affected_genes,
            n_cell_types,
            effect_size,
            shared_effect,
            idiosyncratic_effect,
            cell_type_specificity,
            structure_rng,
        )
        lfc_max, shared_lfc, drug_class = (
            world_truth["lfc_max"],
            world_truth["shared_lfc"],
            world_truth["drug_class"],
        )
        affected = np.sort(
            np.argpartition(-np.abs(lfc_max), n_affected_genes - 1, axis=1)[:, :n_affected_genes],
            1,
        )
        ec50 = 10.0 ** (np.log10(doses_array).mean() + 2.0 * ec50_sd * world_truth["s_ec50"])
        hill = 1.5 * np.exp(0.25 * s_hill)
        multiplier = world_truth["multiplier"]

    truth: dict[str, Any] = {
        "params": {
            "n_cells": n_cells,
            "n_genes": n_genes,
            "n_drugs": n_drugs,
            "doses": doses_array,
            "n_cell_types": n_cell_types,
            "control_fraction": float(control_fraction),
            "n_affected_genes": n_affected_genes,
            "effect_size": float(effect_size),
            "seed": int(seed),
            "library_size": float(library_size),
            "library_size_sd": float(library_size_sd),
            "nb_theta": float(nb_theta),
            "cell_type_specificity": float(cell_type_specificity),
            "cell_type_baseline_sd": float(cell_type_baseline_sd),
            "shared_effect": float(shared_effect),
            "ec50_sd": float(ec50_sd),
            "effect_rank": effect_rank,
            "structure_radius": structure_radius,
            "structure_n_bits": structure_n_bits,
            "world": world,
            "n_target_classes": n_target_classes,
            "idiosyncratic_effect": float(idiosyncratic_effect),
            "control_label": CONTROL_LABEL,
        },
        "drug_class": drug_class.astype(np.int64),
        "drug_names": np.asarray(names, dtype=str),
        "drug_smiles": np.asarray(canonical, dtype=str),
        "affected_genes": affected.astype(np.int64),
        "lfc_max": lfc_max,
        "ec50_um": ec50,
        "hill": hill,
        "cell_type_names": np.asarray([f"cell_type_{c}" for c in range(n_cell_types)], dtype=str),
        "cell_type_multiplier": multiplier,
        "baseline_log_mean": math.log(library_size) + eta,
        "shared_lfc": shared_lfc,
        "nb_theta": theta,
    }

    # Design: balanced cell types and (drug, dose) pairs; code -1 marks controls.
    n_doses = doses_array.size
    n_control = int(round(control_fraction * n_cells))
    pair = np.concatenate(
        [np.full(n_control, -1), np.resize(np.arange(n_drugs * n_doses), n_cells - n_control)]
    )
    pair = design_rng.permutation(pair)
    cell_type = design_rng.permutation(np.resize(np.arange(n_cell_types), n_cells))
    drug_code = np.where(pair < 0, -1, pair // n_doses)
    dose = np.where(pair < 0, 0.0, doses_array[pair % n_doses])

    # Condition table: (pair + 1) x cell type, so controls are pair 0.
    condition_mean = np.empty(((n_drugs * n_doses + 1) * n_cell_types, n_genes))
    for p in range(n_drugs * n_doses + 1):
        for c in range(n_cell_types):
            lfc = np.zeros(n_genes)
            if p > 0:
                d, k = divmod(p - 1, n_doses)
                lfc = _lfc(truth, d, float(doses_array[k]), c)
            condition_mean[p * n_cell_types + c] = np.exp(eta[c] + lfc)
    condition_codes = (pair + 1) * n_cell_types + cell_type
    size_factors = library_size * np.exp(
        design_rng.normal(0.0, library_size_sd, size=n_cells) - library_size_sd**2 / 2
    )
    counts = _sample_counts(count_rng, condition_mean, condition_codes, size_factors, theta)

    obs = _build_obs(names, canonical, drug_code, dose, cell_type, n_cell_types)
    var = pd.DataFrame(index=pd.Index([f"gene_{g:04d}" for g in range(n_genes)]))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.uns[TRUTH_KEY] = truth
    return adata


def _build_obs(names, canonical, drug_code, dose, cell_type, n_cell_types) -> pd.DataFrame:
    drug_labels = np.asarray([CONTROL_LABEL, *names], dtype=object)[drug_code + 1]
    smiles_labels = np.asarray(["", *canonical], dtype=object)[drug_code + 1]
    cell_type_names = [f"cell_type_{c}" for c in range(n_cell_types)]
    cell_type_labels = np.asarray(cell_type_names, dtype=object)[cell_type]
    dose_text = pd.Series(dose).map(lambda v: f"{v:g}").to_numpy(dtype=object)
    condition = drug_labels + "_" + dose_text + "_" + cell_type_labels
    obs = pd.DataFrame(
        {
            "drug": pd.Categorical(drug_labels, categories=[CONTROL_LABEL, *names]),
            "dose": dose.astype(np.float64),
            "smiles": pd.Categorical(smiles_labels),
            "cell_type": pd.Categorical(cell_type_labels, categories=cell_type_names),
            "condition": pd.Categorical(condition),
        },
        index=pd.Index([f"cell_{i:06d}" for i in range(len(dose))]),
    )
    obs["condition"] = obs["condition"].cat.remove_unused_categories()
    return obs


def _truth_of(adata_or_truth: ad.AnnData | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(adata_or_truth, ad.AnnData):
        if TRUTH_KEY not in adata_or_truth.uns:
            raise KeyError(
                f"adata.uns has no {TRUTH_KEY!r} entry: was it made by simulate_drug_screen?"
            )
        return adata_or_truth.uns[TRUTH_KEY]
    if isinstance(adata_or_truth, Mapping) and "lfc_max" in adata_or_truth:
        return adata_or_truth
    raise ValueError("Expected an AnnData from simulate_drug_screen or its uns['simulation'].")


def _index_of(values: Any, label: str, what: str) -> int:
    labels = [str(v) for v in np.asarray(values).tolist()]
    if label not in labels:
        raise KeyError(f"Unknown {what} {label!r}; known: {labels}.")
    return labels.index(label)


def _lfc(truth: Mapping[str, Any], drug: int, dose: float, cell_type: int) -> np.ndarray:
    """Lfc of drug index ``drug`` at ``dose`` µM in cell-type index ``cell_type``: (n_genes,)."""
    ec50 = float(np.asarray(truth["ec50_um"])[drug])
    hill = float(np.asarray(truth["hill"])[drug])
    multiplier = float(np.asarray(truth["cell_type_multiplier"])[drug, cell_type])
    return np.asarray(truth["lfc_max"])[drug] * (multiplier * _hill_fraction(dose, ec50, hill))


def true_log_fold_change(
    adata_or_truth: ad.AnnData | Mapping[str, Any], drug: str, dose: float, cell_type: str
) -> np.ndarray:
    """True natural-log fold change of expected counts, treated vs control, in one cell type.

    Parameters
    ----------
    adata_or_truth
        The output of :func:`simulate_drug_screen` (or its ``uns["simulation"]``).
    drug
        Drug name; the control label gives zeros.
    dose
        Dose in µM (0 gives zeros).
    cell_type
        Cell-type label, e.g. ``"cell_type_0"``.

    Returns
    -------
    ``(n_genes,)`` float64 array: ``log E[x | drug, dose] - log E[x | control]``.
    """
    truth = _truth_of(adata_or_truth)
    c = _index_of(truth["cell_type_names"], cell_type, "cell_type")
    n_genes = np.asarray(truth["lfc_max"]).shape[1]
    if drug == CONTROL_LABEL:
        return np.zeros(n_genes)
    if not (math.isfinite(dose) and dose >= 0):
        raise ValueError(f"dose must be >= 0 and finite (µM), got {dose!r}.")
    d = _index_of(truth["drug_names"], drug, "drug")
    return _lfc(truth, d, float(dose), c)


def true_expected_counts(
    adata_or_truth: ad.AnnData | Mapping[str, Any], drug: str, dose: float, cell_type: str
) -> np.ndarray:
    """Expected counts per cell (mean over cells' library sizes) of one condition.

    Returns
    -------
    ``(n_genes,)`` float64 array: ``library_size · exp(eta[cell_type] + lfc)``.
    """
    truth = _truth_of(adata_or_truth)
    c = _index_of(truth["cell_type_names"], cell_type, "cell_type")
    baseline = np.asarray(truth["baseline_log_mean"])[c]
    return np.exp(baseline + true_log_fold_change(truth, drug, dose, cell_type))


def true_condition_means(
    adata: ad.AnnData, *, normalize_to: float | None = None, groupby: str = "condition"
) -> pd.DataFrame:
    """Expected expression of every condition present in a simulated AnnData.

    Parameters
    ----------
    adata
        Output of :func:`simulate_drug_screen` (possibly subset to some cells).
    normalize_to
        If given, each row is rescaled to sum to this value: the expected profile after
        ``scanpy.pp.normalize_total(target_sum=normalize_to)`` (to first order; it is the
        ratio of expectations, not the expectation of the ratio). Default: expected counts.
    groupby
        The obs column naming conditions; each group must have one drug, dose and cell type.

    Returns
    -------
    DataFrame ``(n_conditions, n_genes)``, index: condition labels, columns: ``var_names``.
    """
    truth = _truth_of(adata)
    for column in (groupby, "drug", "dose", "cell_type"):
        if column not in adata.obs.columns:
            raise KeyError(f"adata.obs has no column {column!r}.")
    keys = adata.obs[[groupby, "drug", "dose", "cell_type"]].astype(
        {groupby: object, "drug": object, "cell_type": object}
    )
    table = keys.drop_duplicates()
    if table[groupby].duplicated().any():
        bad = table.loc[table[groupby].duplicated(keep=False), groupby].iloc[0]
        raise ValueError(f"obs[{groupby!r}] group {bad!r} mixes several drug/dose/cell_type.")
    means = np.stack(
        [
            true_expected_counts(truth, row.drug, float(row.dose), row.cell_type)
            for row in table.itertuples(index=False)
        ]
    )
    if normalize_to is not None:
        means = means / means.sum(axis=1, keepdims=True) * normalize_to
    return pd.DataFrame(
        means, index=pd.Index(table[groupby], name=groupby), columns=adata.var_names
    )
