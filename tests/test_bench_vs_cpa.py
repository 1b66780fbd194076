"""The side-by-side speed benchmark's argument handling and table (no second environment)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_vs_cpa  # noqa: E402


def test_table_pairs_the_rounds_and_takes_the_ratio_of_medians():
    runs = [
        {"tool": "cpa", "round": 0, "batch_size": 128, "cells_per_s": 1000.0},
        {"tool": "perturbx", "round": 0, "batch_size": 128, "cells_per_s": 3000.0},
        {"tool": "cpa", "round": 1, "batch_size": 128, "cells_per_s": 2000.0},
        {"tool": "perturbx", "round": 1, "batch_size": 128, "cells_per_s": 5000.0},
        {"tool": "cpa", "round": 2, "batch_size": 128, "cells_per_s": 1500.0},
        {"tool": "perturbx", "round": 2, "batch_size": 128, "cells_per_s": 6000.0},
        {"tool": "cpa", "round": 0, "batch_size": 1024, "cells_per_s": 4000.0},  # unpaired
    ]
    (row,) = bench_vs_cpa.table(runs)
    assert row["batch_size"] == 128 and row["rounds"] == 3
    assert row["cpa_median"] == 1500.0 and row["perturbx_median"] == 5000.0
    assert row["ratio_of_medians"] == pytest.approx(5000 / 1500)
    assert row["ratio_range"] == pytest.approx((2.5, 4.0))  # 5000/2000 and 6000/1500
    text = bench_vs_cpa.format_table([row])
    assert "3.33×" in text and "(2.50–4.00)" in text and "1,500" in text


def test_arguments_are_checked_and_a_missing_venv_is_named(tmp_path):
    with pytest.raises(SystemExit):
        bench_vs_cpa.parse_args(["--rounds", "0"])
    args = bench_vs_cpa.parse_args(["--batch-sizes", "128", "256"])
    assert args.batch_sizes == [128, 256] and args.rounds == 2
    with pytest.raises(SystemExit, match="pass --build"):
        bench_vs_cpa.main(["--cpa-venv", str(tmp_path / "none")])


def test_json_line_is_found_after_the_logs():
    out = 'some log\n{"cells_per_s": 12.5}\n'
    assert bench_vs_cpa._last_json_line(out) == {"cells_per_s": 12.5}
    with pytest.raises(RuntimeError, match="no JSON line"):
        bench_vs_cpa._last_json_line("nothing here")
