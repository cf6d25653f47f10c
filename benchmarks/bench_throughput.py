"""Scoring throughput, latency and peak memory of Q-Scorer by batch size and image size, in three
modes: no_grad, grad_to_input and grad_checkpointing (see `scoring`), on a tiny random Qwen2.5-VL
backbone on the CPU.

For each image side and batch size, a float batch ``[B, 3, side, side]`` in [0, 1] is scored in
the three modes, interleaved (each round runs every mode once, in an order reversed each round;
gradient checkpointing is switched between calls, untimed). Reported per mode: wall-clock ms per
call (median) and per image, images/s, achieved GFLOP/s (model FLOPs from `flops`: forward, or
forward plus backward to the input), peak memory in MiB (weights and inputs included; on the
CPU tracked per operator in a separate call, see `timing.peak_memory_bytes`), and time and peak
memory relative to no_grad at the same batch and side. The pixel budget is the largest side
squared, so no image is resized. Run from the repository root::

    .venv/bin/python benchmarks/bench_throughput.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from flops import scoring_flops
from scoring import MODES, measure_modes
from timing import MIB, machine_info


@dataclass(frozen=True)
class Settings:
    """Model size, inputs and repeat counts of one benchmark run."""

    hidden_size: int  # text width of the tiny backbone
    num_layers: int  # text decoder layers
    vision_width: int  # vision tower width
    image_sides: tuple[int, ...]  # square images of these sides (pixels)
    batch_sizes: tuple[int, ...]  # images per call
    warmup: int  # untimed rounds before measuring
    repeats: int  # timed rounds; each reported time is the median over them


FULL = Settings(
    hidden_size=256,
    num_layers=4,
    vision_width=128,
    image_sides=(224, 448),
    batch_sizes=(1, 4, 8),
    warmup=1,
    repeats=5,
)
QUICK = Settings(
    hidden_size=64,
    num_layers=2,
    vision_width=32,
    image_sides=(56, 112),
    batch_sizes=(1, 2),
    warmup=1,
    repeats=1,
)


def bench_throughput(settings: Settings) -> dict:
    """Every (side, batch, mode) row, and the FLOPs per image at each side."""
    from qscorer_reward.testing import tiny_scorer

    largest = max(settings.image_sides)
    scorer = tiny_scorer(
        max_pixels=largest * largest,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        vision_width=settings.vision_width,
    )
    generator = torch.Generator().manual_seed(0)
    flops_per_image = {side: scoring_flops(scorer, side, side) for side in settings.image_sides}
    rows = []
    for side in settings.image_sides:
        flops = flops_per_image[side]
        for batch in settings.batch_sizes:
            pixels = torch.rand(batch, 3, side, side, generator=generator)
            measured = measure_modes(
                scorer, pixels, MODES, device="cpu", warmup=settings.warmup, repeats=settings.repeats
            )
            baseline = measured["no_grad"]
            for mode in MODES:
                ms, peak = measured[mode]["ms_per_call"], measured[mode]["peak_memory_bytes"]
                model_flops = batch * (
                    flops["forward"] if mode == "no_grad" else flops["forward_and_backward_to_input"]
                )
                rows.append(
                    {
                        "image_side": side,
                        "batch": batch,
                        "mode": mode,
                        "ms_per_call": ms,
                        "ms_per_image": ms / batch,
                        "images_per_s": 1e3 * batch / ms,
                        "gflop_per_s": model_flops / (ms * 1e-3) / 1e9,
                        "peak_memory_mib": peak / MIB,
                        "time_vs_no_grad": ms / baseline["ms_per_call"],
                        "peak_memory_vs_no_grad": peak / baseline["peak_memory_bytes"],
                    }
                )
    return {
        "flops_per_image": {
            str(side): {key: flops[key] for key in ("sequence_length", "forward", "forward_and_backward_to_input")}
            for side, flops in flops_per_image.items()
        },
        "rows": rows,
    }


def print_report(results: dict) -> None:
    """The rows as a table on stdout."""
    machine, model = results["machine"], results["settings"]
    print(
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
    )
    print(
        f"tiny qwen2_5_vl (hidden {model['hidden_size']}, {model['num_layers']} layers, vision "
        f"{model['vision_width']}), float32, CPU"
    )
    header = (
        f"{'side':>5}{'batch':>6}  {'mode':<20}{'ms/call':>10}{'ms/image':>10}{'images/s':>10}"
        f"{'GFLOP/s':>9}{'peak MiB':>10}{'time/ng':>9}{'mem/ng':>8}"
    )
    print(header)
    for row in results["throughput"]["rows"]:
        print(
            f"{row['image_side']:>5}{row['batch']:>6}  {row['mode']:<20}{row['ms_per_call']:>10.1f}"
            f"{row['ms_per_image']:>10.1f}{row['images_per_s']:>10.2f}{row['gflop_per_s']:>9.1f}"
            f"{row['peak_memory_mib']:>10.1f}{row['time_vs_no_grad']:>9.2f}{row['peak_memory_vs_no_grad']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> dict:
    """Run the grid, print the table, optionally write it as JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, one repeat (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    results = {
        "machine": machine_info(),
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "throughput": bench_throughput(settings),
    }
    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
