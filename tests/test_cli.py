"""`qscorer score` end to end on folders with good, corrupt, tiny and missing files."""

import csv
import io
import json
import os
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
    assert "Warning" not in result.stderr


def test_readme_main_job_scores_the_examples_pristine_above_distorted(capsys):
    """The README's first command: the bundled model on the bundled examples, as JSONL."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    status, out, _ = _run(["score", str(examples), "--format", "jsonl", "--no-progress"], capsys)
    assert status == 0
    scores = {Path(row["path"]).stem: row["score"] for row in map(json.loads, out.splitlines())}
    assert len(scores) == 12
    for photo in ("astronaut", "chelsea", "coffee"):
        distorted = [scores[f"{photo}_{kind}"] for kind in ("blur", "noise", "jpeg")]
        assert scores[f"{photo}_pristine"] > sum(distorted) / 3, (photo, scores)
        assert scores[f"{photo}_pristine"] > scores[f"{photo}_blur"] + 0.5, (photo, scores)


# ---------------------------------------------------------------------------------------- resuming


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_a_resumed_run_scores_each_file_once_and_keeps_scored_rows(folder, model_dir, tmp_path, capsys):
    # An interrupted run: a.png scored (with a score the model never gives, to see it is kept, not
    # recomputed), b.jpg failed (tried again), and nested/c.png cut off mid-line by the kill.
    output = tmp_path / "scores.csv"
    output.write_text(f"path,score,error\n{folder / 'a.png'},9.0000,\n{folder / 'b.jpg'},,flaky disk\n{folder}/nes")
    args = ["score", str(folder), "--model", str(model_dir), "--output", str(output), "--batch-size", "2"]
    status, _, err = _run([*args, "--resume"], capsys)
    assert status == 1  # corrupt.png and tiny.png failed
    assert "scored 2 image(s), 2 failed; 1 kept" in err
    rows = _csv_rows(output)
    names = ["a.png", "b.jpg", "corrupt.png", "c.png", "tiny.png"]
    assert [Path(row["path"]).name for row in rows] == names
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["a.png"]["score"] == "9.0000"
    assert 1.0 <= float(by_name["b.jpg"]["score"]) <= 5.0 and by_name["b.jpg"]["error"] == ""
    assert 1.0 <= float(by_name["c.png"]["score"]) <= 5.0
    assert "cannot read image" in by_name["corrupt.png"]["error"]

    status, _, err = _run([*args, "--resume"], capsys)  # again: only the two failures are retried
    assert "scored 0 image(s), 2 failed; 3 kept" in err
    assert _csv_rows(output) == rows


def test_output_files_are_never_replaced_unless_asked(folder, model_dir, tmp_path, capsys):
    output = tmp_path / "scores.jsonl"
    output.write_text("precious\n")
    base = ["score", str(folder / "a.png"), "--model", str(model_dir)]
    assert _run([*base, "--output", str(output)], capsys)[0] == 2
    assert output.read_text() == "precious\n"
    status, _, err = _run([*base, "--output", str(output), "--resume"], capsys)
    assert status == 2 and "line 1 is not a score row" in err and output.read_text() == "precious\n"
    status, _, err = _run([*base, "--resume"], capsys)
    assert status == 2 and "--resume needs --output" in err
    status, _, err = _run([*base, "--resume", "--output", str(tmp_path / "scores.txt")], capsys)
    assert status == 2 and "CSV or JSONL" in err
    with pytest.raises(SystemExit):
        _run([*base, "--output", str(output), "--resume", "--overwrite"], capsys)
    assert _run([*base, "--output", str(output), "--overwrite"], capsys)[0] == 0
    assert [json.loads(line)["path"] for line in output.read_text().splitlines()] == [str(folder / "a.png")]


# ---------------------------------------------------------------------------------------- sharding


def test_two_processes_under_accelerate_launch_resume_and_give_one_merged_output(folder, model_dir, tmp_path, capsys):
    single = tmp_path / "single.jsonl"
    assert _run(["score", str(folder), "--model", str(model_dir), "--output", str(single)], capsys)[0] == 1
    expected = [json.loads(line) for line in single.read_text().splitlines()]
    # Left by an interrupted 4-process run: a.png done, then a cut-off line.
    sharded = tmp_path / "sharded.jsonl"
    (tmp_path / "sharded.jsonl.part-3").write_text(json.dumps(expected[0]) + '\n{"path": "')
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    command = [*launcher, "-m", "qscorer_reward.cli", "score", str(folder), "--model", str(model_dir),
               "--output", str(sharded), "--batch-size", "2", "--no-progress", "--resume"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0  # the failed files make it exit 1
    assert "scored 2 image(s), 2 failed; 1 kept" in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("scored ") == 1  # the main process reports for all
    assert sorted(p.name for p in tmp_path.glob("*.jsonl*")) == ["sharded.jsonl", "single.jsonl"]  # parts merged
    merged = [json.loads(line) for line in sharded.read_text().splitlines()]
    assert [row["path"] for row in merged] == [row["path"] for row in expected]
    for got, want in zip(merged, expected):
        assert got["error"] == want["error"]
        assert (got["score"] is None) == (want["score"] is None)
        if want["score"] is not None:
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)


# ---------------------------------------------------------------------------------------- filter


@pytest.fixture
def score_file(folder, tmp_path):
    """A `score` output for the folder: a.png and nested/c.png pass 3.0, b.jpg does not, corrupt.png
    failed and tiny.png is missing."""
    path = tmp_path / "scores.csv"
    rows = [("a.png", "4.0000", ""), ("b.jpg", "2.0000", ""), ("nested/c.png", "3.5000", ""),
            ("corrupt.png", "", "cannot read image")]  # fmt: skip
    path.write_text("path,score,error\n" + "".join(f"{folder / name},{score},{error}\n" for name, score, error in rows))
    return path


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file contents, or the target of a symlink."""
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


