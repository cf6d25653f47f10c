"""The ``qscorer score`` job: score image files in batches and write one row per file as it comes.

A CSV or JSONL ``--output`` is resumable: rows are appended and flushed one by one, an interrupted
run leaves at worst a cut-off last line (ignored on reading), and ``--resume`` keeps the rows that
have a score and scores the rest (failed files are tried again). Under ``accelerate launch`` each
process scores every N-th of the remaining files, as `training.evaluation.predict` shares records,
into its own part file ``OUTPUT.part-RANK``; the main process then merges everything into OUTPUT.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
CSV_COLUMNS = ["path", "score", "error"]
ROW_FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass
class ScoreRow:
    """One output row: the file, its score (``None`` if it failed) and the error message."""

    path: str
    score: float | None
    error: str | None = None


@dataclass
class ScoreSummary:
    """What a job did: files newly scored and failed in this run, files kept from a resumed output."""

    scored: int
    failed: int
    kept: int = 0

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def find_images_with_relative_paths(paths: Iterable[str | Path]) -> Iterator[tuple[Path, Path]]:
    """``(file, path relative to the folder it was found in)``: files named directly (whatever their
    suffix, relative path = the file name), and image files under folders, recursively and in sorted
    order. A path that does not exist is yielded as is, to be reported."""
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            yield from ((file, file.relative_to(path)) for file in files)
        else:
            yield path, Path(path.name)


def find_images(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files of `find_images_with_relative_paths`, each once."""
    yield from dict.fromkeys(file for file, _ in find_images_with_relative_paths(paths))


def score_files(scorer, paths: list[Path], batch_size: int, progress: bool = False) -> Iterator[ScoreRow]:
    """Score ``paths`` in batches; a file that cannot be read or scored becomes a row with an error
    and the rest of the run goes on."""
    from tqdm.auto import tqdm

    from .preprocessing import load_image

    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            loaded, rows = [], {}
            for path in batch:
                try:
                    loaded.append((path, load_image(path, scorer.max_image_pixels)))
                except ValueError as err:
                    rows[path] = ScoreRow(str(path), None, str(err))
            for path, score, error in _score_loaded(scorer, loaded):
                rows[path] = ScoreRow(str(path), score, error)
            yield from (rows[path] for path in batch)
            bar.update(len(batch))


def _score_loaded(scorer, loaded: list) -> list:
    """(path, score, error) for loaded images: one forward pass, or one per image if the batch
    fails, so that one bad image only fails itself."""
    import torch

    if not loaded:
        return []
    try:
        with torch.inference_mode():
            scores = scorer([image for _, image in loaded]).tolist()
        return [(path, score, None) for (path, _), score in zip(loaded, scores)]
    except ValueError as err:
        if len(loaded) == 1:
            return [(loaded[0][0], None, f"{loaded[0][0]}: {err}")]
        return [row for item in loaded for row in _score_loaded(scorer, [item])]


# ------------------------------------------------------------------------------ row files


def row_file_format(path: str | Path, requested: str | None = None) -> str:
    """The output format: ``requested``, else from the suffix (``.csv``, ``.jsonl``), else ``table``."""
    return requested or ROW_FILE_FORMATS.get(Path(path).suffix.lower(), "table")


def header_line(output_format: str) -> str:
    """The first line of a fresh file of this format (only CSV has one)."""
    return ",".join(CSV_COLUMNS) + "\n" if output_format == "csv" else ""


def format_row(row: ScoreRow, output_format: str) -> str:
    """One row as a line (with its newline) in ``csv``, ``jsonl`` or ``table`` format."""
    if output_format == "csv":
        line = io.StringIO()
        score = "" if row.score is None else f"{row.score:.4f}"
        csv.writer(line, lineterminator="\n").writerow([row.path, score, row.error or ""])
        return line.getvalue()
    if output_format == "jsonl":
        return json.dumps(asdict(row)) + "\n"
    score = "FAILED" if row.score is None else f"{row.score:6.3f}"
    return f"{score}  {row.path}" + (f"  ({row.error})" if row.error else "") + "\n"


def write_rows(rows: Iterable[ScoreRow], output_format: str, stream, header: bool = True) -> ScoreSummary:
    """Write rows as they come, each flushed (so an interrupted run keeps what it wrote), after the
    CSV header if ``header``; returns the counts of scored and failed files."""
    summary = ScoreSummary(0, 0)
    if header:
        stream.write(header_line(output_format))
    for row in rows:
        summary.scored += row.score is not None
        summary.failed += row.score is None
        stream.write(format_row(row, output_format))
        stream.flush()
    return summary


def read_rows(path: str | Path, output_format: str | None = None) -> list[ScoreRow]:
    """The rows of a CSV or JSONL file written by `write_rows` (format from the suffix, else from
    the first character). A last line without its newline was cut off by an interruption and is
    ignored. Raises `ValueError` naming the file and line for anything else malformed."""
    text = Path(path).read_text()
    complete = text[: text.rfind("\n") + 1]
    output_format = output_format or ROW_FILE_FORMATS.get(Path(path).suffix.lower())
    output_format = output_format or ("jsonl" if complete.startswith("{") else "csv")
    if output_format == "jsonl":
        return [_jsonl_row(line, path, number) for number, line in enumerate(complete.splitlines(), 1) if line]
    records = csv.DictReader(io.StringIO(complete))
    if complete and records.fieldnames != CSV_COLUMNS:
        raise ValueError(f"{path}: expected the CSV columns {','.join(CSV_COLUMNS)}, found {records.fieldnames}")
    return [_csv_row(record, path, records.line_num) for record in records]


