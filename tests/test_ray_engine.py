"""``qscorer score --engine ray``: Ray Data scoring gives the default engine's rows, resumes the same
way, and reads URIs. One local Ray instance (on 127.0.0.1) serves the module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qscorer_reward.serving import LOCAL_RAY_ENVIRONMENT  # noqa: E402

for _name, _value in LOCAL_RAY_ENVIRONMENT.items():  # before Ray is imported: one node, on loopback
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from qscorer_reward.cli import main  # noqa: E402
from qscorer_reward.testing import tiny_scorer  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data"),  # Ray Data about its own settings
]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_scorer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good files, a corrupt one and one too small to score, in nested folders (as `test_cli` has)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("ray") / "images"
    (root / "nested").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "d.webp", "nested/c.png", "nested/e.png"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "tiny.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _run(args, capsys):
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_rows(got: list[dict], expected: list[dict], path=lambda p: p):
    assert [path(row["path"]) for row in got] == [row["path"] for row in expected]
    for row, want in zip(got, expected):
        assert (row["error"] is None) == (want["error"] is None)
        if want["error"] is not None:
            assert row["error"].replace(row["path"], want["path"]) == want["error"]
        else:
            assert row["score"] == pytest.approx(want["score"], abs=1e-5)


def test_ray_engine_gives_the_default_engines_rows(folder, model_dir, tmp_path, capsys):
    base = ["score", str(folder), "--model", str(model_dir), "--batch-size", "2", "--no-progress"]
    assert _run([*base, "--output", str(tmp_path / "default.jsonl")], capsys)[0] == 1
    status, _, err = _run([*base, "--output", str(tmp_path / "ray.jsonl"), "--engine", "ray", "--actors", "2"], capsys)
    assert status == 1  # the corrupt and the tiny file failed
    assert "scored 5 image(s), 2 failed" in err
    expected = _rows(tmp_path / "default.jsonl")
    assert [Path(row["path"]).name for row in expected] == [
        "a.png", "b.jpg", "corrupt.png", "d.webp", "c.png", "e.png", "tiny.png"
    ]  # fmt: skip
    _assert_same_rows(_rows(tmp_path / "ray.jsonl"), expected)

    # To stdout as a table, in input order, like the default engine.
    status, out, _ = _run([*base, "--engine", "ray"], capsys)
    header, *lines = out.splitlines()
    assert header.split() == ["score", "path"]
    assert [line.split()[-1] if "(" not in line else line.split("  ")[1] for line in lines] == [
        row["path"] for row in expected
    ]


def test_ray_engine_resumes_an_interrupted_run(folder, model_dir, tmp_path, capsys):
    # Left by an interrupted run: a.png scored (a score the model never gives, to see it is kept),
    # b.jpg failed (tried again), and nested/c.png cut off mid-line.
    output = tmp_path / "scores.csv"
    output.write_text(f"path,score,error\n{folder / 'a.png'},9.0000,\n{folder / 'b.jpg'},,flaky disk\n{folder}/nes")
    args = ["score", str(folder), "--model", str(model_dir), "--output", str(output), "--engine", "ray",
            "--no-progress", "--resume"]  # fmt: skip
    status, _, err = _run(args, capsys)
    assert status == 1
    assert "scored 4 image(s), 2 failed; 1 kept" in err
    rows = output.read_text().splitlines()
    assert rows[0] == "path,score,error"
    names = [Path(line.split(",")[0]).name for line in rows[1:]]
    assert names == ["a.png", "b.jpg", "corrupt.png", "d.webp", "c.png", "e.png", "tiny.png"]
    assert rows[1] == f"{folder / 'a.png'},9.0000,"
    assert "flaky disk" not in output.read_text()

    status, _, err = _run(args, capsys)  # again: only the two failures are tried
    assert "scored 0 image(s), 2 failed; 5 kept" in err
    assert output.read_text().splitlines() == rows

    status, _, err = _run(args[:-1], capsys)  # neither --resume nor --overwrite: refused, kept
    assert status == 2 and "pass --resume to continue it or --overwrite" in err
    assert output.read_text().splitlines() == rows


def test_ray_engine_reads_uris(folder, model_dir, tmp_path, capsys):
    base = ["score", "--model", str(model_dir), "--no-progress", "--format", "jsonl"]
    local = tmp_path / "local.jsonl"
    assert _run([*base[:1], str(folder), *base[1:], "--output", str(local)], capsys)[0] == 1
    status, out, _ = _run([*base[:1], f"file://{folder}", *base[1:], "--engine", "ray"], capsys)
    assert status == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(row["path"].startswith("file:///") for row in rows)
    expected = [row for row in _rows(local) if row["error"] is None or "8x8" in row["error"]]
    good = [row for row in rows if "corrupt" not in row["path"]]
    _assert_same_rows(good, expected, path=lambda uri: uri.removeprefix("file://"))
    (corrupt,) = [row for row in rows if "corrupt" in row["path"]]
    assert corrupt["score"] is None
    assert corrupt["error"].startswith(f"file://{folder}/corrupt.png cannot be decoded")


def test_ray_engine_killed_mid_run_resumes_where_it_stopped(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(150):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:03d}.png")
    output = tmp_path / "scores.jsonl"
    command = [sys.executable, "-m", "qscorer_reward.cli", "score", str(folder), "--model", str(model_dir),
               "--engine", "ray", "--address", ray.get_runtime_context().gcs_address, "--batch-size", "1",
               "--output", str(output), "--no-progress"]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_text().count("\n") >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    written = output.read_text().count("\n")
    assert 3 <= written < 150  # killed mid-run

    status, _, err = _run(["score", str(folder), "--model", str(model_dir), "--engine", "ray", "--output",
                           str(output), "--no-progress", "--resume"], capsys)  # fmt: skip
    assert status == 0
    kept = int(err.split("; ")[1].split()[0])
    assert kept == written  # every complete line kept
    assert f"scored {150 - kept} image(s), 0 failed; {kept} kept" in err
    rows = _rows(output)
    assert [Path(row["path"]).name for row in rows] == [f"{index:03d}.png" for index in range(150)]
    assert all(1.0 <= row["score"] <= 5.0 for row in rows)


def test_ray_engine_reports_inputs_without_images_or_that_cannot_be_listed(tmp_path, capsys):
    status, _, err = _run(["score", str(tmp_path), "--engine", "ray"], capsys)
    assert status == 1 and "no image files found" in err
    status, _, err = _run(["score", "nosuch://bucket/folder", "--engine", "ray"], capsys)
    assert status == 2 and "error: cannot list the inputs: Unrecognized filesystem type" in err
