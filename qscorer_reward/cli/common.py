"""What the subcommands of ``qscorer`` share: the user error, the parser of a subcommand and the
options every scoring command takes, loading the scorer, and reporting what a search skipped."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

from qscorer_reward.config import DTYPES
from qscorer_reward.scoring_job import SKIPPED, SearchError, display_path, search_images

SKIPPED_LISTED = 20  # skipped entries listed on stderr; all of them are in the output


class CommandError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def add_command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every subcommand has (``--debug``)."""
    parser = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the Python traceback instead of a one-line message"
    )
    return parser


def add_scoring_arguments(parser: argparse.ArgumentParser, device_help: str) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--device", default=None, help=device_help)
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="backbone weight dtype (default: as the checkpoint is stored)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (shown only when stderr is a terminal)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no model line; errors and the summary stay"
    )


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def load_scorer(args: argparse.Namespace, device, report: bool = True, model: str | None = None):
    """The scorer named by ``model`` (default ``--model``) on ``device`` (checked first); if
    ``report``, its load warnings and a line naming it are printed on stderr."""
    import torch
    from transformers.utils import logging as transformers_logging

    from qscorer_reward.scorer import QScorer

    model = model if model is not None else args.model
    device = checked_device(device)
    transformers_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            scorer = QScorer.from_pretrained(
                model, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None
            )
        except (OSError, ValueError) as err:
            raise CommandError(f"cannot load the model {model or '(bundled default)'}: {err}") from err
    if report:
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        name = scorer.config.model_name or model or "bundled default"
        low, high = scorer.score_range
        nominal = " (nominally: unclamped)" if scorer.config.score_bound == "none" else ""
        print(f"model: {name}; scores in [{low:g}, {high:g}]{nominal}, higher is better", file=sys.stderr)
    return scorer


def checked_device(name):
    """``name`` (a ``--device`` value, a torch device or ``None``) if torch can use it here, else a
    `CommandError` saying what to use instead."""
    if name is None or not isinstance(name, str):
        return name
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CommandError(f"--device {name}: not a device name ({err}); use e.g. cpu, cuda, cuda:1 or mps") from err
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise CommandError(
            f"--device {name}: no {device.type} device is available to this torch ({torch.__version__}); "
            "use --device cpu, or install a torch build for your accelerator"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise CommandError(f"--device {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return name


def show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only for a person watching: stderr is a terminal, and no --quiet/--no-progress."""
    return not (args.quiet or args.no_progress) and sys.stderr.isatty()


def report_skipped(skipped: list, where: str | None = None) -> None:
    """List what the search skipped on stderr: all of it, or, when ``where`` (the output) lists it
    too, the first `SKIPPED_LISTED`."""
    listed = skipped if where is None else skipped[:SKIPPED_LISTED]
    for row in listed:
        print(f"skipped {display_path(row.path)}: {row.error.removeprefix(SKIPPED)}", file=sys.stderr)
    if len(listed) < len(skipped):
        print(f"... and {len(skipped) - SKIPPED_LISTED} more skipped, all listed in {where}", file=sys.stderr)


def no_images(search) -> int:
    skipped = f" ({len(search.skipped)} skipped)" if search.skipped else ""
    print(f"no image files found{skipped}", file=sys.stderr)
    return 1


def searched_images(paths, exclude=()):
    """`qscorer_reward.scoring_job.search_images`, a folder that cannot be searched a `CommandError`."""
    try:
        return search_images(paths, exclude)
    except SearchError as err:
        raise CommandError(f"{err}; check the folder's permissions") from err
