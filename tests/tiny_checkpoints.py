"""Tiny Q-Scorer checkpoints in both forms, written by the package's own training module, for tests of
what is built on a checkpoint (pairwise training, the documentation's examples)."""

from __future__ import annotations

from pathlib import Path

import torch
from noisy_crops import make_synthetic_dataset

from qscorer_reward.testing import tiny_base_model

SIDE = 32


def pixels(count: int, seed: int) -> torch.Tensor:
    """Random float images ``[count, 3, SIDE, SIDE]`` in [0, 1]."""
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def pairs(count: int = 8):
    """A ``datasets.Dataset`` of ``count`` random image pairs (``chosen``, ``rejected``; PIL)."""
    from datasets import Dataset
    from PIL import Image

    images = [Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()) for image in pixels(2 * count, seed=3)]
    return Dataset.from_dict({"chosen": images[:count], "rejected": images[count:]})


def tiny_training_config(directory: Path, seed: int = 0):
    """A two-step `TrainingConfig` on a tiny local base (saved in ``directory / "base"``) and eight
    noisy crops: a LoRA adapter on ``q_proj`` / ``v_proj`` and the vision merger trained whole."""
    from qscorer_reward.training import DatasetConfig, LoraSettings, TrainingConfig

    model, tokenizer = tiny_base_model("qwen2_5_vl", seed=seed)
    model.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    manifest = make_synthetic_dataset(directory / "data", ("astronaut", "coffee"), num_images=8, image_size=SIDE)
    return TrainingConfig(
        base_model=str(directory / "base"),
        output_dir=str(directory / "run"),
        train_datasets=[DatasetConfig(name="noise", path=str(manifest))],
        num_score_tokens=1,
        min_pixels=SIDE * SIDE,
        max_pixels=SIDE * SIDE,
        dtype="float32",
        mixed_precision="no",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train_merger=True,
        max_steps=2,
        per_device_batch_size=4,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        num_workers=0,
        logging_steps=1,
    )


def trained_final(directory: Path, seed: int = 0) -> Path:
    """The ``final/`` checkpoint of `tiny_training_config`'s run (``qscorer train``): trained parts,
    with the LoRA adapter, the merger (``trained_modules.safetensors``), the score-token rows and the head."""
    from qscorer_reward.training import ScoreTokenTrainer

    config = tiny_training_config(directory, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ScoreTokenTrainer(config).train(resume=None)
    finally:
        torch.set_num_threads(threads)
    return Path(config.output_dir) / "final"


def whole_weights(trained_parts: Path, directory: Path) -> Path:
    """``trained_parts`` converted to the ``full`` form (the adapter merged), as ``save_merged`` does."""
    from qscorer_reward.training.export import save_merged

    return save_merged(trained_parts, directory)
