"""The ``qscorer filter`` job: copy, move or symlink the images that score at least a threshold.

Each passing file goes to ``DEST / its path relative to the source folder`` (a file named directly
goes to ``DEST / its name``). A destination that already exists, or that an earlier file of the
same run claimed, is never overwritten: the file is reported and left where it is. Only passing
files are moved; files without a score are reported and left alone.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .scoring_job import ScoreRow

FILTER_MODES = ("copy", "move", "symlink")


@dataclass
class FilterSummary:
    """Counts of files that passed (and were placed), fell below the threshold, had no score, or
    passed but were not placed because their destination exists."""

    passed: int = 0
    below: int = 0
    unscored: int = 0
    conflicts: int = 0

    @property
    def exit_status(self) -> int:
        return 1 if self.unscored or self.conflicts else 0


def rows_from_score_file(rows: list[ScoreRow], paths: list[Path], score_file: str) -> list[ScoreRow]:
    """For each of ``paths``, its row in a previous ``qscorer score`` output (matched by resolved
    path, relative paths taken from the current folder), or a failed row saying it has none."""
    by_file = {Path(row.path).resolve(): row for row in rows}
    return [by_file.get(path.resolve()) or ScoreRow(str(path), None, f"no score in {score_file}") for path in paths]


def place_file(source: Path, destination: Path, mode: str) -> None:
    """Copy, move or symlink ``source`` to ``destination``, creating its folders; raises
    `FileExistsError` (and changes nothing) if ``destination`` exists."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(source.resolve(), destination)
    elif mode == "copy":
        _copy_exclusive(source, destination)
    else:
        _move_exclusive(source, destination)


def _copy_exclusive(source: Path, destination: Path) -> None:
    """Copy contents and metadata; the destination is created exclusively, so never overwritten."""
    with open(source, "rb") as reader, open(destination, "xb") as writer:
        shutil.copyfileobj(reader, writer)
    shutil.copystat(source, destination)


def _move_exclusive(source: Path, destination: Path) -> None:
    """A hard link then unlinking the source (a rename that refuses to overwrite); a copy where
    hard links are not possible (another file system)."""
    try:
        os.link(source, destination)
    except FileExistsError:
        raise
    except OSError:
        _copy_exclusive(source, destination)
    os.unlink(source)


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
        if row.score is None:
            summary.unscored += 1
            print(f"skipped {source}: no score ({row.error})", file=sys.stderr)
            continue
        if row.score < min_score:
            summary.below += 1
            continue
        destination = dest / relative
        try:
            if destination in claimed or os.path.lexists(destination):
                raise FileExistsError(destination)
            if not dry_run:
                place_file(source, destination, mode)
        except FileExistsError:
            summary.conflicts += 1
            print(f"skipped {source}: {destination} exists", file=sys.stderr)
            continue
        claimed.add(destination)
        summary.passed += 1
        print(f"{'would ' if dry_run else ''}{mode} {source} -> {destination}  (score {row.score:.3f})")
    return summary
