"""Measure a Q-Scorer on the held-out synthetic distortion set: per-type SRCC between score and
distortion level, and how often a pristine crop outscores its level-5 versions, with a bootstrap interval
of the mean SRCC over the crops and the mean SRCC per held-out photo (README.md).

    python -m recipes.qscorer_tiny.evaluate_synthetic_quality              # the bundled default model
    python -m recipes.qscorer_tiny.evaluate_synthetic_quality --model CHECKPOINT_DIR --eval-dir runs/synthetic-eval \\
        --json runs/synthetic-eval/result.json

The evaluation set is written to ``--eval-dir`` on the first run and reused afterwards (a directory
written with other settings is refused); without ``--eval-dir`` it is written to a temporary
directory and removed at the end. Needs the ``dev`` extra (scipy, scikit-image).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from qscorer_reward import QScorer

from .synthetic_evaluation import format_table, mean_srcc_interval, score_rows, summarise
from .synthetic_iqa import (
    MANIFEST_NAME,
    SETTINGS_NAME,
    evaluation_settings,
    read_sample_rows,
    write_evaluation_set,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the bundled model)")
    parser.add_argument("--eval-dir", type=Path, help="where the evaluation set is (or is to be written)")
    parser.add_argument("--crops-per-photo", type=int, default=4, help="crops of each held-out photo (default 4)")
    parser.add_argument("--size", type=int, default=224, help="side of the square crops in pixels (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation set (default 0)")
    parser.add_argument("--distortions", help="comma-separated distortion types (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device for the scorer (default cpu)")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="resamples of the crops for a 95%% interval of the mean SRCC (default 1000; 0: none)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def prepare_evaluation_set(directory: Path, args: argparse.Namespace) -> Path:
    """The manifest of the evaluation set in ``directory``, written first if there is none."""
    distortions = args.distortions.split(",") if args.distortions else None
    settings = evaluation_settings(
        crops_per_photo=args.crops_per_photo, size=args.size, seed=args.seed, distortions=distortions
    )
    manifest = directory / MANIFEST_NAME
    if manifest.exists():
        written = json.loads((directory / SETTINGS_NAME).read_text())
        if written != settings:
            raise SystemExit(f"{directory} holds an evaluation set written with {written}, not {settings}")
        return manifest
    print(f"writing the evaluation set to {directory} ...", file=sys.stderr)
    return write_evaluation_set(
        directory, crops_per_photo=args.crops_per_photo, size=args.size, seed=args.seed, distortions=distortions
    )


def evaluate(directory: Path, args: argparse.Namespace) -> dict:
    manifest = prepare_evaluation_set(directory, args)
    scorer = QScorer.from_pretrained(args.model, device=args.device)
    rows = read_sample_rows(manifest)
    scores = score_rows(scorer, rows, args.batch_size)
    summary = summarise(rows, scores)
    if args.bootstrap:
        summary["mean_srcc_interval"] = mean_srcc_interval(rows, scores, resamples=args.bootstrap)
    summary["model"] = args.model or f"bundled ({scorer.config.model_name})"
    summary["evaluation_set"] = json.loads((directory / SETTINGS_NAME).read_text())
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.eval_dir is None:
        with tempfile.TemporaryDirectory(prefix="synthetic-eval-") as directory:
            summary = evaluate(Path(directory), args)
    else:
        summary = evaluate(args.eval_dir, args)
    print(f"model: {summary['model']}")
    print(format_table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
