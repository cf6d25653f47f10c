"""Core CPU benchmarks of Q-Scorer with a tiny random Qwen2.5-VL backbone.

(a) Scorer overhead: the wall time of ``scorer(images)`` (float ``[B, 3, H, W]`` in [0, 1], under
    ``torch.no_grad``) over the time of the bare transformers backbone forward on exactly the
    tensors ``scorer.backbone.prepare`` produced for those images, as a ratio (target <= 1.15),
    plus the cost split of the scorer call (input conversion, ``backbone.prepare``, vision tower,
    language model, head) and the same ratio with gradients to the input pixels, without and with
    gradient checkpointing.
(b) Tensor preprocessing: ``scorer.backbone.prepare`` on a batch of real photos (uint8 tensor,
    converted to float inside the timed call) against transformers' ``Qwen2VLImageProcessorPil`` on
    the same photos as numpy uint8 HWC arrays; reports both times, the speed-up and whether the
    image grids (and pixel values, up to PIL's uint8 rounding) agree.
(c) Q-Scorer against Q-Align-style scoring on the same backbone and prepared batch: the regression
    head on the hidden state at the answer position, against the softmax over the five level-token
    logits there (``lm_head`` rows of the levels only), and against the same read from the full
    model forward that computes ``lm_head`` logits at every position (as Q-Align's code does).

Times are wall-clock medians over interleaved repeats (each round runs every variant, in an order
reversed each round), after warm-up, in milliseconds. Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scoring import (
    bare_forward,
    language_model,
    language_model_inputs,
    qalign_level_ids,
    qalign_scores,
    qalign_scores_from_all_logits,
    vision_tower,
)
from timing import interleaved_median_ms, machine_info

OVERHEAD_TARGET = 1.15
CROP_FRACTION = 0.9  # each photo gives two square crops of this fraction of its shorter side
# Parts of the no_grad scorer call timed on their own in (a).
SPLIT_PARTS = ("input_conversion", "prepare", "vision_tower", "language_model", "head")


@dataclass(frozen=True)
class Settings:
    """Model size, inputs and repeat counts of one benchmark run."""

    hidden_size: int  # text width of the tiny backbone
    num_layers: int  # text decoder layers
    vision_width: int  # vision tower width
    image_side: int  # (a): input side, and the pixel budget is image_side**2 (no resize)
    batch: int  # (a): images per scorer call
    photo_count: int  # (b): photos per preprocessing call
    photo_side: int  # (b): photo side in pixels
    preprocess_max_pixels: int  # (b): pixel budget of the compared preprocessors
    warmup: int  # untimed rounds before measuring
    repeats: int  # timed rounds; each reported time is the median over them


FULL = Settings(
    hidden_size=256,
    num_layers=4,
    vision_width=128,
    image_side=224,
    batch=8,
    photo_count=16,
    photo_side=512,
    preprocess_max_pixels=448 * 448,
    warmup=3,
    repeats=21,
)
QUICK = Settings(
    hidden_size=64,
    num_layers=2,
    vision_width=32,
    image_side=112,
    batch=8,
    photo_count=4,
    photo_side=256,
    preprocess_max_pixels=448 * 448,
    warmup=1,
    repeats=3,
)


def overhead_scorer(settings: Settings):
    """The tiny scorer of (a) and (c), at a pixel budget of ``image_side**2`` (no resize)."""
    from qscorer_reward.testing import tiny_scorer

    side = settings.image_side
    return tiny_scorer(
        max_pixels=side * side,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        vision_width=settings.vision_width,
    )


def bench_overhead(settings: Settings) -> dict:
    """(a): scorer call vs bare backbone forward, cost split, and gradient modes (times in ms)."""
    from qscorer_reward.preprocessing import to_unit_pixels

    side = settings.image_side
    scorer = overhead_scorer(settings)
    pixels = torch.rand(settings.batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    inputs = scorer.backbone.prepare(pixels)
    rows = torch.arange(settings.batch)

    with torch.no_grad():
        hidden = bare_forward(scorer, inputs)
        image_features = vision_tower(scorer, inputs)
        embeddings = language_model_inputs(scorer, inputs, image_features)
        split_error = (language_model(scorer, inputs, embeddings) - hidden).abs().max().item()
        if split_error > 1e-4:
            raise RuntimeError(f"vision tower + language model differ from the bare forward by {split_error}")
        no_grad_ms = interleaved_median_ms(
            {
                "scorer": lambda: scorer(pixels),
                "backbone": lambda: bare_forward(scorer, inputs),
                "input_conversion": lambda: to_unit_pixels(pixels, (0.0, 1.0), scorer.device),
                "prepare": lambda: scorer.backbone.prepare(pixels),
                "vision_tower": lambda: vision_tower(scorer, inputs),
                "language_model": lambda: language_model(scorer, inputs, embeddings),
                "head": lambda: scorer.head(hidden[rows, inputs.score_positions]),
            },
            settings.warmup,
            settings.repeats,
        )

    # Gradient to the input: the scorer from image pixels, the bare backbone from its pixel_values.
    pixels_with_grad = pixels.clone().requires_grad_(True)
    pixel_values_with_grad = inputs.model_inputs["pixel_values"].clone().requires_grad_(True)
    inputs_with_grad = replace(inputs, model_inputs={**inputs.model_inputs, "pixel_values": pixel_values_with_grad})
    grad_variants = {
        "scorer": lambda: torch.autograd.grad(scorer(pixels_with_grad).sum(), pixels_with_grad),
        "backbone": lambda: torch.autograd.grad(
            bare_forward(scorer, inputs_with_grad)[rows, inputs.score_positions].sum(), pixel_values_with_grad
        ),
    }
    grad_ms = interleaved_median_ms(grad_variants, settings.warmup, settings.repeats)
    scorer.gradient_checkpointing_enable()
    checkpointing_ms = interleaved_median_ms(grad_variants, settings.warmup, settings.repeats)
    scorer.gradient_checkpointing_disable()

    split_ms = {name: no_grad_ms[name] for name in SPLIT_PARTS}
    ratio = no_grad_ms["scorer"] / no_grad_ms["backbone"]
    return {
        "batch": settings.batch,
        "image_size": [side, side],
        "sequence_length": inputs.input_ids.shape[1],
        "no_grad": {
            "scorer_ms": no_grad_ms["scorer"],
            "backbone_ms": no_grad_ms["backbone"],
            "ratio": ratio,
            "target_ratio": OVERHEAD_TARGET,
            "meets_target": ratio <= OVERHEAD_TARGET,
        },
        "split_ms": split_ms,
        "split_fraction_of_scorer": {name: ms / no_grad_ms["scorer"] for name, ms in split_ms.items()},
        "grad_to_input": _ratio_row(grad_ms),
        "grad_checkpointing": _ratio_row(checkpointing_ms),
    }


def _ratio_row(times_ms: dict[str, float]) -> dict:
    return {
        "scorer_ms": times_ms["scorer"],
        "backbone_ms": times_ms["backbone"],
        "ratio": times_ms["scorer"] / times_ms["backbone"],
    }


def load_photos(count: int, side: int) -> np.ndarray:
    """``[count, side, side, 3]`` uint8: two square crops (top-left, bottom-right) of each
    `skimage.data` colour photo, resized with Lanczos; the photo list repeats if needed."""
    from PIL import Image
    from skimage import data

    sources = [
        data.astronaut,
        data.coffee,
        data.chelsea,
        data.rocket,
        data.immunohistochemistry,
        data.hubble_deep_field,
        data.retina,
        lambda: data.stereo_motorcycle()[0],
    ]
    crops = []
    for index in range((count + 1) // 2):
        photo = Image.fromarray(sources[index % len(sources)]())
        width, height = photo.size
        crop = int(CROP_FRACTION * min(width, height))
        for left, top in ((0, 0), (width - crop, height - crop)):
            square = photo.crop((left, top, left + crop, top + crop))
            crops.append(np.asarray(square.resize((side, side), Image.Resampling.LANCZOS)))
    return np.stack(crops[:count])


def bench_preprocessing(settings: Settings) -> dict:
    """(b): uint8 -> float conversion plus ``backbone.prepare`` vs ``Qwen2VLImageProcessorPil`` on the
    same uint8 photos (times in ms), and how far their ``pixel_values`` differ."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qscorer_reward.testing import tiny_scorer

    scorer = tiny_scorer(max_pixels=settings.preprocess_max_pixels)
    config = scorer.config
    reference = Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    photos = load_photos(settings.photo_count, settings.photo_side)
    photo_arrays = list(photos)
    photos_uint8 = torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous()

    def ours():
        return scorer.backbone.prepare(photos_uint8.float() / 255.0)

    def transformers_reference():
        return reference(photo_arrays, return_tensors="pt")

    with torch.no_grad():
        times_ms = interleaved_median_ms(
            {"ours": ours, "reference": transformers_reference}, settings.warmup, settings.repeats
        )
        ours_out, reference_out = ours().model_inputs, transformers_reference()
    grids_agree = torch.equal(ours_out["image_grid_thw"], reference_out["image_grid_thw"])
    # Equal grids imply equal pixel_values shapes; NaN marks the differences as not comparable.
    pixel_difference = (
        (ours_out["pixel_values"] - reference_out["pixel_values"]).abs() if grids_agree else torch.tensor(float("nan"))
    )
    return {
        "images": settings.photo_count,
        "image_size": [settings.photo_side, settings.photo_side],
        "resized_to": [int(v) * config.patch_size for v in ours_out["image_grid_thw"][0, 1:]],
        "ours_ms": times_ms["ours"],
        "reference_ms": times_ms["reference"],
        "speedup": times_ms["reference"] / times_ms["ours"],
        "grids_agree": grids_agree,
        "pixel_values_mean_abs_diff": pixel_difference.mean().item(),
        "pixel_values_max_abs_diff": pixel_difference.max().item(),
    }


