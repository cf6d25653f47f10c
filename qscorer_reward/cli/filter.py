"""``qscorer filter``: copy, move or symlink the images that score at least a threshold (see
`qscorer_reward.filter_job`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qscorer_reward.filter_job import FILTER_MODES, rows_from_score_file, run_filter_job
from qscorer_reward.scoring_job import read_rows, score_files

from .common import (
    CommandError,
    add_command,
    add_scoring_arguments,
    finite_float,
    load_scorer,
    no_images,
    report_skipped,
    searched_images,
    show_progress,
)

DONE_VERBS = {"copy": "copied", "move": "moved", "symlink": "symlinked"}


def add_filter_command(commands) -> None:
    filter_ = add_command(commands, "filter", "copy, move or symlink the images that score at least a threshold")
    filter_.add_argument("sources", nargs="+", metavar="SRC", help="image files and folders (searched recursively)")
    filter_.add_argument(
        "--min-score", type=finite_float, required=True, help="keep images scoring at least this (required)"
    )
    filter_.add_argument(
        "--dest", required=True, help="folder to place them in, folder structure kept (required; created if needed)"
    )
    filter_.add_argument("--mode", choices=FILTER_MODES, default="copy", help="how to place them (default: copy)")
    filter_.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    filter_.add_argument(
        "--scores", default=None, help="take scores from a `qscorer score` CSV/JSONL output (default: score them now)"
    )
    filter_.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    add_scoring_arguments(filter_, "e.g. cuda, cuda:1, cpu (default: cpu)")
    filter_.set_defaults(run=_filter_command)


def _filter_command(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    search = searched_images(args.sources, exclude=[dest])  # never its own earlier output again
    report_skipped(search.skipped)
    files = list(dict(search.files).items())
    paths = [file for file, _ in files]
    if not files:
        return no_images(search)
    if not args.dry_run:
        _check_writable(dest)
    if args.scores:
        try:
            rows = rows_from_score_file(read_rows(args.scores), paths, args.scores)
        except (OSError, ValueError) as err:
            raise CommandError(f"cannot read --scores: {err}") from err
    else:
        scorer = load_scorer(args, args.device, report=not args.quiet)
        _warn_outside_score_range(args.min_score, scorer.score_range)
        rows = score_files(scorer, paths, args.batch_size, show_progress(args))
    summary = run_filter_job(files, rows, args.min_score, dest, args.mode, args.dry_run)
    summary.skipped = len(search.skipped)
    verb = f"would {args.mode}" if args.dry_run else DONE_VERBS[args.mode]
    parts = [f"{verb} {summary.passed} image(s) with score >= {args.min_score:g}"]
    if summary.present:
        parts.append(f"{summary.present} already in place")
    parts.append(
        f"{summary.below} below, {summary.unscored} without a score, {summary.conflicts} skipped (destination exists)"
    )
    if summary.failed:
        reasons = ", ".join(f"{count} {reason}" for reason, count in summary.failure_reasons.items())
        parts.append(f"{summary.failed} FAILED to be placed ({reasons}; nothing partial left)")
    if summary.skipped:
        parts.append(f"{summary.skipped} skipped by the search")
    print("; ".join(parts), file=sys.stderr)
    return summary.exit_status


def _check_writable(folder: Path) -> None:
    """Refuse, before any model is loaded, a destination that cannot be written: a file with that
    name, or a folder (or, if it does not exist yet, its nearest existing parent) that refuses a new
    file (read-only, or no permission)."""
    import tempfile

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"--dest {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CommandError(
            f"--dest {folder}: cannot write in {existing} ({err.strerror}); choose another --dest"
        ) from err


def _warn_outside_score_range(min_score: float, score_range: tuple[float, float]) -> None:
    low, high = score_range
    if min_score > high:
        print(f"warning: --min-score {min_score:g} is above the model's score range [{low:g}, {high:g}]: "
              "no image can pass", file=sys.stderr)  # fmt: skip
    elif min_score <= low:
        print(f"warning: --min-score {min_score:g} is at or below the model's score range [{low:g}, {high:g}]: "
              "every scored image passes", file=sys.stderr)  # fmt: skip
