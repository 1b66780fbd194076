"""Working with *your* data: the simulator, out-of-distribution splits and registration helpers.

``perturbx.data`` turns an AnnData into a benchmark (``split_unseen_perturbations`` and its
siblings write a ``split`` column), simulates screens with a known answer
(``simulate_drug_screen``, ``true_log_fold_change``) and holds the registration fields that
``PerturbX.setup_anndata`` uses. Downloading *public* data sets is :mod:`perturbx.datasets`.
"""

from perturbx.conditions import format_condition, parse_condition
from perturbx.data._writing import write_counts_h5ad
from perturbx.data.simulate import (
    builtin_drug_smiles,
    simulate_drug_screen,
    true_condition_means,
    true_expected_counts,
    true_log_fold_change,
)
from perturbx.data.splits import (
    SPLIT_VALUES,
    split_unseen_cell_types,
    split_unseen_combinations,
    split_unseen_doses,
    split_unseen_perturbations,
)

__all__ = [
    "SPLIT_VALUES",
    "split_unseen_cell_types",
    "split_unseen_combinations",
    "split_unseen_doses",
    "split_unseen_perturbations",
    "builtin_drug_smiles",
    "format_condition",
    "parse_condition",
    "simulate_drug_screen",
    "true_condition_means",
    "true_expected_counts",
    "true_log_fold_change",
    "write_counts_h5ad",
]
