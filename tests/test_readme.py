"""Run the README's code blocks, with few cells and epochs, so a documented example cannot break.

Each ``python`` block of ``README.md`` is executed in order in one namespace (later blocks
use earlier ones' variables, as a reader's notebook would), after the size substitutions in
:data:`FAST`. A block starting with a ``# train.py`` comment is a script for several GPUs and
is only compiled. Every substitution must match: a changed README fails here until this list
follows it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# (block number, text in the README, what the test runs instead)
FAST = [
    (1, "n_cells=20_000, n_genes=2_000", "n_cells=2_000, n_genes=200"),
    (1, "model.train(max_epochs=100,", "model.train(max_epochs=1,"),
    (1, "n_models=5", "n_models=2"),
    (1, "ensemble.train(max_epochs=100,", "ensemble.train(max_epochs=1,"),
    (3, "num_samples=20", "num_samples=2"),
    (3, "max_epochs=20, resources_per_trial", "max_epochs=1, resources_per_trial"),
    (3, "max_epochs=20)", "max_epochs=1)"),
]
COMPILE_ONLY = "# train.py"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_code_blocks_run(tmp_path):
    matplotlib.use("Agg")
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for number, old, new in FAST:
        assert old in blocks[number - 1], f"README block {number} no longer has {old!r}"
        blocks[number - 1] = blocks[number - 1].replace(old, new)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # files a block writes stay out of the checkout
    try:
        for number, block in enumerate(blocks, start=1):
            code = compile(block, f"README.md python block {number}", "exec")
            if block.startswith(COMPILE_ONLY):
                continue
            if "from ray import tune" in block:
                pytest.importorskip("ray.tune")
            exec(code, namespace)
            if number == 1:  # the quick start made what it says
                pred = namespace["pred"]
                assert set(pred.obs["drug"]) == {"Imatinib", "Imatinib+Vorinostat",
                                                 "my_new_molecule"}
                methods = set(namespace["result"].summary["method"])
                assert {"PerturbX", "perturbed_centroid"} <= methods
    finally:
        os.chdir(cwd)
