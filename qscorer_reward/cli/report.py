"""``qscorer report``: an offline HTML gallery of a ``score`` output, for choosing a threshold (see
`qscorer_reward.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CommandError, add_command


def add_report_command(commands) -> None:
    report = add_command(commands, "report", "an offline HTML gallery of `score` output, to choose a threshold")
    report.add_argument("scores", metavar="SCORES", help="a `qscorer score` CSV or JSONL output")
    report.add_argument("--output", default="report.html", help="the page to write (default: report.html)")
    report.add_argument("--title", default=None, help="the page's heading (default: from the SCORES file name)")
    report.add_argument(
        "--model", default=None, help="checkpoint the scores came from, for its name and range (default: bundled)"
    )
    report.set_defaults(run=_report_command)


def _report_command(args: argparse.Namespace) -> int:
    from qscorer_reward.report import report_model, run_report

    try:
        model = report_model(args.model)
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read --model: {err}") from err
    return run_report(Path(args.scores), Path(args.output), model=model, title=args.title)