def _jsonl_row(line: str, path, number: int) -> ScoreRow:
    try:
        record = json.loads(line)
        return ScoreRow(str(record["path"]), record["score"], record.get("error"))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: line {number} is not a score row ({err})") from err


def _csv_row(record: dict, path, number: int) -> ScoreRow:
    try:
        return ScoreRow(record["path"], float(record["score"]) if record["score"] else None, record["error"] or None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: line {number} is not a score row ({err})") from err


# ------------------------------------------------------------------------------ resumable output


def part_file(output: Path, rank: int) -> Path:
    """Where process ``rank`` of a sharded run writes its rows."""
    return output.with_name(f"{output.name}.part-{rank}")


def part_files(output: Path) -> list[Path]:
    """Part files beside ``output`` (left by an interrupted sharded run, of any process count)."""
    return sorted(Path(p) for p in glob.glob(glob.escape(str(output)) + ".part-*"))


def existing_output_files(output: Path) -> list[Path]:
    """``output`` (if it exists) and its part files: what a new run would replace."""
    return [path for path in (output, *part_files(output)) if path.exists()]


def previous_rows(output: Path, output_format: str) -> list[ScoreRow]:
    """The rows already in ``output`` and then in its part files, in file order."""
    return [row for path in existing_output_files(output) for row in read_rows(path, output_format)]


def merge_rows(rows: list[ScoreRow], paths: list[Path]) -> list[ScoreRow]:
    """One row per file: a scored row wins over a failed one, a later row over an earlier one of
    the same kind. The files of this run come first, in input order, then any other files the
    rows mention, in their first order (a resumed output never loses rows)."""
    best: dict[str, ScoreRow] = {}
    for row in rows:
        if row.score is not None or best.get(row.path, row).score is None:
            best[row.path] = row
    order = dict.fromkeys([*(str(path) for path in paths if str(path) in best), *best])
    return [best[path] for path in order]


def open_for_append(path: Path, fresh: bool):
    """Open a row file to add rows: emptied if ``fresh``, else cut back to its last complete line."""
    if fresh or not path.exists():
        return open(path, "w", newline="")
    with open(path, "rb+") as stream:
        data = stream.read()
        stream.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", newline="")


def write_atomically(path: Path, rows: list[ScoreRow], output_format: str) -> None:
    """Replace ``path`` by a file holding ``rows``; a reader sees the old file or the new one, whole."""
    temporary = path.with_name(f"{path.name}.tmp")
    with open(temporary, "w", newline="") as stream:
        stream.write(header_line(output_format) + "".join(format_row(row, output_format) for row in rows))
    os.replace(temporary, path)


def run_resumable_job(
    scorer,
    paths: list[Path],
    output: Path,
    output_format: str,
    state,
    *,
    resume: bool,
    batch_size: int,
    progress: bool,
) -> ScoreSummary:
    """Score ``paths`` into the CSV or JSONL file ``output``, sharded over ``state``'s processes
    (an accelerate ``PartialState``), resuming from what ``output`` and its part files hold when
    ``resume`` (else replacing them). All processes return the same summary of this run's files."""
    from accelerate.utils import broadcast_object_list

    kept = {}
    if resume:
        kept = {row.path: row for row in previous_rows(output, output_format) if row.score is not None}
    elif state.is_main_process:  # --overwrite: replace the output and any rows left beside it
        for stale in existing_output_files(output):
            stale.unlink()
    state.wait_for_everyone()  # everyone has read what was there before anyone writes
    remaining = [path for path in paths if str(path) not in kept]
    share = remaining[state.process_index :: state.num_processes]
    target = output if state.num_processes == 1 else part_file(output, state.process_index)
    with open_for_append(target, fresh=not resume) as stream:
        rows = score_files(scorer, share, batch_size, progress=progress and state.is_main_process)
        write_rows(rows, output_format, stream, header=stream.tell() == 0)
    state.wait_for_everyone()
    summary = [None]
    if state.is_main_process:
        merged = merge_rows(previous_rows(output, output_format), paths)
        write_atomically(output, merged, output_format)
        for part in part_files(output):
            part.unlink()
        summary = [_summarise(merged, paths, kept)]
    if state.num_processes > 1:
        broadcast_object_list(summary)
    return summary[0]


def _summarise(merged: list[ScoreRow], paths: list[Path], kept: dict[str, ScoreRow]) -> ScoreSummary:
    final = {row.path: row for row in merged}
    new = [final[str(path)] for path in paths if str(path) not in kept]
    failed = sum(row.score is None for row in new)
    return ScoreSummary(scored=len(new) - failed, failed=failed, kept=len(paths) - len(new))
