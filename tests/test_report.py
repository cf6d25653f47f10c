"""`qscorer report`: the page's contents and thumbnails (here), and the page itself in a real
headless Chromium (`test_report_browser.py`)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qscorer_reward.cli import main
from qscorer_reward.report import (
    THUMBNAIL_SIDE,
    ReportModel,
    make_thumbnail,
    report_model,
    thumbnail_folder,
    write_report,
)
from qscorer_reward.scoring_job import ScoreRow, write_rows
from qscorer_reward.testing import tiny_scorer

MODEL = ReportModel("test-model", (1.0, 5.0))


def make_scored_folder(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> list[Path]:
    """Random RGB images of the given (width, height) under ``root``."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, (width, height) in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_score_file(path: Path, rows: list[ScoreRow]) -> Path:
    """``rows`` as `qscorer score` writes them (CSV or JSONL from the suffix)."""
    with open(path, "w", newline="") as stream:
        write_rows(rows, "jsonl" if path.suffix == ".jsonl" else "csv", stream)
    return path


def page_data(page: Path) -> dict:
    """The JSON the page's script reads."""
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)[1])


def test_thumbnails_are_jpeg_with_a_longest_side_of_192_and_never_enlarged(tmp_path):
    large, small = make_scored_folder(tmp_path, {"large.png": (400, 300), "small.png": (90, 120)})
    for path, expected in ((large, (THUMBNAIL_SIDE, 144)), (small, (90, 120))):
        data, width, height = make_thumbnail(path)
        assert (width, height) == expected
        with Image.open(io.BytesIO(data)) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.mode == "RGB" and thumbnail.size == expected


def test_page_embeds_thumbnails_sorts_scores_and_lists_failures(tmp_path):
    paths = make_scored_folder(tmp_path / "images", {"b.png": (64, 48), "a.png": (48, 64), "c.png": (50, 50)})
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        ScoreRow(str(paths[0]), 3.5),
        ScoreRow(str(paths[1]), 2.25),
        ScoreRow(str(paths[2]), 3.5),
        ScoreRow(str(tmp_path / "images" / "corrupt.png"), None, "cannot read image (truncated)"),
        ScoreRow(str(tmp_path / "images" / "gone.png"), 4.0),  # scored, then deleted: no preview
    ]
    scores = write_score_file(tmp_path / "scores.jsonl", rows)
    summary = write_report(scores, tmp_path / "report.html", model=MODEL)
    assert (summary.scored, summary.failed, summary.without_preview) == (4, 1, 1)
    assert summary.thumbnail_folder is None and not thumbnail_folder(tmp_path / "report.html").exists()
    images = page_data(tmp_path / "report.html")["images"]
    assert [(image["name"], image["score"]) for image in images] == [
        ("a.png", 2.25), ("b.png", 3.5), ("c.png", 3.5), ("gone.png", 4.0)
    ]  # fmt: skip
    assert all(image["thumb"].startswith("data:image/jpeg;base64,") for image in images[:3])
    assert images[3]["thumb"] is None and "no such file" in images[3]["note"]
    page = (tmp_path / "report.html").read_text()
    assert "cannot read image (truncated)" in page and "corrupt.png" in page
    assert "test-model" in page and "[1, 5]" in page
    assert not re.search(r"\b(?:https?|wss?|ftp)://", page)  # no network URL anywhere in the page


