"""`qscorer score` end to end on folders with good, corrupt, tiny and missing files."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qscorer_reward.cli import main
from qscorer_reward.testing import tiny_scorer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_scorer().save_pretrained(directory)
    return directory


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "nested/c.png"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "tiny.png")
    (root / "notes.txt").write_text("not an image, and not named like one: skipped")
    return root


def _run(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_folder_with_bad_files_is_scored_and_failures_reported(folder, model_dir, capsys):
    status, out, err = _run(["score", str(folder), "--model", str(model_dir), "--format", "jsonl"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    by_name = {Path(row["path"]).name: row for row in rows}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.png", "corrupt.png", "tiny.png"]
    for name in ("a.png", "b.jpg", "c.png"):
        assert 1.0 <= by_name[name]["score"] <= 5.0 and by_name[name]["error"] is None
    assert by_name["corrupt.png"]["score"] is None and "cannot read image" in by_name["corrupt.png"]["error"]
    assert by_name["tiny.png"]["score"] is None and "8x8" in by_name["tiny.png"]["error"]
    assert status == 1
    assert "scored 3 image(s), 2 failed" in err


def test_scores_match_the_python_api(folder, model_dir, capsys):
    from qscorer_reward import QScorer

    status, out, _ = _run(["score", str(folder / "a.png"), str(folder / "b.jpg"), "--model", str(model_dir),
                           "--format", "csv", "--batch-size", "1"], capsys)  # fmt: skip
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = QScorer.from_pretrained(model_dir)([folder / "a.png", folder / "b.jpg"])
    assert [float(row["score"]) for row in rows] == pytest.approx(expected.tolist(), abs=1e-4)


def test_output_file_and_table(folder, model_dir, tmp_path, capsys):
    output = tmp_path / "scores.csv"
    status, out, _ = _run(["score", str(folder / "nested"), "--model", str(model_dir), "--output", str(output)], capsys)
    assert status == 0 and out == ""
    assert output.read_text().splitlines()[0] == "path,score,error"
    status, out, _ = _run(["score", str(folder / "missing.png"), "--model", str(model_dir)], capsys)
    assert status == 1 and "FAILED" in out and "no such file" in out


def test_console_script_runs_the_bundled_model(folder):
    script = Path(sys.executable).parent / "qscorer"
    result = subprocess.run(
        [str(script), "score", str(folder / "a.png"), "--no-progress"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "a.png" in result.stdout
    assert "UNTRAINED placeholder" in result.stderr
