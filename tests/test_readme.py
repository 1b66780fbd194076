"""Run the code blocks of the README and the docs, with few cells and epochs.

Each ``python`` block of ``README.md``, then of the ``docs/`` pages (in name order), is
executed in order in one namespace (later blocks use earlier ones' variables, as a reader's
notebook would), after the size substitutions in :data:`FAST`. A block starting with a
``# train.py`` comment is a script for several GPUs and is only compiled. Every
substitution must match: a changed example fails here until this list follows it, so a
documented example can never break silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
QUICK_START = ("README.md", 1)

# ((page, block number on that page), text in the block, what the test runs instead)
FAST = [
    (QUICK_START, "n_cells=20_000, n_genes=2_000", "n_cells=2_000, n_genes=200"),
    (QUICK_START, "model.train(max_epochs=100,", "model.train(max_epochs=1,"),
    (QUICK_START, "n_models=5", "n_models=2"),
    (QUICK_START, "ensemble.train(max_epochs=100,", "ensemble.train(max_epochs=1,"),
    (("scaling.md", 2), "num_samples=20", "num_samples=2"),
    (("scaling.md", 2), "max_epochs=20, resources_per_trial", "max_epochs=1, resources_per_trial"),
    (("scaling.md", 2), "max_epochs=20)", "max_epochs=1)"),
]
COMPILE_ONLY = "# train.py"


def _python_blocks() -> dict[tuple[str, int], str]:
    blocks = {}
    for page in PAGES:
        found = re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)
        blocks.update({(page.name, i): block for i, block in enumerate(found, start=1)})
    return blocks


def test_readme_code_blocks_run(tmp_path):
    matplotlib.use("Agg")
    blocks = _python_blocks()
    assert QUICK_START in blocks and len(blocks) >= 3
    for where, old, new in FAST:
        assert old in blocks[where], f"{where[0]} python block {where[1]} no longer has {old!r}"
        blocks[where] = blocks[where].replace(old, new)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # files a block writes stay out of the checkout
    try:
        for where, block in blocks.items():
            code = compile(block, f"{where[0]} python block {where[1]}", "exec")
            if block.startswith(COMPILE_ONLY):
                continue
            if "from ray import tune" in block:
                pytest.importorskip("ray.tune")
            exec(code, namespace)
            if where == QUICK_START:  # the quick start made what it says
                pred = namespace["pred"]
                assert set(pred.obs["drug"]) == {
                    "Imatinib",
                    "Imatinib+Vorinostat",
                    "my_new_molecule",
                }
                methods = set(namespace["result"].summary["method"])
                assert {"PerturbX", "perturbed_centroid"} <= methods
    finally:
        os.chdir(cwd)
