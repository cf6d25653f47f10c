"""The ``qscorer`` command line: one module per subcommand (or pair of them), registered in `COMMANDS`.

- ``qscorer score PATH...`` scores image files and folders (`score`).
- ``qscorer filter SRC... --min-score X --dest DIR`` copies, moves or symlinks the images that score
  at least X (`filter`).
- ``qscorer report SCORES --output report.html`` writes an offline HTML gallery of a ``score``
  output, for choosing a threshold (`report`).
- ``qscorer train --config FILE.yaml`` fine-tunes a Q-Scorer; ``qscorer eval`` reports SRCC, PLCC,
  KRCC and RMSE on a dataset (`training`).
- ``qscorer serve`` runs the reward service on Ray Serve (`serve`).
- ``qscorer convert-official LORA_DIR --base-model BASE_DIR --output OUT`` converts the paper's
  released checkpoint to this package's format (`convert`).

A subcommand is a function that adds its parser (with `common.add_command`), points ``run`` at the
function that runs it and, if some options exclude each other, ``check`` at a function saying why;
plus one line in `COMMANDS`. Options are checked before anything heavy is imported: torch,
transformers and accelerate load only once a command runs, so ``--help`` and argument errors
answer at once. A user error (`CommandError`, a missing extra, or an `OSError` / `ValueError` such
as a missing folder or an unreadable checkpoint) is one line on stderr and exit status 2;
``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from qscorer_reward.extras import MissingExtraError
from qscorer_reward.scoring_job import display_path

from .common import CommandError
from .convert import add_convert_official_command
from .filter import add_filter_command
from .report import add_report_command
from .score import add_score_command
from .serve import add_serve_command
from .training import add_eval_command, add_train_command

# One line per subcommand: the function that adds its parser.
COMMANDS = (
    add_score_command,
    add_filter_command,
    add_report_command,
    add_train_command,
    add_eval_command,
    add_serve_command,
    add_convert_official_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qscorer", description="Q-Scorer image quality scores (MOS scale 1..5).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = args.check(args) if hasattr(args, "check") else None
    if problem:
        parser.error(problem)
    try:
        return args.run(args)
    except (CommandError, MissingExtraError, OSError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(err: Exception) -> str:
    """An exception as one line: an `OSError` as ``FILE: reason``, anything else as its message."""
    if isinstance(err, OSError) and err.strerror and not isinstance(err, CommandError):
        where = f"{display_path(err.filename)}: " if err.filename else ""
        return f"{where}{err.strerror}"
    return " ".join(str(err).split()) or type(err).__name__


__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]