def test_thumbnail_files_are_written_once_and_reused(tmp_path):
    paths = make_scored_folder(tmp_path / "images", {f"{i}.png": (40 + i, 30) for i in range(5)})
    scores = write_score_file(tmp_path / "scores.csv", [ScoreRow(str(p), 1.0 + i) for i, p in enumerate(paths)])
    output = tmp_path / "report.html"
    first = write_report(scores, output, model=MODEL, embed_limit=3)
    folder = tmp_path / "report_files"
    assert first.thumbnail_folder == folder and (first.thumbnails_written, first.thumbnails_reused) == (5, 0)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(before) == 5
    assert {image["thumb"] for image in page_data(output)["images"]} == {f"report_files/{name}" for name in before}

    second = write_report(scores, output, model=MODEL, embed_limit=3)
    assert (second.thumbnails_written, second.thumbnails_reused) == (0, 5)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before

    Image.new("RGB", (70, 20), "red").save(paths[0])  # a changed image gets a new thumbnail
    third = write_report(scores, output, model=MODEL, embed_limit=3)
    assert (third.thumbnails_written, third.thumbnails_reused) == (1, 4)
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(after) == 5 and len(set(after) - set(before)) == 1  # the stale thumbnail was removed
    assert any(name.endswith("_70x20.jpg") for name in after)

    (folder / "notes.txt").write_text("mine")  # only thumbnails are ever removed
    assert write_report(scores, output, model=MODEL).thumbnail_folder is None  # embedded again
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    (folder / "notes.txt").unlink()
    write_report(scores, output, model=MODEL)
    assert not folder.exists()


def test_filter_command_runs_from_where_the_relative_paths_are(tmp_path, monkeypatch):
    paths = make_scored_folder(tmp_path / "gen", {"x/a.png": (32, 32), "y/b.png": (32, 32)})
    monkeypatch.chdir(tmp_path)
    rows = [ScoreRow(str(p.relative_to(tmp_path)), 3.0) for p in paths]
    write_score_file(tmp_path / "s.csv", rows)
    write_report("s.csv", "r.html", model=MODEL)
    assert (
        page_data(tmp_path / "r.html")["command"] == f"cd {tmp_path} && qscorer filter gen --scores s.csv --min-score "
    )
    write_report(tmp_path / "s.csv", tmp_path / "r.html", model=MODEL, sources=[str(tmp_path / "gen" / "x")])
    assert page_data(tmp_path / "r.html")["command"].startswith(f"cd {tmp_path} && qscorer filter {tmp_path}/gen/x ")


# ---------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_scorer().save_pretrained(directory)
    return directory


def test_report_command_takes_the_model_name_and_range_from_the_config_alone(tmp_path, model_dir, capsys):
    assert report_model(None) == ReportModel("qscorer-tiny", (1.0, 5.0))
    paths = make_scored_folder(tmp_path, {"a.png": (32, 32)})
    scores = write_score_file(tmp_path / "scores.csv", [ScoreRow(str(paths[0]), 3.0)])
    page = tmp_path / "page.html"
    status = main(["report", str(scores), "--output", str(page), "--model", str(model_dir), "--title", "Batch 7"])
    assert status == 0
    assert "report " in capsys.readouterr().err
    text = page.read_text()
    assert "<h1>Batch 7</h1>" in text and f"model {model_dir}: scores in [1, 5]" in text

    status = main(["report", str(scores), "--output", str(page), "--model", str(tmp_path / "nothing")])
    assert status == 2 and "cannot read --model" in capsys.readouterr().err


def test_report_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    paths = make_scored_folder(tmp_path, {"a.png": (32, 32)})
    scores = write_score_file(tmp_path / "scores.csv", [ScoreRow(str(paths[0]), 3.0)])
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    for output in (notes, scores):
        before = output.read_bytes()
        assert main(["report", str(scores), "--output", str(output)]) == 2
        assert output.read_bytes() == before
        assert "error: no report written" in capsys.readouterr().err
    page = tmp_path / "report.html"
    assert main(["report", str(scores), "--output", str(page)]) == 0
    assert main(["report", str(scores), "--output", str(page), "--title", "again"]) == 0  # its own page: replaced
    assert "<h1>again</h1>" in page.read_text()
    (tmp_path / "bad.csv").write_text("path,score,error\nx.png,not-a-number,\n")
    assert main(["report", str(tmp_path / "bad.csv"), "--output", str(page)]) == 2
    assert "line 2 is not a score row" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.csv"), "--output", str(page)]) == 2


