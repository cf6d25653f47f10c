"""``qscorer train`` (score-token fine-tuning from a config, also under ``accelerate launch``) and
``qscorer eval`` (SRCC, PLCC, KRCC and RMSE of a checkpoint on a dataset); both need the ``train``
extra (`qscorer_reward.training`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_command, add_scoring_arguments, load_scorer, show_progress


def add_train_command(commands) -> None:
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


def _train_command(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from qscorer_reward.training.config import TrainingConfig
    from qscorer_reward.training.trainer import ScoreTokenTrainer

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


def add_eval_command(commands) -> None:
    from qscorer_reward.training.config import DATASET_FORMATS

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
    add_scoring_arguments(evaluate, "e.g. cuda, cuda:1, cpu (default: cpu)")
    evaluate.set_defaults(run=_eval_command, check=_check_eval_options)


def _check_eval_options(args: argparse.Namespace) -> str | None:
    """Why the options cannot go together (a usage error), or ``None``."""
    if args.dataset and not args.root:
        return "--dataset needs --root, the folder the release was unpacked into"
    return None


def _eval_command(args: argparse.Namespace) -> int:
    from qscorer_reward.training.config import DatasetConfig
    from qscorer_reward.training.evaluation import dataset_metrics, format_table, predict, write_report
    from qscorer_reward.training.sources import load_records

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
    scorer = load_scorer(args, args.device, report=not args.quiet, model=args.checkpoint)
    scores, failed = predict(
        scorer, records, args.batch_size, progress=show_progress(args), description=f"eval {spec.name}"
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
