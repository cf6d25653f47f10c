"""The ``qscorer`` command line.

- ``qscorer score PATH...`` scores image files and folders.
- ``qscorer train --config FILE.yaml`` fine-tunes a Q-Scorer (also under ``accelerate launch``).
- ``qscorer eval --checkpoint DIR (--dataset NAME --root DIR | --manifest FILE)`` reports SRCC,
  PLCC, KRCC and RMSE on a dataset.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ScoreRow:
    """One output row: the file, its score (``None`` if it failed) and the error message."""

    path: str
    score: float | None
    error: str | None = None


def find_images(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly (whatever their suffix), and image files under folders, recursively
    and in sorted order. A path that does not exist is yielded as is, to be reported."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def score_files(scorer, paths: list[Path], batch_size: int, progress: bool = False) -> Iterator[ScoreRow]:
    """Score ``paths`` in batches; a file that cannot be read or scored becomes a row with an error
    and the rest of the run goes on."""
    from tqdm.auto import tqdm

    from .preprocessing import load_image

    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            loaded, rows = [], {}
            for path in batch:
                try:
                    loaded.append((path, load_image(path, scorer.max_image_pixels)))
                except ValueError as err:
                    rows[path] = ScoreRow(str(path), None, str(err))
            for path, score, error in _score_loaded(scorer, loaded):
                rows[path] = ScoreRow(str(path), score, error)
            yield from (rows[path] for path in batch)
            bar.update(len(batch))


def _score_loaded(scorer, loaded: list) -> list:
    """(path, score, error) for loaded images: one forward pass, or one per image if the batch
    fails, so that one bad image only fails itself."""
    import torch

    if not loaded:
        return []
    try:
        with torch.inference_mode():
            scores = scorer([image for _, image in loaded]).tolist()
        return [(path, score, None) for (path, _), score in zip(loaded, scores)]
    except ValueError as err:
        if len(loaded) == 1:
            return [(loaded[0][0], None, f"{loaded[0][0]}: {err}")]
        return [row for item in loaded for row in _score_loaded(scorer, [item])]


def write_rows(rows: Iterable[ScoreRow], output_format: str, stream) -> tuple[int, int]:
    """Write rows as they come (so an interrupted run keeps what it wrote); returns the counts of
    scored and failed files."""
    scored = failed = 0
    writer = csv.writer(stream) if output_format == "csv" else None
    if writer:
        writer.writerow(["path", "score", "error"])
    for row in rows:
        scored += row.score is not None
        failed += row.score is None
        if output_format == "csv":
            writer.writerow([row.path, "" if row.score is None else f"{row.score:.4f}", row.error or ""])
        elif output_format == "jsonl":
            stream.write(json.dumps({"path": row.path, "score": row.score, "error": row.error}) + "\n")
        else:
            score = "FAILED" if row.score is None else f"{row.score:6.3f}"
            stream.write(f"{score}  {row.path}" + (f"  ({row.error})" if row.error else "") + "\n")
        stream.flush()
    return scored, failed


def _score_command(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from .scorer import QScorer

    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        scorer = QScorer.from_pretrained(
            args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None
        )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    name = scorer.config.model_name or args.model or "bundled default"
    low, high = scorer.score_range
    print(f"model: {name}; scores in [{low:g}, {high:g}], higher is better", file=sys.stderr)
    paths = list(find_images(args.paths))
    if not paths:
        print("no image files found", file=sys.stderr)
        return 1
    rows = score_files(scorer, paths, args.batch_size, progress=not args.no_progress)
    suffix_format = {".csv": "csv", ".jsonl": "jsonl"}.get(Path(args.output or "").suffix.lower(), "table")
    output_format = args.format or suffix_format
    if args.output:
        with open(args.output, "w", newline="") as stream:
            scored, failed = write_rows(rows, output_format, stream)
    else:
        scored, failed = write_rows(rows, output_format, sys.stdout)
    print(f"scored {scored} image(s), {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _train_command(args: argparse.Namespace) -> int:
    from .training.config import TrainingConfig
    from .training.trainer import ScoreTokenTrainer

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

    from .scorer import QScorer
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
    score.add_argument("--output", help="write results to this file instead of stdout")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cpu)")
    score.add_argument("--dtype", choices=DTYPES, default=None, help="backbone weight dtype")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(run=_score_command)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    if args.command == "eval" and args.dataset and not args.root:
        parser.error("--dataset needs --root, the folder the release was unpacked into")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
