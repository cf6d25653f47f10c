"""Smoke test of benchmarks/bench_core.py in --quick mode: it runs and reports every number."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH_CORE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"

EXPECTED_KEYS = {
    "machine": {"cpu_model", "cpu_cores", "torch_threads", "torch", "transformers", "python"},
    "overhead": {
        "batch",
        "image_size",
        "sequence_length",
        "no_grad",
        "split_ms",
        "split_fraction_of_scorer",
        "grad_to_input",
        "grad_checkpointing",
    },
    "preprocessing": {
        "images",
        "image_size",
        "resized_to",
        "ours_ms",
        "reference_ms",
        "speedup",
        "grids_agree",
        "pixel_values_mean_abs_diff",
        "pixel_values_max_abs_diff",
    },
}
RATIO_ROW_KEYS = {"scorer_ms", "backbone_ms", "ratio"}
SPLIT_PARTS = {"input_conversion", "prepare", "backbone_forward", "head"}


def _numbers(tree, path=""):
    """(path, value) for every int or float leaf of a JSON tree (bools excluded)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{index}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_mode_reports_all_numbers(tmp_path):
    json_path = tmp_path / "bench.json"
    # One thread and a subprocess: stable on small VMs, and the test process keeps its settings.
    completed = subprocess.run(
        [sys.executable, str(BENCH_CORE), "--quick", "--threads", "1", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "target ratio" in completed.stdout

    results = json.loads(json_path.read_text())
    assert results["mode"] == "quick"
    for section, keys in EXPECTED_KEYS.items():
        assert set(results[section]) >= keys, section
    overhead = results["overhead"]
    for row in ("no_grad", "grad_to_input", "grad_checkpointing"):
        assert set(overhead[row]) >= RATIO_ROW_KEYS, row
    assert isinstance(overhead["no_grad"]["meets_target"], bool)
    assert set(overhead["split_ms"]) == set(overhead["split_fraction_of_scorer"]) == SPLIT_PARTS
    assert results["preprocessing"]["grids_agree"] is True

    numbers = dict(_numbers(results))
    assert len(numbers) > 30
    for path, value in numbers.items():
        # Pixel differences may be exactly 0; every time, ratio, size and count must be > 0.
        lower_bound_ok = value >= 0 if "abs_diff" in path else value > 0
        assert math.isfinite(value) and lower_bound_ok, (path, value)
