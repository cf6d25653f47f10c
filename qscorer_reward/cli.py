"""The ``qscorer`` command line.

- ``qscorer score PATH...`` scores image files and folders (resumable, sharded under
  ``accelerate launch``; see `qscorer_reward.scoring_job`).
- ``qscorer filter SRC... --min-score X --dest DIR`` copies, moves or symlinks the images that score
  at least X (see `qscorer_reward.filter_job`).
- ``qscorer score PATH... --engine ray [--address ADDR]`` scores them on Ray Data instead (see
  `qscorer_reward.serving.ray_engine`); ``qscorer serve`` runs the reward service (Ray Serve, see
  `qscorer_reward.serving.app`).
- ``qscorer train --config FILE.yaml`` fine-tunes a Q-Scorer (also under ``accelerate launch``).
- ``qscorer eval --checkpoint DIR (--dataset NAME --root DIR | --manifest FILE)`` reports SRCC,
  PLCC, KRCC and RMSE on a dataset.
- ``qscorer convert-official LORA_DIR --base-model BASE_DIR --output OUT`` converts the paper's
  released checkpoint to this package's format (see `qscorer_reward.official_checkpoint`).
- ``qscorer report SCORES --output report.html`` writes an offline HTML gallery of a ``score``
  output, for choosing a threshold (see `qscorer_reward.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from .config import DTYPES
from .extras import MissingExtraError
from .filter_job import FILTER_MODES, rows_from_score_file, run_filter_job
from .scoring_job import (
    existing_output_files,
    find_images,
    find_images_with_relative_paths,
    read_rows,
    row_file_format,
    run_resumable_job,
    score_files,
    write_rows,
)

DONE_VERBS = {"copy": "copied", "move": "moved", "symlink": "symlinked"}


def _load_scorer(args: argparse.Namespace, device, report: bool = True):
    """The scorer named by ``--model`` on ``device``; if ``report``, its load warnings and a line
    naming it are printed on stderr."""
    import torch
    from transformers.utils import logging as transformers_logging

    from .scorer import QScorer

    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        scorer = QScorer.from_pretrained(
            args.model, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None
        )
    if report:
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        name = scorer.config.model_name or args.model or "bundled default"
        low, high = scorer.score_range
        nominal = " (nominally: unclamped)" if scorer.config.score_bound == "none" else ""
        print(f"model: {name}; scores in [{low:g}, {high:g}]{nominal}, higher is better", file=sys.stderr)
    return scorer


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


def _score_command(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return _ray_score_command(args)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as `Accelerator` reads it
    output_format = row_file_format(args.output or "", args.format)
    problem = _score_output_problem(args, output_format, state.num_processes)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    paths = list(find_images(args.paths))
    if not paths:
        print("no image files found", file=sys.stderr)
        return 1
    device = args.device or (state.device if state.num_processes > 1 else None)
    scorer = _load_scorer(args, device, report=state.is_main_process)
    progress = not args.no_progress
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if output_format == "table" or not args.output:
        with open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as stream:
            summary = write_rows(score_files(scorer, paths, args.batch_size, progress), output_format, stream)
    else:
        try:
            summary = run_resumable_job(
                scorer, paths, Path(args.output), output_format, state,
                resume=args.resume, batch_size=args.batch_size, progress=progress,
            )  # fmt: skip
        except ValueError as err:  # an output to resume that is not one `score` wrote
            print(f"error: cannot resume: {err}", file=sys.stderr)
            return 2
    if state.is_main_process:
        kept = f"; {summary.kept} kept from {args.output}" if args.resume else ""
        print(f"scored {summary.scored} image(s), {summary.failed} failed{kept}", file=sys.stderr)
    if args.report and state.is_main_process:
        from .report import ReportModel, run_report

        model = ReportModel.from_config(scorer.config, args.model)
        report_status = run_report(Path(args.output), Path(args.report), model=model, sources=args.paths)
        return max(summary.exit_status, min(report_status, 1))  # the scores are written whatever the page does
    return summary.exit_status


def _local_ray_environment(address: str | None) -> None:
    """Before Ray is imported: a local instance (no ``address``) on loopback, without usage report."""
    from .serving import LOCAL_RAY_ENVIRONMENT

    if address is None:
        for name, value in LOCAL_RAY_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def _ray_score_command(args: argparse.Namespace) -> int:
    _local_ray_environment(args.address)
    from .serving.ray_engine import find_inputs, run_ray_job

    output_format = row_file_format(args.output or "", args.format)
    problem = _score_output_problem(args, output_format, 1)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        files = find_inputs(args.paths)
    except (OSError, ValueError) as err:  # a URI that cannot be listed: unknown scheme, no access
        print(f"error: cannot list the inputs: {err}", file=sys.stderr)
        return 2
    if not files:
        print("no image files found", file=sys.stderr)
        return 1
    try:
        summary = run_ray_job(
            files, Path(args.output) if args.output else None, output_format,
            model=args.model, dtype=args.dtype, resume=args.resume, batch_size=args.batch_size,
            actors=args.actors, address=args.address, progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as err:  # an output to resume that is not one `score` wrote
        print(f"error: cannot resume: {err}", file=sys.stderr)
        return 2
    kept = f"; {summary.kept} kept from {args.output}" if args.resume else ""
    print(f"scored {summary.scored} image(s), {summary.failed} failed{kept}", file=sys.stderr)
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


def _filter_command(args: argparse.Namespace) -> int:
    files = list(dict(find_images_with_relative_paths(args.sources)).items())
    paths = [file for file, _ in files]
    if not files:
        print("no image files found", file=sys.stderr)
        return 1
    if args.scores:
        try:
            rows = rows_from_score_file(read_rows(args.scores), paths, args.scores)
        except (OSError, ValueError) as err:
            print(f"error: cannot read --scores: {err}", file=sys.stderr)
            return 2
    else:
        rows = score_files(_load_scorer(args, args.device), paths, args.batch_size, not args.no_progress)
    summary = run_filter_job(files, rows, args.min_score, Path(args.dest), args.mode, args.dry_run)
    verb = f"would {args.mode}" if args.dry_run else DONE_VERBS[args.mode]
    print(
        f"{verb} {summary.passed} image(s) with score >= {args.min_score:g}; {summary.below} below, "
        f"{summary.unscored} without a score, {summary.conflicts} skipped (destination exists)",
        file=sys.stderr,
    )
    return summary.exit_status


def _train_command(args: argparse.Namespace) -> int:
    try:
        from .training.trainer import ScoreTokenTrainer
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .training.config import TrainingConfig

    config = TrainingConfig.from_file(args.config)
    overrides = {"output_dir": args.output_dir, "max_steps": args.max_steps}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.__post_init__()
    resume = {"auto": "auto", "none": None}.get(args.resume, args.resume)
    ScoreTokenTrainer(config).train(resume=resume)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    import torch

    try:
        from .training.evaluation import dataset_metrics, format_table, predict, write_report
    except MissingExtraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .scorer import QScorer
    from .training.config import DatasetConfig
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
    scorer = QScorer.from_pretrained(
        args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None
    )
    scores, failed = predict(
        scorer, records, args.batch_size, progress=not args.no_progress, description=f"eval {spec.name}"
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
        print(f"error: {output} exists: pass --overwrite to replace it", file=sys.stderr)
        return 2
    transformers_logging.disable_progress_bar()
    try:
        converted = convert_official(
            args.checkpoint, args.base_model, output, dtype=getattr(torch, args.dtype) if args.dtype else None
        )
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = converted.model.get_input_embeddings().weight.dtype
    print(f"wrote {output} ({converted.config.model_name}, {dtype}); use it as --model {output}", file=sys.stderr)
    return 0


def _add_convert_official_parser(commands) -> None:
    convert = commands.add_parser(
        "convert-official", help="convert the paper's released Q-Scorer (LoRA on mPLUG-Owl2) to this package's format"
    )
    convert.add_argument(
        "checkpoint", metavar="LORA_DIR", help="the release: a folder or hub id (2kxx/Qscorer_lora_5_1)"
    )
    convert.add_argument(
        "--base-model", required=True, help="its base: a folder or hub id (MAGAer13/mplug-owl2-llama2-7b)"
    )
    convert.add_argument("--output", required=True, help="the checkpoint folder to write")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the base's)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    convert.set_defaults(run=_convert_official_command)


def _report_command(args: argparse.Namespace) -> int:
    from .report import report_model, run_report

    try:
        model = report_model(args.model)
    except (OSError, ValueError) as err:
        print(f"error: cannot read --model: {err}", file=sys.stderr)
        return 2
    return run_report(Path(args.scores), Path(args.output), model=model, title=args.title)


def _add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cpu; under accelerate: its)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="backbone weight dtype")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qscorer", description="Q-Scorer image quality scores (MOS scale 1..5).")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score image files and folders")
    score.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")
    score.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled model)")
    score.add_argument(
        "--format",
        choices=["table", "csv", "jsonl"],
        default=None,
        help="output format (default: from the --output suffix, .csv or .jsonl, else table)",
    )
    score.add_argument("--output", help="write results to this file (row by row) instead of stdout")
    existing = score.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume", action="store_true", help="continue --output: keep its scored rows, score the rest"
    )
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    score.add_argument("--report", metavar="PAGE.html", help="then write `qscorer report` of --output (CSV or JSONL)")
    _add_scoring_arguments(score)
    score.add_argument(
        "--engine", choices=["accelerate", "ray"], default="accelerate",
        help="accelerate (default: this machine, or `accelerate launch`) or ray (Ray Data, across a Ray cluster; "
        "PATHs may then also be URIs such as s3://bucket/folder)",
    )  # fmt: skip
    score.add_argument("--address", default=None, help="with --engine ray: the Ray cluster (default: a local one)")
    score.add_argument(
        "--actors", type=int, default=None, help="with --engine ray: scorer actors (default: one per GPU, else 1)"
    )
    score.set_defaults(run=_score_command)

    serve = commands.add_parser("serve", help="run the reward service: POST /score over HTTP (Ray Serve)")
    serve.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled model)")
    serve.add_argument("--dtype", choices=DTYPES, default=None, help="backbone weight dtype")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--replicas", type=int, default=1, help="copies of the model (default 1)")
    serve.add_argument("--num-cpus-per-replica", type=float, default=1, help="also its torch threads (default 1)")
    serve.add_argument("--num-gpus-per-replica", type=float, default=0, help="1: each replica scores on a GPU")
    serve.add_argument("--max-batch-size", type=int, default=32, help="most images per forward pass (default 32)")
    serve.add_argument(
        "--batch-wait-timeout-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10)"
    )
    serve.add_argument("--max-images-per-request", type=int, default=256)
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, MiB (default 64)")
    serve.add_argument(
        "--max-image-pixels", type=int, default=4096 * 4096, help="largest image, checked before decoding"
    )
    serve.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (better: set QSCORER_SERVE_TOKEN)"
    )
    serve.add_argument("--address", default=None, help="deploy onto this Ray cluster (default: start a local one)")
    serve.add_argument("--name", default="qscorer", help="the Serve application's name (default qscorer)")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of the service (default /)")
    serve.add_argument("--detach", action="store_true", help="with --address: deploy and return, leaving it running")
    serve.set_defaults(run=_serve_command)

    filter_ = commands.add_parser("filter", help="copy, move or symlink the images that score at least a threshold")
    filter_.add_argument("sources", nargs="+", metavar="SRC", help="image files and folders (searched recursively)")
    filter_.add_argument("--min-score", type=float, required=True, help="keep images scoring at least this")
    filter_.add_argument("--dest", required=True, help="folder to place them in (folder structure kept)")
    filter_.add_argument("--mode", choices=FILTER_MODES, default="copy", help="how to place them (default: copy)")
    filter_.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    filter_.add_argument("--scores", default=None, help="take scores from a `qscorer score` CSV/JSONL output")
    filter_.add_argument("--model", default=None, help="checkpoint directory or hub id (default: bundled model)")
    _add_scoring_arguments(filter_)
    filter_.set_defaults(run=_filter_command)

    train = commands.add_parser("train", help="fine-tune a Q-Scorer (score tokens, head, LoRA) from a config")
    train.add_argument("--config", required=True, help="training config, YAML or JSON (see docs/training.md)")
    train.add_argument("--output-dir", default=None, help="override the config's output_dir")
    train.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    train.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default): continue from the latest checkpoint in output_dir, if any; "
        "'none': start afresh; or a checkpoint directory",
    )
    train.set_defaults(run=_train_command)

    from .training.config import DATASET_FORMATS

    evaluate = commands.add_parser("eval", help="SRCC / PLCC / KRCC / RMSE of a checkpoint on a dataset")
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint directory or hub id (default: bundled)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=[f for f in DATASET_FORMATS if f != "manifest"], help="official release")
    source.add_argument("--manifest", help="a CSV or JSONL manifest (image, mos, [mos_std, split, group])")
    evaluate.add_argument("--root", help="folder the official release was unpacked into (with --dataset)")
    evaluate.add_argument("--split", default=None, help="evaluate only this split (e.g. test)")
    evaluate.add_argument("--test-fraction", type=float, default=None, help="random split for a dataset without one")
    evaluate.add_argument(
        "--mos-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="the manifest's MOS scale"
    )
    evaluate.add_argument("--name", default=None, help="dataset name in the report")
    evaluate.add_argument("--output", default="eval_report.json", help="JSON report (default: eval_report.json)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cpu)")
    evaluate.add_argument("--dtype", choices=DTYPES, default=None, help="backbone weight dtype")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluate.set_defaults(run=_eval_command)
    _add_convert_official_parser(commands)

    report = commands.add_parser("report", help="an offline HTML gallery of `score` output, to choose a threshold")
    report.add_argument("scores", metavar="SCORES", help="a `qscorer score` CSV or JSONL output")
    report.add_argument("--output", default="report.html", help="the page to write (default: report.html)")
    report.add_argument("--title", default=None, help="the page's heading (default: from the SCORES file name)")
    report.add_argument(
        "--model", default=None, help="checkpoint the scores came from, for its name and range (default: bundled)"
    )
    report.set_defaults(run=_report_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    if args.command == "eval" and args.dataset and not args.root:
        parser.error("--dataset needs --root, the folder the release was unpacked into")
    if args.command == "score" and args.engine != "ray" and (args.address or args.actors):
        parser.error("--address and --actors go with --engine ray")
    if args.command == "score" and args.engine == "ray" and args.device:
        parser.error("--device goes with the default engine: Ray actors score on their GPU when they have one")
    if args.command == "score" and args.actors is not None and args.actors < 1:
        parser.error("--actors must be >= 1")
    if args.command == "serve" and min(args.replicas, args.max_batch_size, args.max_images_per_request) < 1:
        parser.error("--replicas, --max-batch-size and --max-images-per-request must be >= 1")
    if args.command == "serve" and args.detach and not args.address:
        parser.error("--detach needs --address: a local Ray instance ends with the command")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
