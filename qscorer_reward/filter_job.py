"""The ``qscorer filter`` job: copy, move or symlink the images that score at least a threshold.

Each passing file goes to ``DEST / its path relative to the source folder`` (a file named directly
goes to ``DEST / its name``). Nothing at a destination is ever overwritten: a destination that
already holds the same file (an earlier run placed it) counts as done, one that holds anything else
(or that an earlier file of the same run claimed) is reported and the file left where it is. Only
passing files are moved; files without a score are reported and left alone.

A copy is written to a hidden temporary file in the destination folder, flushed to the disk and
only then given its name, so an interrupted or failed copy (a full disk, say) never leaves a file
that looks complete; a move deletes its source only once the copy in place is verified identical.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from .scoring_job import ScoreRow, display_path

FILTER_MODES = ("copy", "move", "symlink")
COPY_CHUNK_BYTES = 1 << 20
# What `os.link` raises where the file system cannot hard-link (FAT, exFAT, some network mounts) or
# the two paths are on different file systems: a copy is made instead.
NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
TAKEN = "exists and is not this file"
TAKEN_IN_THIS_RUN = "is taken by an earlier file of this run"


@dataclass
class FilterSummary:
    """Counts of files that passed and were placed, passed and were already in place, fell below
    the threshold, had no score, passed but whose destination holds something else (``conflicts``),
    passed but could not be placed (``failed``, with ``failure_reasons``), and that the search
    skipped."""

    passed: int = 0
    present: int = 0
    below: int = 0
    unscored: int = 0
    conflicts: int = 0
    failed: int = 0
    skipped: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return 1 if self.unscored or self.conflicts or self.failed or self.skipped else 0


def rows_from_score_file(rows: list[ScoreRow], paths: list[Path], score_file: str) -> list[ScoreRow]:
    """For each of ``paths``, its row in a previous ``qscorer score`` output (matched by resolved
    path, relative paths taken from the current folder), or a failed row saying it has none."""
    by_file = {Path(row.path).resolve(): row for row in rows}
    return [by_file.get(path.resolve()) or ScoreRow(str(path), None, f"no score in {score_file}") for path in paths]


def place_file(source: Path, destination: Path, mode: str) -> bool:
    """Copy, move or symlink ``source`` to ``destination``, creating its folders.

    Returns ``False`` when ``destination`` already holds this very placement (`is_placed`): nothing
    is written then, and a move whose copy was in place already only deletes its source. Raises
    `FileExistsError` (and changes nothing) when ``destination`` holds anything else, and
    `OSError` when the file cannot be placed; no partial file is left behind.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(destination):
        if not is_placed(source, destination, mode):
            raise FileExistsError(errno.EEXIST, TAKEN, str(destination))
        if mode == "move" and not _same_entry(source, destination):
            os.unlink(source)  # an earlier move was stopped between its copy and this
        return False
    if mode == "symlink":
        os.symlink(source.resolve(), destination)  # fails if something appeared meanwhile
    elif mode == "copy":
        _copy_into_place(source, destination, verify=False)
    else:
        if not _hard_link(source, destination):  # another file system: copy, check, then delete
            _copy_into_place(source, destination, verify=True)
        os.unlink(source)
    return True


def _would_place(source: Path, destination: Path, mode: str) -> bool:
    """What `place_file` would return, changing nothing."""
    if os.path.lexists(destination) and not is_placed(source, destination, mode):
        raise FileExistsError(errno.EEXIST, TAKEN, str(destination))
    return not os.path.lexists(destination)


def is_placed(source: Path, destination: Path, mode: str) -> bool:
    """Whether ``destination`` already is what placing ``source`` there would make: a symbolic
    link to it (``symlink``), else a regular file (not a link) with the same bytes."""
    if mode == "symlink":
        return destination.is_symlink() and destination.resolve() == source.resolve()
    return not destination.is_symlink() and destination.is_file() and same_bytes(source, destination)


