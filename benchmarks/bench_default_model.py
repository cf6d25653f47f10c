"""CPU scoring throughput of the bundled default model `qscorer-tiny` (issue target: >= 20 images/s
at 224 px on a 2-core machine).

A batch of uint8 images ``[B, 3, 224, 224]`` (the example photos, cropped and tiled) is scored
through ``QScorer.__call__`` - input conversion and preprocessing included, as a user calls it -
with 1 and with all torch threads. Reported per thread count: median ms per call over the timed
calls and images/s, and the same call with the vision patch embedding run as transformers' ``Conv3d``
instead of the backbone's matrix product (`qwen_vl.PatchProjection`), timed interleaved with it.
Run from the repository root::

    .venv/bin/python benchmarks/bench_default_model.py [--batch 16] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from timing import interleaved_median_ms, machine_info

from qscorer_reward import QScorer
from qscorer_reward.backbones.qwen_vl import PatchProjection
from qscorer_reward.preprocessing import load_image, resize_antialiased

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
TARGET_IMAGES_PER_S = 20.0


def example_batch(batch: int, side: int) -> torch.Tensor:
    """``[batch, 3, side, side]`` uint8: the example images' centre squares resized to ``side``, repeated."""
    crops = []
    for path in sorted(EXAMPLES.glob("*.png")):
        image = load_image(path).float() / 255  # load_image: uint8 [3, H, W]
        square = min(image.shape[1:])
        top, left = (image.shape[1] - square) // 2, (image.shape[2] - square) // 2
        crop = resize_antialiased(image[None, :, top : top + square, left : left + square], side, side)[0]
        crops.append((crop.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack([crops[i % len(crops)] for i in range(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="images per call (default 16)")
    parser.add_argument("--side", type=int, default=224, help="square image side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per thread count (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    scorer = QScorer.from_pretrained()
    images = example_batch(args.batch, args.side)
    thread_counts = sorted({1, os.cpu_count() or 1})
    rows = []
    projection = scorer.backbone.model.model.visual.patch_embed.proj

    def score_with_convolution():
        projection.__class__ = torch.nn.Conv3d
        try:
            return scorer(images)
        finally:
            projection.__class__ = PatchProjection

    for threads in thread_counts:
        torch.set_num_threads(threads)
        with torch.no_grad():
            ms = interleaved_median_ms(
                {"score": lambda: scorer(images), "convolution": score_with_convolution},
                warmup=1,
                repeats=args.repeats,
            )
        rows.append(
            dict(
                threads=threads,
                ms_per_call=ms["score"],
                images_per_s=1e3 * args.batch / ms["score"],
                ms_per_call_with_convolution=ms["convolution"],
            )
        )
    best = max(row["images_per_s"] for row in rows)
    results = dict(
        machine=machine_info(),
        model=scorer.config.model_name,
        batch=args.batch,
        image_side=args.side,
        rows=rows,
        target_images_per_s=TARGET_IMAGES_PER_S,
        meets_target=best >= TARGET_IMAGES_PER_S,
    )
    for row in rows:
        print(f"{row['threads']} thread(s): {row['ms_per_call']:.1f} ms per call of {args.batch}, "
              f"{row['images_per_s']:.1f} images/s; with the patch embedding as a Conv3d "
              f"{row['ms_per_call_with_convolution']:.1f} ms")  # fmt: skip
    print(f"target >= {TARGET_IMAGES_PER_S:.0f} images/s: {'met' if results['meets_target'] else 'missed'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
