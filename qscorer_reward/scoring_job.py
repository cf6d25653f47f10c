"""The ``qscorer score`` job: score image files in batches and write one row per file as it comes.

A CSV or JSONL ``--output`` is resumable: rows are appended and flushed one by one, an interrupted
run leaves at worst a cut-off last line (ignored on reading), and ``--resume`` keeps the rows that
have a score and scores the rest (failed files are tried again). Under ``accelerate launch`` each
process scores every N-th of the remaining files, as `training.evaluation.predict` shares records,
into its own part file ``OUTPUT.part-RANK``; the main process then merges everything into OUTPUT.

Folders are searched by `search_images`, which also reports what it skips (unreadable folders,
broken symbolic links, image formats this Pillow cannot open): those become rows with an error that
starts with ``skipped:``. File names are written losslessly whatever their encoding (see
`format_row`).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Suffixes of the image files looked for in folders. Those whose format this Pillow cannot open
# (HEIC without the pillow-heif plugin, say) are reported as skipped.
IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm",
    ".avif", ".heic", ".heif", ".jxl", ".jp2",
}  # fmt: skip
# The plugin that teaches Pillow a format it may not read out of the box.
PILLOW_PLUGINS = {
    ".heic": "pillow-heif",
    ".heif": "pillow-heif",
    ".avif": "pillow-avif-plugin",
    ".jxl": "pillow-jxl-plugin",
}
CSV_COLUMNS = ["path", "score", "error"]
ROW_FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
SKIPPED = "skipped: "  # how the error of a row that was found but not scored begins
# Row files are UTF-8; a file name that is not (bytes the OS returns as they are on POSIX, unpaired
# UTF-16 surrogates on Windows) is written with the file system's own error handler, so that it
# reads back as the very same `str` and `os.fsencode` gives the file's name.
ROW_FILE_ENCODING = "utf-8"
ROW_FILE_ERRORS = sys.getfilesystemencodeerrors()


@dataclass
class ScoreRow:
    """One output row: the file, its score (``None`` if it failed) and the error message."""

    path: str
    score: float | None
    error: str | None = None

    @property
    def skipped(self) -> bool:
        """Found but not scored (see `search_images`), rather than failed."""
        return self.score is None and (self.error or "").startswith(SKIPPED)


@dataclass
class ScoreSummary:
    """What a job did: files newly scored and failed in this run, files kept from a resumed output,
    and what the search skipped."""

    scored: int
    failed: int
    kept: int = 0
    skipped: int = 0

    @property
    def exit_status(self) -> int:
        return 1 if self.failed or self.skipped else 0


class SearchError(OSError):
    """A path given to search cannot be searched (a folder that cannot be listed)."""


@dataclass
class ImageSearch:
    """What `search_images` found: ``files``, ``(file, path relative to the folder it was found in)``
    in order, and ``skipped``, rows for what it found but cannot score."""

    files: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[ScoreRow] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The files, each once."""
        return list(dict.fromkeys(file for file, _ in self.files))


