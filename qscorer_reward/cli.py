"""The ``qscorer`` command line.

- ``qscorer score PATH...`` scores image files and folders (resumable, sharded under
  ``accelerate launch``; see `qscorer_reward.scoring_job`); ``--engine ray`` scores them on Ray
  Data instead (see `qscorer_reward.serving.ray_engine`).
- ``qscorer filter SRC... --min-score X --dest DIR`` copies, moves or symlinks the images that score
  at least X (see `qscorer_reward.filter_job`).
- ``qscorer train --config FILE.yaml`` fine-tunes a Q-Scorer (also under ``accelerate launch``).
- ``qscorer eval --checkpoint DIR (--dataset NAME --root DIR | --manifest FILE)`` reports SRCC,
  PLCC, KRCC and RMSE on a dataset.
- ``qscorer report SCORES --output report.html`` writes an offline HTML gallery of a ``score``
  output, for choosing a threshold (see `qscorer_reward.report`).
- ``qscorer serve`` runs the reward service (Ray Serve, see `qscorer_reward.serving.app`).
- ``qscorer convert-official LORA_DIR --base-model BASE_DIR --output OUT`` converts the paper's
  released checkpoint to this package's format (see `qscorer_reward.official_checkpoint`).

A subcommand is a function that adds its parser (with `add_command`) and points ``run`` at the
function that runs it, plus one line in `COMMANDS`. Options are checked before anything heavy is
imported: torch, transformers and accelerate load only once a command runs, so ``--help`` and
argument errors answer at once. A user error (`CommandError`, a missing extra, or an `OSError` /
`ValueError` such as a missing folder or an unreadable checkpoint) is one line on stderr and exit status 2;
``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

from .config import DTYPES
from .extras import MissingExtraError
from .filter_job import FILTER_MODES, rows_from_score_file, run_filter_job
from .scoring_job import (
    SKIPPED,
    SearchError,
    display_path,
    existing_output_files,
    read_rows,
    row_file_format,
    run_resumable_job,
    score_files,
    search_images,
    write_rows,
)

DONE_VERBS = {"copy": "copied", "move": "moved", "symlink": "symlinked"}
SKIPPED_LISTED = 20  # skipped entries listed on stderr; all of them are in the output


class CommandError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def _load_scorer(args: argparse.Namespace, device, report: bool = True, model: str | None = None):
    """The scorer named by ``model`` (default ``--model``) on ``device`` (checked first); if
    ``report``, its load warnings and a line naming it are printed on stderr."""
    import torch
    from transformers.utils import logging as transformers_logging

    from .scorer import QScorer

    model = model if model is not None else args.model
    device = _checked_device(device)
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


def _checked_device(name):
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


def _show_progress(args: argparse.Namespace) -> bool:
    """A progress bar only for a person watching: stderr is a terminal, and no --quiet/--no-progress."""
    return not (args.quiet or args.no_progress) and sys.stderr.isatty()


def _warn_outside_score_range(min_score: float, score_range: tuple[float, float]) -> None:
    low, high = score_range
    if min_score > high:
        print(f"warning: --min-score {min_score:g} is above the model's score range [{low:g}, {high:g}]: "
              "no image can pass", file=sys.stderr)  # fmt: skip
    elif min_score <= low:
        print(f"warning: --min-score {min_score:g} is at or below the model's score range [{low:g}, {high:g}]: "
              "every scored image passes", file=sys.stderr)  # fmt: skip


def _report_skipped(skipped: list, where: str | None = None) -> None:
    """List what the search skipped on stderr: all of it, or, when ``where`` (the output) lists it
    too, the first `SKIPPED_LISTED`."""
    listed = skipped if where is None else skipped[:SKIPPED_LISTED]
    for row in listed:
        print(f"skipped {display_path(row.path)}: {row.error.removeprefix(SKIPPED)}", file=sys.stderr)
    if len(listed) < len(skipped):
        print(f"... and {len(skipped) - SKIPPED_LISTED} more skipped, all listed in {where}", file=sys.stderr)


def _no_images(search) -> int:
    skipped = f" ({len(search.skipped)} skipped)" if search.skipped else ""
    print(f"no image files found{skipped}", file=sys.stderr)
    return 1


def _search(paths, exclude=()):
    try:
        return search_images(paths, exclude)
    except SearchError as err:
        raise CommandError(f"{err}; check the folder's permissions") from err


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
        from .report import report_output_problem

        if output_format == "table" or not args.output:
            return "--report needs a CSV or JSONL --output to build the page from (e.g. --output scores.csv)"
        return report_output_problem(Path(args.report), Path(args.output))
    return None


@contextlib.contextmanager
def _output_locked(output: str | None):
    """Hold the lock of ``output`` (`qscorer_reward.output_lock`) for the block, in the process that
    writes it: the only one, or process 0 of a sharded run (whose others learn of a refusal from
    it); taken before the model loads, so a second run is refused at once."""
    from .output_lock import OutputInUse, locked_output

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
        search = _search(args.paths)
        if state.is_main_process:
            _report_skipped(search.skipped, args.output or "the output")
        paths = search.paths
        if not paths:
            return _no_images(search)
        device = args.device or (state.device if state.num_processes > 1 else None)
        scorer = _load_scorer(args, device, report=state.is_main_process and not args.quiet)
        progress = _show_progress(args)
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
            from .report import ReportModel, run_report

            model = ReportModel.from_config(scorer.config, args.model)
            report_status = run_report(Path(args.output), Path(args.report), model=model, sources=args.paths)
            return max(summary.exit_status, min(report_status, 1))  # the scores are written whatever the page does
        return summary.exit_status


def _local_ray_environment(address: str | None) -> None:
    """Before Ray is imported: a local instance (no ``address``) on loopback, without usage report;
    Ray Data logs errors only: not its progress, nor its notes on how it stores the paths (the
    user's own ``RAY_DATA_LOG_LEVEL`` wins)."""
    from .serving import LOCAL_RAY_ENVIRONMENT

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    if address is None:
        for name, value in LOCAL_RAY_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def _ray_score_command(args: argparse.Namespace) -> int:
    _local_ray_environment(args.address)
    from .serving.ray_engine import find_inputs, run_ray_job

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
    _report_skipped(skipped, args.output or "the output")
    if not files:
        print(f"no image files found{f' ({len(skipped)} skipped)' if skipped else ''}", file=sys.stderr)
        return 1
    try:
        summary = run_ray_job(
            files, Path(args.output) if args.output else None, output_format,
            model=args.model, dtype=args.dtype, resume=args.resume, batch_size=args.batch_size,
            actors=args.actors, address=args.address, progress=_show_progress(args), skipped=skipped,
        )  # fmt: skip
    except ValueError as err:  # an output to resume that is not one `score` wrote
        raise CommandError(f"cannot resume: {err}") from err
    kept = f"; {summary.kept} kept from {args.output}" if args.resume else ""
    skipped_count = f", {summary.skipped} skipped" if summary.skipped else ""
    print(f"scored {summary.scored} image(s), {summary.failed} failed{skipped_count}{kept}", file=sys.stderr)
    return summary.exit_status


def _serve_command(args: argparse.Namespace) -> int:
    _local_ray_environment(args.address)
    from .serving.app import ServiceSettings, run_service
    from .serving.http_api import TOKEN_ENVIRONMENT_VARIABLE, ServiceLimits

    model = args.model
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # the replicas' working folder is not ours
    settings = ServiceSettings(
        model=model,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_ms=args.batch_wait_timeout_ms,
        token=args.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None,
        limits=ServiceLimits(
            max_images_per_request=args.max_images_per_request,
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_image_pixels=args.max_image_pixels,
        ),
    )
    return run_service(
        settings, host=args.host, port=args.port, replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica, num_gpus_per_replica=args.num_gpus_per_replica,
        address=args.address, name=args.name, route_prefix=args.route_prefix, detach=args.detach,
    )  # fmt: skip


def _write_stream(args: argparse.Namespace, output_format: str, rows, search):
    """Write the rows, then the skipped ones, to ``--output`` (not resumable) or stdout."""
    from itertools import chain

    from .scoring_job import ROW_FILE_ERRORS, open_row_file

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


def _filter_command(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    search = _search(args.sources, exclude=[dest])  # never its own earlier output again
    _report_skipped(search.skipped)
    files = list(dict(search.files).items())
    paths = [file for file, _ in files]
    if not files:
        return _no_images(search)
    if not args.dry_run:
        _check_writable(dest)
    if args.scores:
        try:
            rows = rows_from_score_file(read_rows(args.scores), paths, args.scores)
        except (OSError, ValueError) as err:
            raise CommandError(f"cannot read --scores: {err}") from err
    else:
        scorer = _load_scorer(args, args.device, report=not args.quiet)
        _warn_outside_score_range(args.min_score, scorer.score_range)
        rows = score_files(scorer, paths, args.batch_size, _show_progress(args))
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


def _train_command(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from .training.config import TrainingConfig
    from .training.trainer import ScoreTokenTrainer

    config = TrainingConfig.from_file(args.config)
    overrides = {"output_dir": args.output_dir, "max_steps": args.max_steps}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.__post_init__()
    resume = {"auto": "auto", "none": None}.get(args.resume, args.resume)
    transformers_logging.disable_progress_bar()  # transformers' "Loading weights" bar, as for score
    ScoreTokenTrainer(config).train(resume=resume)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from .training.config import DatasetConfig
    from .training.evaluation import dataset_metrics, format_table, predict, write_report
    from .training.sources import load_records

    if args.manifest:
        spec = DatasetConfig(
            name=args.name or Path(args.manifest).stem,
            path=args.manifest,
            split=args.split,
            mos_range=args.mos_range,
            test_fraction=args.test_fraction,
        )
    else:
        spec = DatasetConfig(
            name=args.name or args.dataset,
            path=args.root,
            format=args.dataset,
            split=args.split,
            test_fraction=args.test_fraction,
        )
    records = load_records(spec)
    scorer = _load_scorer(args, args.device, report=not args.quiet, model=args.checkpoint)
    scores, failed = predict(
        scorer, records, args.batch_size, progress=_show_progress(args), description=f"eval {spec.name}"
    )
    for path, reason in failed:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    report = {spec.name: dataset_metrics(records, scores)}
    print(format_table(report))
    write_report(
        {
            "checkpoint": str(args.checkpoint),
            "datasets": report,
            "skipped_images": [{"path": path, "reason": reason} for path, reason in failed],
        },
        args.output,
    )
    print(f"scored {len(scores)} of {len(records)} image(s); report written to {args.output}", file=sys.stderr)
    return 0


def _convert_official_command(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from .official_checkpoint import convert_official

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise CommandError(f"{output} exists: pass --overwrite to replace it")
    transformers_logging.disable_progress_bar()
    try:
        converted = convert_official(
            args.checkpoint, args.base_model, output, dtype=getattr(torch, args.dtype) if args.dtype else None
        )
    except ImportError as err:  # the [official] extra, named in the message
        raise CommandError(str(err)) from err
    dtype = converted.model.get_input_embeddings().weight.dtype
    print(f"wrote {output} ({converted.config.model_name}, {dtype}); use it as --model {output}", file=sys.stderr)
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .report import report_model, run_report

    try:
        model = report_model(args.model)
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read --model: {err}") from err
    return run_report(Path(args.scores), Path(args.output), model=model, title=args.title)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every subcommand has (``--debug``)."""
    parser = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the Python traceback instead of a one-line message"
    )
    return parser


def _add_scoring_arguments(parser: argparse.ArgumentParser, device_help: str) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass (default: 16)")
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


def _add_score_command(commands) -> None:
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
        type=_positive_int,
        default=None,
        help="with --engine ray: scorer actors (default: one per GPU, else 1)",
    )
    _add_scoring_arguments(
        score, "e.g. cuda, cuda:1, cpu (default: cpu; under accelerate launch: the process's device)"
    )
    score.set_defaults(run=_score_command)


def _add_filter_command(commands) -> None:
    filter_ = add_command(commands, "filter", "copy, move or symlink the images that score at least a threshold")
    filter_.add_argument("sources", nargs="+", metavar="SRC", help="image files and folders (searched recursively)")
    filter_.add_argument(
        "--min-score", type=_finite_float, required=True, help="keep images scoring at least this (required)"
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
    _add_scoring_arguments(filter_, "e.g. cuda, cuda:1, cpu (default: cpu)")
    filter_.set_defaults(run=_filter_command)


def _add_train_command(commands) -> None:
    train = add_command(commands, "train", "fine-tune a Q-Scorer (score tokens, head, LoRA) from a config")
    train.add_argument("--config", required=True, help="training config, YAML or JSON (required; see docs/training.md)")
    train.add_argument("--output-dir", default=None, help="override the config's output_dir (default: the config's)")
    train.add_argument(
        "--max-steps", type=int, default=None, help="override the config's max_steps (default: the config's)"
    )
    train.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default): continue from the latest checkpoint in output_dir, if any; "
        "'none': start afresh; or a checkpoint directory",
    )
    train.set_defaults(run=_train_command)


def _add_eval_command(commands) -> None:
    from .training.config import DATASET_FORMATS

    evaluate = add_command(commands, "eval", "SRCC / PLCC / KRCC / RMSE of a checkpoint on a dataset")
    evaluate.add_argument(
        "--checkpoint", default=None, help="checkpoint directory or hub id (default: the bundled model)"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", choices=[f for f in DATASET_FORMATS if f != "manifest"], help="official release (or --manifest)"
    )
    source.add_argument(
        "--manifest", help="a CSV or JSONL manifest (image, mos, [mos_std, split, group]) (or --dataset)"
    )
    evaluate.add_argument("--root", help="folder the official release was unpacked into (required with --dataset)")
    evaluate.add_argument("--split", default=None, help="evaluate only this split, e.g. test (default: all records)")
    evaluate.add_argument(
        "--test-fraction", type=float, default=None, help="random split for a dataset without one (default: none)"
    )
    evaluate.add_argument(
        "--mos-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="the manifest's MOS scale, rescaled to 1..5 (default: it is on 1..5 already)",
    )
    evaluate.add_argument(
        "--name", default=None, help="dataset name in the report (default: the dataset or manifest name)"
    )
    evaluate.add_argument("--output", default="eval_report.json", help="JSON report (default: eval_report.json)")
    _add_scoring_arguments(evaluate, "e.g. cuda, cuda:1, cpu (default: cpu)")
    evaluate.set_defaults(run=_eval_command)


def _add_report_command(commands) -> None:
    report = add_command(commands, "report", "an offline HTML gallery of `score` output, to choose a threshold")
    report.add_argument("scores", metavar="SCORES", help="a `qscorer score` CSV or JSONL output")
    report.add_argument("--output", default="report.html", help="the page to write (default: report.html)")
    report.add_argument("--title", default=None, help="the page's heading (default: from the SCORES file name)")
    report.add_argument(
        "--model", default=None, help="checkpoint the scores came from, for its name and range (default: bundled)"
    )
    report.set_defaults(run=_report_command)


def _add_serve_command(commands) -> None:
    serve = add_command(commands, "serve", "run the reward service: POST /score over HTTP (Ray Serve)")
    serve.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    serve.add_argument(
        "--dtype", choices=DTYPES, default=None, help="backbone weight dtype (default: as the checkpoint is stored)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--replicas", type=_positive_int, default=1, help="copies of the model (default: 1)")
    serve.add_argument(
        "--num-cpus-per-replica", type=float, default=1, help="CPUs per replica, also its torch threads (default: 1)"
    )
    serve.add_argument(
        "--num-gpus-per-replica", type=float, default=0, help="GPUs per replica; 1 scores each on a GPU (default: 0)"
    )
    serve.add_argument(
        "--max-batch-size", type=_positive_int, default=32, help="most images per forward pass (default: 32)"
    )
    serve.add_argument(
        "--batch-wait-timeout-ms", type=float, default=10.0, help="how long a batch waits to fill, ms (default: 10)"
    )
    serve.add_argument(
        "--max-images-per-request", type=_positive_int, default=256, help="most images in one request (default: 256)"
    )
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MiB (default: 64)")
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest image, checked from its header before decoding (default: 16777216)",
    )
    serve.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default: none; better: set QSCORER_SERVE_TOKEN)",
    )
    serve.add_argument("--address", default=None, help="deploy onto this Ray cluster (default: start a local one)")
    serve.add_argument("--name", default="qscorer", help="the Serve application's name (default: qscorer)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the service (default: /)")
    serve.add_argument(
        "--detach", action="store_true", help="with --address: deploy and return, leaving it running (default: off)"
    )
    serve.set_defaults(run=_serve_command)


def _add_convert_official_command(commands) -> None:
    convert = add_command(
        commands,
        "convert-official",
        "convert the paper's released Q-Scorer (LoRA on mPLUG-Owl2) to this package's format",
    )
    convert.add_argument(
        "checkpoint", metavar="LORA_DIR", help="the release: a folder or hub id (2kxx/Qscorer_lora_5_1)"
    )
    convert.add_argument(
        "--base-model", required=True, help="its base: a folder or hub id (MAGAer13/mplug-owl2-llama2-7b) (required)"
    )
    convert.add_argument("--output", required=True, help="the checkpoint folder to write (required)")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the base's)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: refuse)")
    convert.set_defaults(run=_convert_official_command)


# One line per subcommand: the function that adds its parser.
COMMANDS = (
    _add_score_command,
    _add_filter_command,
    _add_report_command,
    _add_train_command,
    _add_eval_command,
    _add_serve_command,
    _add_convert_official_command,
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
    if args.command == "eval" and args.dataset and not args.root:
        parser.error("--dataset needs --root, the folder the release was unpacked into")
    if args.command == "score" and args.engine != "ray" and (args.address or args.actors):
        parser.error("--address and --actors go with --engine ray")
    if args.command == "score" and args.engine == "ray" and args.device:
        parser.error("--device goes with the default engine: Ray actors score on their GPU when they have one")
    if args.command == "serve" and args.detach and not args.address:
        parser.error("--detach needs --address: a local Ray instance ends with the command")
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


if __name__ == "__main__":
    sys.exit(main())
