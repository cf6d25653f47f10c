"""``qscorer score``: score image files and folders into a table, CSV or JSONL (resumable, sharded
under ``accelerate launch``; see `qscorer_reward.scoring_job`), or on Ray Data with ``--engine ray``
(`qscorer_reward.serving.ray_engine`); ``--report`` then writes the HTML gallery of the scores."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from qscorer_reward.scoring_job import (
    SearchError,
    existing_output_files,
    row_file_format,
    run_resumable_job,
    score_files,
    write_rows,
)

from .common import (
    CommandError,
    add_command,
    add_scoring_arguments,
    load_scorer,
    no_images,
    positive_int,
    report_skipped,
    searched_images,
    show_progress,
)


def add_score_command(commands) -> None:
    score = add_command(commands, "score", "score image files and folders")
    score.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    score.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    score.add_argument(
        "--format",
        choices=["table", "csv", "jsonl"],
        default=None,
        help="output format (default: from the --output suffix, .csv or .jsonl, else table)",
    )
    score.add_argument("--output", help="write results to this file, row by row (default: stdout); locked while in use")
    existing = score.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue --output: keep its scored rows, score the rest"
    )
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    score.add_argument(
        "--report", metavar="PAGE.html", help="then write `qscorer report` of --output (CSV or JSONL) (default: none)"
    )
    score.add_argument(
        "--engine", choices=["accelerate", "ray"], default="accelerate",
        help="accelerate (default: this machine, or `accelerate launch`) or ray (Ray Data, across a Ray cluster; "
        "PATHs may then also be URIs such as s3://bucket/folder)",
    )  # fmt: skip
    score.add_argument("--address", default=None, help="with --engine ray: the Ray cluster (default: a local one)")
    score.add_argument(
        "--actors",
        type=positive_int,
        default=None,
        help="with --engine ray: scorer actors (default: one per GPU, else 1)",
    )
    add_scoring_arguments(score, "e.g. cuda, cuda:1, cpu (default: cpu; under accelerate launch: the process's device)")
    score.set_defaults(run=_score_command, check=_check_score_options)


def _check_score_options(args: argparse.Namespace) -> str | None:
    """Why the options cannot go together (a usage error), or ``None``."""
    if args.engine != "ray" and (args.address or args.actors):
        return "--address and --actors go with --engine ray"
    if args.engine == "ray" and args.device:
        return "--device goes with the default engine: Ray actors score on their GPU when they have one"
    return None


def _score_command(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        with _output_locked(args.output):
            return _ray_score_command(args)
    with _output_locked(args.output) as refusal:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, parse_flag_from_env

        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `Accelerator` reads it
        refusal = [refusal]
        if state.num_processes > 1:
            broadcast_object_list(refusal)  # process 0 took the lock, or was refused, for all
        if refusal[0]:
            raise CommandError(refusal[0])
        output_format = row_file_format(args.output or "", args.format)
        problem = _score_output_problem(args, output_format, state.num_processes)
        if problem:
            raise CommandError(problem)
        search = searched_images(args.paths)
        if state.is_main_process:
            report_skipped(search.skipped, args.output or "the output")
        paths = search.paths
        if not paths:
            return no_images(search)
        device = args.device or (state.device if state.num_processes > 1 else None)
        scorer = load_scorer(args, device, report=state.is_main_process and not args.quiet)
        progress = show_progress(args)
        if output_format == "table" or not args.output:
            summary = _write_stream(args, output_format, score_files(scorer, paths, args.batch_size, progress), search)
        else:
            summary = run_resumable_job(
                scorer, paths, Path(args.output), output_format, state,
                resume=args.resume, batch_size=args.batch_size, progress=progress, skipped=search.skipped,
            )  # fmt: skip
        if state.is_main_process:
            kept = f"; {summary.kept} kept from {args.output}" if args.resume else ""
            skipped = f", {summary.skipped} skipped" if summary.skipped else ""
            print(f"scored {summary.scored} image(s), {summary.failed} failed{skipped}{kept}", file=sys.stderr)
        if args.report and state.is_main_process:
            from qscorer_reward.report import ReportModel, run_report

            model = ReportModel.from_config(scorer.config, args.model)
            report_status = run_report(Path(args.output), Path(args.report), model=model, sources=args.paths)
            return max(summary.exit_status, min(report_status, 1))  # the scores are written whatever the page does
        return summary.exit_status


def _score_output_problem(args: argparse.Namespace, output_format: str, num_processes: int) -> str | None:
    """Why the ``score`` options cannot run as given, or ``None``."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        return (
            f"launched as {launched} processes but accelerate set up {num_processes} "
            "(on a machine without GPUs, set ACCELERATE_USE_CPU=1)"
        )
    if args.resume and not args.output:
        return "--resume needs --output, the file to continue"
    if (args.resume or num_processes > 1) and output_format == "table":
        return "--resume and sharded runs need a CSV or JSONL --output (e.g. scores.csv)"
    if num_processes > 1 and not args.output:
        return f"a run on {num_processes} processes needs --output, the file to merge their rows into"
    existing = existing_output_files(Path(args.output)) if args.output else []
    if existing and not (args.resume or args.overwrite):
        return f"{existing[0]} exists: pass --resume to continue it or --overwrite to replace it"
    if args.report:
        from qscorer_reward.report import report_output_problem

        if output_format == "table" or not args.output:
            return "--report needs a CSV or JSONL --output to build the page from (e.g. --output scores.csv)"
        return report_output_problem(Path(args.report), Path(args.output))
    return None


