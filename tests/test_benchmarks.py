"""Smoke tests of the benchmark scripts in their quick / tiny modes: each runs and reports every
number. No timing assertions (the machine is shared); the FLOP formulas must match the counted
FLOPs of the real model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

CORE_KEYS = {
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
    "qalign": {"batch", "image_size", "vocabulary_size", "times_ms", "ratio_to_qscorer"},
}
RATIO_ROW_KEYS = {"scorer_ms", "backbone_ms", "ratio"}
SPLIT_PARTS = {"input_conversion", "prepare", "vision_tower", "language_model", "head"}
QALIGN_VARIANTS = {"qscorer", "qalign_answer_position", "qalign_all_logits"}
MODES = {"no_grad", "grad_to_input", "grad_checkpointing"}


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


def _assert_positive_and_finite(results, allowed_zero=("abs_diff",)):
    numbers = dict(_numbers(results))
    for path, value in numbers.items():
        # Differences may be exactly 0; every time, ratio, size and count must be > 0.
        lower_bound_ok = value >= 0 if any(part in path for part in allowed_zero) else value > 0
        assert math.isfinite(value) and lower_bound_ok, (path, value)
    return numbers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All scripts started at once in their smoke modes (one torch thread each), then awaited:
    ``{script: (completed process, parsed JSON, output folder)}``."""
    out = tmp_path_factory.mktemp("benchmarks")
    commands = {
        "bench_core": ["--quick", "--threads", "1", "--json", str(out / "core.json")],
        "bench_throughput": ["--quick", "--threads", "1", "--json", str(out / "throughput.json")],
        # A time budget it cannot run out of on a busy machine: every step must run.
        "bench_gpu": ["--tiny", "--out", str(out / "gpu.json"), "--time-budget-s", "3600", "--config-budget-s", "3600"],
        "bench_default_model": ["--batch", "2", "--repeats", "1", "--json", str(out / "default.json")],
    }
    json_paths = {
        "bench_core": "core.json",
        "bench_throughput": "throughput.json",
        "bench_gpu": "gpu.json",
        "bench_default_model": "default.json",
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, arguments in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        path = out / json_paths[name]
        results[name] = (completed, json.loads(path.read_text()) if path.exists() else None, out)
    return results


def test_core_quick_mode_reports_all_numbers(runs):
    completed, results, _ = runs["bench_core"]
    assert completed.returncode == 0, completed.stderr
    assert "target ratio" in completed.stdout
    assert results["mode"] == "quick"
    for section, keys in CORE_KEYS.items():
        assert set(results[section]) >= keys, section
    overhead = results["overhead"]
    for row in ("no_grad", "grad_to_input", "grad_checkpointing"):
        assert set(overhead[row]) >= RATIO_ROW_KEYS, row
    assert isinstance(overhead["no_grad"]["meets_target"], bool)
    assert set(overhead["split_ms"]) == set(overhead["split_fraction_of_scorer"]) == SPLIT_PARTS
    assert results["preprocessing"]["grids_agree"] is True
    assert set(results["qalign"]["times_ms"]) == set(results["qalign"]["ratio_to_qscorer"]) == QALIGN_VARIANTS
    assert len(_assert_positive_and_finite(results)) > 30


def test_throughput_quick_mode_reports_every_configuration(runs):
    completed, results, _ = runs["bench_throughput"]
    assert completed.returncode == 0, completed.stderr
    settings, throughput = results["settings"], results["throughput"]
    expected = {
        (side, batch, mode) for side in settings["image_sides"] for batch in settings["batch_sizes"] for mode in MODES
    }
    rows = throughput["rows"]
    assert {(row["image_side"], row["batch"], row["mode"]) for row in rows} == expected
    assert len(rows) == len(expected)
    for row in rows:
        if row["mode"] == "no_grad":
            assert row["time_vs_no_grad"] == row["peak_memory_vs_no_grad"] == 1.0
    assert set(throughput["flops_per_image"]) == {str(side) for side in settings["image_sides"]}
    _assert_positive_and_finite(results)


def test_default_model_benchmark_scores_the_bundled_model(runs):
    completed, results, _ = runs["bench_default_model"]
    assert completed.returncode == 0, completed.stderr
    assert results["model"] == "qscorer-tiny" and results["image_side"] == 224
    assert [row["threads"] for row in results["rows"]][0] == 1 and isinstance(results["meets_target"], bool)
    assert all(row["ms_per_call_with_convolution"] > 0 for row in results["rows"])
    assert "images/s" in completed.stdout
    _assert_positive_and_finite(results)


def test_gpu_script_tiny_mode_runs_every_step(runs):
    completed, results, out = runs["bench_gpu"]
    assert completed.returncode == 0, completed.stderr
    assert results["mode"] == "tiny"
    (model,) = results["models"].values()
    # The FLOP formulas give what torch's FLOP counter counts on the real model.
    for ratio in model["flop_check"].values():
        assert ratio == pytest.approx(1.0, abs=1e-3)
    assert len(model["flop_check"]) == 2
    rows = model["rows"]
    assert {(row["mode"], row["batch"]) for row in rows} == {
        (mode, batch) for mode in MODES for batch in results["settings"]["batch_sizes"]
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert row["mfu"] > 0 and row["peak_memory_gib"] > 0
        assert ("overhead_vs_bare_forward" in row) == (row["mode"] == "no_grad")
        assert "peak_memory_vs_no_grad" in row
    comparisons = model["comparisons"]
    assert set(comparisons["qalign_ratio_to_qscorer"]) == QALIGN_VARIANTS
    assert comparisons["transformers_sdpa_over_packed"] > 0
    assert (out / model["profile"]["operator_table"]).is_file()
    assert set(model["targets"]) >= {"mfu_target_met", "checkpointing_memory_target_met"}
    assert math.isfinite(results["total_s"])
