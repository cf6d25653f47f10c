"""Fine-tune a Q-Scorer on pairwise image preferences with `QScorerRewardTrainer` (LoRA + head).

The pairs here come from the example photos in examples/images: a crop of a pristine photo is
preferred over the same crop of its blurred, noisy or heavily compressed version. Two photos train,
the third is held out. For your own data, build a ``datasets.Dataset`` with ``chosen`` and
``rejected`` image columns (and, optionally, ``margin``).

    python examples/pairwise_reward_training.py --output-dir runs/pairwise     # a tiny random scorer, CPU
    python examples/pairwise_reward_training.py --output-dir runs/pairwise \
        --scorer path/to/qscorer-checkpoint --device cuda --epochs 3
    qscorer score examples/images --model runs/pairwise                          # the checkpoint it wrote

The tiny default scorer starts from random weights and trains for a few steps: its numbers show the
workflow (held-out accuracy before and after, a checkpoint that loads back), not a useful model; it
does not learn these distortions in so few steps. Its base model is written beside the checkpoint
(``OUTPUT_DIR/base``), which names it. ``--smoke`` trains on fewer pairs for one epoch (seconds).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from qscorer_reward import QScorer
from qscorer_reward.training.pairwise import QScorerRewardConfig, QScorerRewardTrainer

IMAGES = Path(__file__).resolve().parent / "images"
DISTORTIONS = ("blur", "noise", "jpeg")
CROP = 112


def crop_pairs(photos: list[str], crops_per_image: int, rng: np.random.Generator) -> Dataset:
    """Pristine crop (chosen) vs the same crop of a distorted version (rejected)."""
    chosen, rejected = [], []
    for photo in photos:
        pristine = Image.open(IMAGES / f"{photo}_pristine.png").convert("RGB")
        for distortion in DISTORTIONS:
            distorted = Image.open(IMAGES / f"{photo}_{distortion}.png").convert("RGB")
            for _ in range(crops_per_image):
                left = int(rng.integers(0, pristine.width - CROP + 1))
                top = int(rng.integers(0, pristine.height - CROP + 1))
                box = (left, top, left + CROP, top + CROP)
                chosen.append(pristine.crop(box))
                rejected.append(distorted.crop(box))
    return Dataset.from_dict({"chosen": chosen, "rejected": rejected})


def untrained_tiny_scorer(directory: Path) -> QScorer:
    """A tiny random Q-Scorer on a base model saved to ``directory`` (LoRA checkpoints record the
    base model they apply to, so it has to exist on disk for as long as they do)."""
    from qscorer_reward.testing import tiny_base_model

    model, tokenizer = tiny_base_model("qwen2_5_vl")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return QScorer.from_base_model(directory, max_pixels=CROP * CROP)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where the checkpoint is written")
    parser.add_argument("--scorer", help="Q-Scorer checkpoint to fine-tune (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: fewer pairs, one epoch")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # the tiny scorer's random weights
    crops = 2 if args.smoke else 8
    train = crop_pairs(["astronaut", "coffee"], crops_per_image=crops, rng=rng)
    held_out = crop_pairs(["chelsea"], crops_per_image=crops, rng=rng)

    if args.scorer:
        # merge_lora=False: an adapter already in the checkpoint stays separate and is trained further
        # (the trainer then trains it instead of adding the one of peft_config).
        scorer = QScorer.from_pretrained(args.scorer, device=args.device, merge_lora=False)
    else:
        scorer = untrained_tiny_scorer(args.output_dir / "base")
    config = QScorerRewardConfig(
        output_dir=str(args.output_dir),
        num_train_epochs=1 if args.smoke else args.epochs,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        fidelity_weight=0.5,
        logging_steps=4,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.device != "cpu",
        save_strategy="no",
    )
    trainer = QScorerRewardTrainer(
        model=scorer,
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"held-out pairs ranked right: {before['eval_accuracy']:.2f} before, {after['eval_accuracy']:.2f} after")
    print(f"mean score margin: {before['eval_margin']:+.3f} before, {after['eval_margin']:+.3f} after")

    trainer.save_model()
    reloaded = QScorer.from_pretrained(args.output_dir, device=args.device)
    pristine = Image.open(IMAGES / "chelsea_pristine.png").convert("RGB")
    blurred = Image.open(IMAGES / "chelsea_blur.png").convert("RGB")
    with torch.no_grad():
        scores = reloaded([pristine, blurred]).tolist()
    print(f"reloaded from {args.output_dir}: chelsea pristine {scores[0]:.3f}, blurred {scores[1]:.3f}")


if __name__ == "__main__":
    main()