def bench_qalign(settings: Settings) -> dict:
    """(c): Q-Scorer vs Q-Align-style scoring of the same prepared batch on the same backbone
    (no_grad, times in ms, ratios to Q-Scorer)."""
    scorer = overhead_scorer(settings)
    side = settings.image_side
    pixels = torch.rand(settings.batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    inputs = scorer.backbone.prepare(pixels)
    level_ids = qalign_level_ids(scorer.tokenizer)
    with torch.no_grad():
        times_ms = interleaved_median_ms(
            {
                "qscorer": lambda: scorer.score_inputs(inputs),
                "qalign_answer_position": lambda: qalign_scores(scorer, inputs, level_ids),
                "qalign_all_logits": lambda: qalign_scores_from_all_logits(scorer, inputs, level_ids),
            },
            settings.warmup,
            settings.repeats,
        )
    return {
        "batch": settings.batch,
        "image_size": [side, side],
        "vocabulary_size": scorer.backbone.model.get_output_embeddings().weight.shape[0],
        "times_ms": times_ms,
        "ratio_to_qscorer": {name: ms / times_ms["qscorer"] for name, ms in times_ms.items()},
    }


def print_report(results: dict) -> None:
    """The results as readable tables on stdout."""
    machine, overhead, prep, qalign = (results[key] for key in ("machine", "overhead", "preprocessing", "qalign"))
    print(
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, python {machine['python']}"
    )
    model = results["settings"]
    side = overhead["image_size"][0]
    print(
        f"\n(a) scorer vs bare backbone, batch {overhead['batch']} of {side}x{side}, tiny qwen2_5_vl "
        f"(hidden {model['hidden_size']}, {model['num_layers']} layers, vision {model['vision_width']}), "
        f"{overhead['sequence_length']} tokens per sequence"
    )
    print(f"{'mode':<28}{'scorer ms':>12}{'backbone ms':>14}{'ratio':>8}")
    for label, key in (
        ("no_grad", "no_grad"),
        ("grad to input", "grad_to_input"),
        ("grad to input + checkpoint", "grad_checkpointing"),
    ):
        row = overhead[key]
        print(f"{label:<28}{row['scorer_ms']:>12.2f}{row['backbone_ms']:>14.2f}{row['ratio']:>8.3f}")
    no_grad = overhead["no_grad"]
    verdict = "met" if no_grad["meets_target"] else "MISSED"
    print(f"no_grad target ratio <= {no_grad['target_ratio']}: {verdict}")
    print(f"\ncost split of the no_grad scorer call\n{'part':<28}{'ms':>12}{'of scorer':>14}")
    for name, ms in overhead["split_ms"].items():
        print(f"{name:<28}{ms:>12.2f}{overhead['split_fraction_of_scorer'][name]:>14.1%}")
    prep_side = prep["image_size"][0]
    resized = "x".join(str(v) for v in prep["resized_to"])
    print(f"\n(b) preprocessing, {prep['images']} photos of {prep_side}x{prep_side} -> {resized}")
    print(f"{'ours (to float + prepare)':<28}{prep['ours_ms']:>12.2f} ms")
    print(f"{'Qwen2VLImageProcessorPil':<28}{prep['reference_ms']:>12.2f} ms")
    print(f"{'speed-up (reference / ours)':<28}{prep['speedup']:>12.2f}x")
    print(
        f"image_grid_thw agree: {prep['grids_agree']}; pixel_values |ours - reference| mean "
        f"{prep['pixel_values_mean_abs_diff']:.4f}, max {prep['pixel_values_max_abs_diff']:.4f}"
    )
    qalign_side = qalign["image_size"][0]
    print(
        f"\n(c) Q-Scorer vs Q-Align-style on the same backbone, batch {qalign['batch']} of "
        f"{qalign_side}x{qalign_side}, no_grad, vocabulary {qalign['vocabulary_size']}\n"
        f"{'variant':<28}{'ms':>12}{'/ qscorer':>14}"
    )
    for name, ms in qalign["times_ms"].items():
        print(f"{name:<28}{ms:>12.2f}{qalign['ratio_to_qscorer'][name]:>14.3f}")


def main(argv: list[str] | None = None) -> dict:
    """Run the three benchmarks, print the report, optionally write it as JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and inputs, few repeats (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    results = {
        "machine": machine_info(),
        "mode": "quick" if args.quick else "full",
        "settings": asdict(settings),
        "overhead": bench_overhead(settings),
        "preprocessing": bench_preprocessing(settings),
        "qalign": bench_qalign(settings),
    }
    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