def search_images(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> ImageSearch:
    """Files named directly (whatever their suffix; relative path = the file name; a path that does
    not exist is kept, to be reported when it is read), and image files under folders, recursively,
    in sorted order, never inside a folder of ``exclude`` (e.g. the destination of ``filter``).

    Skipped, each as a row saying why: subfolders that cannot be listed, broken symbolic links,
    symbolic links to folders (not followed), and image files whose format this Pillow cannot
    open. Raises `SearchError` when a folder given in ``paths`` cannot be listed at all.
    """
    excluded = {_identity(path) for path in exclude if os.path.isdir(path)}
    search = ImageSearch()
    for path in map(Path, paths):
        if not path.is_dir():
            search.files.append((path, Path(path.name)))
            continue
        found, skipped = [], []

        def unreadable(err: OSError, top=path, skipped=skipped) -> None:
            if err.filename == os.fspath(top):
                raise SearchError(f"cannot search {top}: {err.strerror}") from err
            skipped.append(ScoreRow(err.filename, None, f"{SKIPPED}cannot list this folder ({err.strerror})"))

        for folder, folders, names in os.walk(path, onerror=unreadable):
            folder = Path(folder)
            for name in list(folders):
                if excluded and _identity(folder / name) in excluded:
                    folders.remove(name)
                elif (folder / name).is_symlink():
                    skipped.append(
                        ScoreRow(str(folder / name), None, f"{SKIPPED}symbolic link to a folder, not followed")
                    )
            for name in names:
                file = folder / name
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                reason = _skip_reason(file)
                if reason:
                    skipped.append(ScoreRow(str(file), None, SKIPPED + reason))
                else:
                    found.append(file)
        search.files.extend((file, file.relative_to(path)) for file in sorted(found))
        search.skipped.extend(sorted(skipped, key=lambda row: Path(row.path)))
    return search


def _identity(path: str | Path) -> tuple[int, int] | None:
    """The folder's (device, inode), which no spelling of its path changes; ``None`` if it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _skip_reason(file: Path) -> str | None:
    """Why an image file found in a folder cannot be scored, or ``None`` if it can be tried."""
    if not file.exists():
        return f"broken symbolic link (to {os.readlink(file)})" if file.is_symlink() else "vanished"
    suffix = file.suffix.lower()
    if suffix not in _pillow_suffixes():
        plugin = PILLOW_PLUGINS.get(suffix)
        hint = f": install the {plugin} package to read them" if plugin else ""
        return f"this Pillow cannot open {suffix} files{hint}"
    return None


_PILLOW_SUFFIXES: set[str] = set()


def _pillow_suffixes() -> set[str]:
    """The file suffixes whose format the installed Pillow (and its plugins) can open."""
    if not _PILLOW_SUFFIXES:
        from PIL import Image

        with contextlib.suppress(ImportError):  # HEIC/HEIF, once pillow-heif registers itself
            importlib.import_module("pillow_heif").register_heif_opener()
        for plugin in ("pillow_avif", "pillow_jxl"):  # these register themselves when imported
            with contextlib.suppress(ImportError):
                importlib.import_module(plugin)
        Image.init()
        _PILLOW_SUFFIXES.update(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)
    return _PILLOW_SUFFIXES


def score_files(scorer, paths: list[Path], batch_size: int, progress: bool = False) -> Iterator[ScoreRow]:
    """Score ``paths`` in batches; a file that cannot be read or scored becomes a row with an error
    and the rest of the run goes on.

    Files are read one at a time and reduced right after decoding to the backbone's
    ``decode_pixel_budget``, so a batch holds at most ``batch_size`` images of that size, whatever
    the files' dimensions. A failure is confined to its image: one that cannot be decoded (whatever
    the decoder raises, out-of-memory included) fails alone, and a batch that fails in the model is
    scored again one image at a time.
    """
    from tqdm.auto import tqdm

    from .preprocessing import load_image

    budget = scorer.backbone.decode_pixel_budget
    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            loaded, rows = [], {}
            for path in batch:
                try:
                    loaded.append((path, load_image(path, scorer.max_image_pixels, reduce_to_pixels=budget)))
                except ValueError as err:  # missing, unreadable, too large...: the message names the file
                    rows[path] = ScoreRow(str(path), None, str(err))
                except Exception as err:  # decoders can raise anything on a malformed file, MemoryError too
                    reason = "not enough memory to decode it" if isinstance(err, MemoryError) else repr(err)
                    rows[path] = ScoreRow(str(path), None, f"{path}: cannot read image ({reason})")
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
    except (ValueError, RuntimeError, MemoryError) as err:  # RuntimeError: e.g. out of device memory
        if len(loaded) == 1:
            return [(loaded[0][0], None, f"{loaded[0][0]}: {err}")]
        return [row for item in loaded for row in _score_loaded(scorer, [item])]


# ------------------------------------------------------------------------------ row files


def row_file_format(path: str | Path, requested: str | None = None) -> str:
    """The output format: ``requested``, else from the suffix (``.csv``, ``.jsonl``), else ``table``."""
    return requested or ROW_FILE_FORMATS.get(Path(path).suffix.lower(), "table")


def header_line(output_format: str) -> str:
    """The first line of a fresh output of this format (a table's is for the eye only)."""
    if output_format == "csv":
        return ",".join(CSV_COLUMNS) + "\n"
    return f"{'score':>7}  path\n" if output_format == "table" else ""


def format_row(row: ScoreRow, output_format: str) -> str:
    """One row as a line (with its newline) in ``csv``, ``jsonl`` or ``table`` format.

    File names go in whole: in CSV as they are (bytes that are not UTF-8 included, written back by
    `ROW_FILE_ERRORS`), in JSONL as JSON strings in UTF-8 with an unpaired surrogate written as its
    ``\\uXXXX`` escape (Python's ``surrogateescape`` stands for a byte 0xXX by U+DCXX). The table
    is for people: control characters and such bytes show as escapes (see `display_path`).
    """
    if output_format == "csv":
        line = io.StringIO()
        score = "" if row.score is None else f"{row.score:.4f}"
        csv.writer(line, lineterminator="\n").writerow([row.path, score, row.error or ""])
        return line.getvalue()
    if output_format == "jsonl":
        text = json.dumps(asdict(row), ensure_ascii=False)
        return _SURROGATE.sub(lambda match: f"\\u{ord(match[0]):04x}", text) + "\n"
    score = ("SKIPPED" if row.skipped else "FAILED") if row.score is None else f"{row.score:7.3f}"
    error = f"  ({display_path(row.error.removeprefix(SKIPPED))})" if row.error else ""
    return f"{score:>7}  {display_path(row.path)}{error}\n"


_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def display_path(text: str | os.PathLike) -> str:
    """``text`` for a terminal or log, one line: control characters as escapes (``\\n``, ``\\x1b``),
    the bytes of a name that is not UTF-8 as ``\\xNN``; backslashes are left as they are."""

    def escape(match: re.Match) -> str:
        code = ord(match[0])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte code - 0xDC00
            return f"\\x{code - 0xDC00:02x}"
        return repr(match[0])[1:-1] if code < 0xD800 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, os.fspath(text))