@contextlib.contextmanager
def _output_locked(output: str | None):
    """Hold the lock of ``output`` (`qscorer_reward.output_lock`) for the block, in the process that
    writes it: the only one, or process 0 of a sharded run (whose others learn of a refusal from
    it); taken before the model loads, so a second run is refused at once."""
    from qscorer_reward.output_lock import OutputInUse, locked_output

    refusal = None
    with contextlib.ExitStack() as stack:
        if output and int(os.environ.get("RANK", "0")) == 0:
            try:
                stack.enter_context(locked_output(Path(output)))
            except OutputInUse as err:
                refusal = str(err)
            except OSError as err:
                refusal = f"cannot write --output {output}: {err.strerror or err}"
        if refusal and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise CommandError(refusal)
        yield refusal


def _write_stream(args: argparse.Namespace, output_format: str, rows, search):
    """Write the rows, then the skipped ones, to ``--output`` (not resumable) or stdout."""
    from itertools import chain

    from qscorer_reward.scoring_job import ROW_FILE_ERRORS, open_row_file

    rows = chain(rows, search.skipped)
    if args.output:
        with open_row_file(args.output, "w") as stream:
            return write_rows(rows, output_format, stream)
    errors = getattr(sys.stdout, "errors", None)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and output_format == "csv":  # file names that are not UTF-8 go out as they are
        reconfigure(errors=ROW_FILE_ERRORS)
    try:
        return write_rows(rows, output_format, sys.stdout)
    finally:
        if reconfigure is not None and errors:
            reconfigure(errors=errors)


def _ray_score_command(args: argparse.Namespace) -> int:
    from qscorer_reward.serving import prepare_ray_environment

    prepare_ray_environment(args.address)  # before Ray is imported
    from qscorer_reward.serving.ray_engine import find_inputs, run_ray_job

    output_format = row_file_format(args.output or "", args.format)
    problem = _score_output_problem(args, output_format, 1)
    if problem:
        raise CommandError(problem)
    try:
        files, skipped = find_inputs(args.paths)
    except SearchError as err:
        raise CommandError(f"{err}; check the folder's permissions") from err
    except (OSError, ValueError) as err:  # a URI that cannot be listed: unknown scheme, no access
        raise CommandError(f"cannot list the inputs: {err}") from err
    report_skipped(skipped, args.output or "the output")
    if not files:
        print(f"no image files found{f' ({len(skipped)} skipped)' if skipped else ''}", file=sys.stderr)
        return 1
    try:
        summary = run_ray_job(
            files, Path(args.output) if args.output else None, output_format,
            model=args.model, dtype=args.dtype, resume=args.resume, batch_size=args.batch_size,
            actors=args.actors, address=args.address, progress=show_progress(args), skipped=skipped,
        )  # fmt: skip
    except ValueError as err:  # an output to resume that is not one `score` wrote
        raise CommandError(f"cannot resume: {err}") from err
    kept = f"; {summary.kept} kept from {args.output}" if args.resume else ""
    skipped_count = f", {summary.skipped} skipped" if summary.skipped else ""
    print(f"scored {summary.scored} image(s), {summary.failed} failed{skipped_count}{kept}", file=sys.stderr)
    return summary.exit_status
