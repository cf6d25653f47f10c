"""Train a tiny Q-Scorer on CPU in about a minute: the whole score-token fine-tuning loop, end to end.

A tiny random Qwen2.5-VL (4-pixel vision patches, so that a random vision tower can learn pixel
statistics quickly) learns to score the noise level of crops of two example photos, and is
evaluated on crops of the third. The same config file, pointed at a real base model and dataset,
is how a real run starts (see docs/training.md).

    python examples/train_tiny.py --output runs/tiny
    qscorer score examples/images --model runs/tiny/run/final

Needs the train extra (pip install "qscorer-reward[train]"). ``--smoke`` trains a few steps on a few
crops (seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS = Path(__file__).resolve().parent / "images"
CROP = 32
MAX_NOISE_STD = 0.25


def noisy_crops(photos: list[str], directory: Path, count: int, seed: int) -> Path:
    """``count`` crops of the example ``photos`` resized to 32 x 32, with Gaussian noise of std
    0.25 x level (level uniform in [0, 1]) and MOS 5 - 4 x level, as PNG files and a manifest."""
    from qscorer_reward.training import IQARecord, write_manifest

    rng = np.random.default_rng(seed)
    sources = [Image.open(PHOTOS / f"{name}_pristine.png").convert("RGB") for name in photos]
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        photo = sources[rng.integers(len(sources))]
        side = int(rng.integers(CROP, min(photo.size) // 2 + 1))
        left, top = int(rng.integers(photo.width - side + 1)), int(rng.integers(photo.height - side + 1))
        crop = photo.crop((left, top, left + side, top + side)).resize((CROP, CROP), Image.Resampling.BILINEAR)
        level = float(rng.uniform())
        pixels = np.asarray(crop, dtype=np.float32) / 255 + rng.normal(0.0, MAX_NOISE_STD * level, (CROP, CROP, 3))
        path = directory / f"{index:05d}.png"
        Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(path)
        records.append(IQARecord(path=path, mos=5.0 - 4.0 * level))
    return write_manifest(records, directory / "manifest.csv")


def build_base_model(directory: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from qscorer_reward.testing import tiny_backbone_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_backbone_config("qwen2_5_vl", vocab_size=len(tokenizer) + 2)
    config.vision_config.patch_size = 4
    config.vision_config.window_size = 16
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="the folder for the base model, data and run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 4 steps on 32 crops")
    args = parser.parse_args()
    steps, train_count, held_out_count = (4, 32, 16) if args.smoke else (args.steps, 800, 64)

    from qscorer_reward import QScorer
    from qscorer_reward.training import DatasetConfig, LoraSettings, ScoreTokenTrainer, TrainingConfig

    torch.set_num_threads(1)  # tiny models run fastest on one thread
    build_base_model(args.output / "base")
    train = noisy_crops(["astronaut", "coffee"], args.output / "data" / "train", count=train_count, seed=0)
    held_out = noisy_crops(["chelsea"], args.output / "data" / "held_out", count=held_out_count, seed=1)
    config = TrainingConfig(
        base_model=str(args.output / "base"),
        output_dir=str(args.output / "run"),
        train_datasets=[DatasetConfig(name="noise", path=str(train))],
        eval_datasets=[DatasetConfig(name="held-out", path=str(held_out))],
        num_score_tokens=1,
        min_pixels=16 * 16,
        max_pixels=32 * 32,
        dtype="float32",
        mixed_precision="no",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        train_vision_tower=True,
        train_merger=True,
        max_steps=steps,
        learning_rate=1e-3,
        warmup_ratio=0.05,
        gradient_checkpointing=False,
        num_workers=0,
        eval_steps=min(100, steps),
        save_steps=min(100, steps),
        logging_steps=50,
    )
    config.save(args.output / "tiny.yaml")  # `qscorer train --config runs/tiny/tiny.yaml` runs the same
    report = ScoreTokenTrainer(config).train(resume=None)
    print(f"held-out SRCC {report['held-out']['srcc']:.3f}, PLCC {report['held-out']['plcc']:.3f}")

    scorer = QScorer.from_pretrained(args.output / "run" / "final")
    samples = sorted((args.output / "data" / "held_out").glob("*.png"))[:4]
    for path, score in zip(samples, scorer(samples).tolist()):
        print(f"{score:5.2f}  {path.name}")


if __name__ == "__main__":
    main()