def write_rows(rows: Iterable[ScoreRow], output_format: str, stream, header: bool = True) -> ScoreSummary:
    """Write rows as they come, each flushed (so an interrupted run keeps what it wrote), after the
    header if ``header``; returns the counts of scored, failed and skipped files."""
    summary = ScoreSummary(0, 0)
    if header:
        stream.write(header_line(output_format))
    for row in rows:
        summary.scored += row.score is not None
        summary.skipped += row.skipped
        summary.failed += row.score is None and not row.skipped
        stream.write(format_row(row, output_format))
        stream.flush()
    return summary


def open_row_file(path: str | Path, mode: str):
    """Open an output for text, with the encoding and error handler of `format_row`."""
    return open(path, mode, encoding=ROW_FILE_ENCODING, errors=ROW_FILE_ERRORS, newline="")


def read_rows(path: str | Path, output_format: str | None = None) -> list[ScoreRow]:
    """The rows of a CSV or JSONL file written by `write_rows` (format from the suffix, else from
    the first character). A last line without its newline was cut off by an interruption and is
    ignored. Raises `ValueError` naming the file and line for anything else malformed."""
    with open_row_file(path, "r") as stream:
        text = stream.read()
    complete = text[: text.rfind("\n") + 1]
    output_format = output_format or ROW_FILE_FORMATS.get(Path(path).suffix.lower())
    output_format = output_format or ("jsonl" if complete.startswith("{") else "csv")
    if output_format == "jsonl":
        return [_jsonl_row(line, path, number) for number, line in enumerate(complete.split("\n"), 1) if line]
    records = csv.DictReader(io.StringIO(complete, newline=""))
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
        return open_row_file(path, "w")
    with open(path, "rb+") as stream:
        data = stream.read()
        stream.truncate(data.rfind(b"\n") + 1)
    return open_row_file(path, "a")


def write_atomically(path: Path, rows: list[ScoreRow], output_format: str) -> None:
    """Replace ``path`` by a file holding ``rows``; a reader sees the old file or the new one, whole."""
    temporary = path.with_name(f"{path.name}.tmp")
    with open_row_file(temporary, "w") as stream:
        stream.write(header_line(output_format) + "".join(format_row(row, output_format) for row in rows))
        stream.flush()
        os.fsync(stream.fileno())
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
    skipped: Iterable[ScoreRow] = (),
) -> ScoreSummary:
    """Score ``paths`` into the CSV or JSONL file ``output``, sharded over ``state``'s processes
    (an accelerate ``PartialState``), resuming from what ``output`` and its part files hold when
    ``resume`` (else replacing them); the ``skipped`` rows of the search join them at the end. All
    processes return the same summary of this run's files."""
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
        skipped = list(skipped)
        merged = merge_rows([*previous_rows(output, output_format), *skipped], paths)
        write_atomically(output, merged, output_format)
        for part in part_files(output):
            part.unlink()
        summary = [_summarise(merged, paths, kept, len(skipped))]
    if state.num_processes > 1:
        broadcast_object_list(summary)
    return summary[0]


def _summarise(merged: list[ScoreRow], paths: list[Path], kept: dict[str, ScoreRow], skipped: int) -> ScoreSummary:
    final = {row.path: row for row in merged}
    new = [final[str(path)] for path in paths if str(path) not in kept]
    failed = sum(row.score is None for row in new)
    return ScoreSummary(scored=len(new) - failed, failed=failed, kept=len(paths) - len(new), skipped=skipped)
