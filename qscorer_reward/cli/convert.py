"""``qscorer convert-official``: the paper's released checkpoint, converted once to this package's
format (see `qscorer_reward.official_checkpoint`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qscorer_reward.config import DTYPES

from .common import CommandError, add_command


def add_convert_official_command(commands) -> None:
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


def _convert_official_command(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from qscorer_reward.official_checkpoint import convert_official

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