@pytest.mark.parametrize("mode", ["copy", "move", "symlink"])
def test_filter_places_passing_files_under_dest(mode, folder, score_file, tmp_path, capsys):
    before = _tree(folder)
    dest = tmp_path / "kept"
    args = ["filter", str(folder), "--min-score", "3", "--dest", str(dest), "--mode", mode, "--scores", str(score_file)]
    status, out, err = _run(args, capsys)
    assert status == 1  # corrupt.png has no score, tiny.png is not in the score file
    assert "no score in" in err and "2 without a score" in err
    assert sorted(_tree(dest)) == ["a.png", "nested/c.png"]
    for name in ("a.png", "nested/c.png"):
        placed = dest / name
        assert placed.is_symlink() == (mode == "symlink")
        assert placed.read_bytes() == before[name]
        assert (folder / name).exists() == (mode != "move")
    assert _tree(folder).keys() == before.keys() - ({"a.png", "nested/c.png"} if mode == "move" else set())
    assert out.count(f"{mode} ") == 2


def test_filter_dry_run_changes_nothing(folder, score_file, tmp_path, capsys):
    before = _tree(tmp_path)
    dest = tmp_path / "kept"
    args = ["filter", str(folder), "--min-score", "3", "--dest", str(dest), "--mode", "move", "--dry-run"]
    status, out, _ = _run([*args, "--scores", str(score_file)], capsys)
    assert _tree(tmp_path) == before and not dest.exists()
    assert f"would move {folder / 'a.png'} -> {dest / 'a.png'}" in out and out.count("would move") == 2


def test_filter_never_overwrites_an_existing_destination(folder, score_file, tmp_path, capsys):
    dest = tmp_path / "kept"
    (dest / "nested").mkdir(parents=True)
    (dest / "nested" / "c.png").write_bytes(b"already here")
    args = ["filter", str(folder), "--min-score", "3", "--dest", str(dest), "--mode", "move"]
    status, _, err = _run([*args, "--scores", str(score_file)], capsys)
    assert status == 1 and f"{dest / 'nested' / 'c.png'} exists" in err
    assert (dest / "nested" / "c.png").read_bytes() == b"already here"
    assert (folder / "nested" / "c.png").exists() and not (folder / "a.png").exists()


def test_filter_scores_on_the_fly(folder, model_dir, tmp_path, capsys):
    dest = tmp_path / "kept"
    args = ["filter", str(folder), "--min-score", "1", "--dest", str(dest), "--model", str(model_dir)]
    status, _, err = _run(args, capsys)
    assert status == 1 and "copied 3 image(s) with score >= 1; 0 below, 2 without a score" in err
    assert sorted(_tree(dest)) == ["a.png", "b.jpg", "nested/c.png"]