def same_bytes(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes (sizes first, then a chunked compare)."""
    if os.path.samefile(first, second):
        return True
    if os.path.getsize(first) != os.path.getsize(second):
        return False
    with open(first, "rb") as one, open(second, "rb") as other:
        while True:
            chunk = one.read(COPY_CHUNK_BYTES)
            if chunk != other.read(COPY_CHUNK_BYTES):
                return False
            if not chunk:
                return True


def _same_entry(source: Path, destination: Path) -> bool:
    """Whether the two paths name one directory entry (deleting one would delete the other)."""
    return os.path.realpath(source) == os.path.realpath(destination)


def _hard_link(source: Path, destination: Path) -> bool:
    """Hard-link ``destination`` to ``source`` (a rename that refuses to overwrite); ``False`` where
    the file system cannot (then nothing was made)."""
    try:
        os.link(source, destination)
    except OSError as err:
        if err.errno in NO_HARD_LINK:
            return False
        raise
    return True


def _copy_into_place(source: Path, destination: Path, verify: bool) -> None:
    """Copy ``source`` (contents, then times and permissions) to a temporary file beside
    ``destination``, flush it to the disk, check its size (and, if ``verify``, its bytes), and only
    then give it its name, exclusively. On any error the temporary file is removed."""
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    try:
        try:
            with open(source, "rb") as reader:
                while chunk := reader.read(COPY_CHUNK_BYTES):
                    _write_all(handle, chunk)
            os.fsync(handle)
        finally:
            os.close(handle)
        shutil.copystat(source, temporary)
        complete = os.path.getsize(temporary) == os.path.getsize(source)
        if not complete or (verify and not same_bytes(source, Path(temporary))):
            raise OSError(errno.EIO, "the copy differs from its source (did it change during the copy?)", str(source))
        _rename_exclusive(Path(temporary), destination)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(destination.parent)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view) :]


def _rename_exclusive(temporary: Path, destination: Path) -> None:
    """Give ``temporary`` the name ``destination``, never replacing anything that is there."""
    if _hard_link(temporary, destination):
        os.unlink(temporary)
        return
    if os.path.lexists(destination):  # no hard links here: check, then rename
        raise FileExistsError(errno.EEXIST, TAKEN, str(destination))
    os.rename(temporary, destination)


def _fsync_folder(folder: Path) -> None:
    """Make a new name in ``folder`` durable (where folders can be opened and synced)."""
    with suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def run_filter_job(
    files: list[tuple[Path, Path]],
    rows: Iterable[ScoreRow],
    min_score: float,
    dest: Path,
    mode: str,
    dry_run: bool,
) -> FilterSummary:
    """Place each ``(file, relative path)`` of ``files`` whose row (same order) scores at least
    ``min_score`` under ``dest``. Prints each action on stdout (``would ...`` when ``dry_run``,
    which changes nothing on disk) and each file left out for a reason on stderr."""
    summary = FilterSummary()
    claimed: set[Path] = set()
    for (source, relative), row in zip(files, rows):
        shown = display_path(source)
        if row.score is None:
            summary.unscored += 1
            print(f"skipped {shown}: no score ({display_path(row.error or '')})", file=sys.stderr)
            continue
        if row.score < min_score:
            summary.below += 1
            continue
        destination = dest / relative
        try:
            if destination in claimed:
                raise FileExistsError(errno.EEXIST, TAKEN_IN_THIS_RUN, str(destination))
            placed = _would_place(source, destination, mode) if dry_run else place_file(source, destination, mode)
        except FileExistsError as err:
            summary.conflicts += 1
            why = TAKEN_IN_THIS_RUN if err.strerror == TAKEN_IN_THIS_RUN else TAKEN
            print(f"skipped {shown}: {display_path(destination)} {why}", file=sys.stderr)
            continue
        except OSError as err:
            summary.failed += 1
            reason = err.strerror or str(err)
            summary.failure_reasons[reason] = summary.failure_reasons.get(reason, 0) + 1
            print(f"failed {shown}: cannot {mode} it to {display_path(destination)} ({reason})", file=sys.stderr)
            continue
        claimed.add(destination)
        if not placed:
            summary.present += 1
            continue
        summary.passed += 1
        print(f"{'would ' if dry_run else ''}{mode} {shown} -> {display_path(destination)}  (score {row.score:.3f})")
    return summary