def test_score_writes_the_report_after_the_run(tmp_path, model_dir, capsys):
    folder = tmp_path / "images"
    make_scored_folder(folder, {"a.png": (60, 80), "nested/b.png": (80, 60)})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    scores, page = tmp_path / "scores.csv", tmp_path / "report.html"
    args = ["score", str(folder), "--model", str(model_dir), "--output", str(scores), "--report", str(page)]
    assert main([*args, "--no-progress"]) == 1  # corrupt.png failed
    err = capsys.readouterr().err
    assert "scored 2 image(s), 1 failed" in err and f"report {page}: 2 image(s), 1 without a score" in err
    data = page_data(page)
    assert sorted(image["name"] for image in data["images"]) == ["a.png", "b.png"]
    assert data["command"] == f"qscorer filter {folder} --scores {scores} --min-score "
    assert "corrupt.png" in page.read_text()


def test_score_refuses_a_report_without_a_row_file_before_scoring(tmp_path, model_dir, capsys):
    make_scored_folder(tmp_path, {"a.png": (32, 32)})
    for output in ([], ["--format", "csv"], ["--output", str(tmp_path / "scores.txt")]):
        args = ["score", str(tmp_path / "a.png"), "--model", str(model_dir), *output, "--report", "r.html"]
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "--report needs a CSV or JSONL --output" in captured.err and captured.out == ""
    assert not (tmp_path / "scores.txt").exists()


# ------------------------------------------------------------------ thumbnails read as the scorer reads


def _thumbnail_pixels(path: Path) -> np.ndarray:
    data, width, height = make_thumbnail(path)
    with Image.open(io.BytesIO(data)) as thumbnail:
        assert thumbnail.size == (width, height)
        return np.asarray(thumbnail.convert("RGB"), dtype=float)


def test_a_thumbnail_is_upright_as_the_photo_is_displayed(tmp_path, photos):
    """A phone photo stored sideways (EXIF orientation 6) shows upright, as the scorer scores it."""
    stored = photos[2][:200, :320]  # 320 wide, 200 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 200 wide, 320 high
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    thumbnail = _thumbnail_pixels(path)
    assert thumbnail.shape == (THUMBNAIL_SIDE, 120, 3)
    displayed = Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270)
    upright = np.asarray(displayed.resize((120, THUMBNAIL_SIDE), Image.Resampling.BICUBIC), dtype=float)
    turned_the_other_way = upright[::-1, ::-1]
    assert np.abs(thumbnail - upright).mean() < 6 < np.abs(thumbnail - turned_the_other_way).mean()


@pytest.mark.parametrize("kind", ["16-bit grey PNG", "float TIFF", "RGBA PNG"])
def test_a_thumbnail_reads_every_image_mode_by_its_range(kind, tmp_path):
    """16-bit and float images were white or clipped, transparency black: the thumbnail now shows
    what the scorer sees (16-bit / 65535, float in [0, 1], transparency over white)."""
    ramp = np.linspace(0.0, 1.0, 64 * 48).reshape(48, 64)
    if kind == "16-bit grey PNG":
        path, image = tmp_path / "grey16.png", Image.fromarray((ramp * 65535).round().astype(np.uint16))
        expected = np.stack([ramp * 255] * 3, axis=-1)
    elif kind == "float TIFF":
        path, image = tmp_path / "float.tif", Image.fromarray(ramp.astype(np.float32))
        expected = np.stack([ramp * 255] * 3, axis=-1)
    else:
        rgba = np.zeros((48, 64, 4), dtype=np.uint8)
        rgba[..., 0] = 200
        rgba[..., 3] = np.where(np.arange(64) < 32, 0, 255)  # left half transparent
        path, image = tmp_path / "rgba.png", Image.fromarray(rgba, mode="RGBA")
        expected = np.where((np.arange(64) < 32)[None, :, None], 255.0, [200.0, 0.0, 0.0])
        expected = np.broadcast_to(expected, (48, 64, 3))
    image.save(path)
    thumbnail = _thumbnail_pixels(path)
    assert thumbnail.shape == (48, 64, 3)  # small images are never enlarged
    assert np.abs(thumbnail - expected).mean() < 4, kind
