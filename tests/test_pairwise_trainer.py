"""QScorerRewardTrainer: learning a pairwise preference with LoRA or whole, its checkpoints, resuming,
the image-pair collator, the losses and bad input."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from scipy.stats import norm

from qscorer_reward import QScorer
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.training.pairwise import (
    ImagePairCollator,
    QScorerRewardConfig,
    QScorerRewardTrainer,
    bradley_terry_loss,
    save_into,
    thurstone_fidelity_loss,
)

SIDE = 56


def to_pil(pixels):
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def scenes(count, seed):
    """Smooth random scenes, float [count, 3, SIDE, SIDE] in [0, 1]."""
    coarse = torch.rand(count, 3, 7, 7, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear")


def brightness_pairs(count, seed, prefer_bright):
    """Each scene darkened and brightened; the preferred version is a fixed choice."""
    base = scenes(count, seed)
    dark, bright = base * 0.5, base * 0.5 + 0.5
    chosen, rejected = (bright, dark) if prefer_bright else (dark, bright)
    return Dataset.from_dict(
        {
            "chosen": [to_pil(image) for image in chosen],
            "rejected": [to_pil(image) for image in rejected],
            "prompt": ["a scene"] * count,  # accepted and dropped
        }
    )


def config(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=2e-3,
        logging_steps=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        seed=0,
    )
    return QScorerRewardConfig(**{**defaults, **overrides})


def test_lora_training_learns_a_preference_the_untrained_scorer_gets_wrong(base_model_dir, tmp_path):
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(base_model_dir, num_score_tokens=1, max_pixels=SIDE * SIDE)
    probe = scenes(8, seed=99)
    # Prefer whichever of bright / dark the untrained scorer ranks lower, so that learning is needed.
    prefer_bright = bool((scorer(probe * 0.5 + 0.5) < scorer(probe * 0.5)).float().mean() > 0.5)
    trainer = QScorerRewardTrainer(
        model=scorer,
        args=config(tmp_path, num_train_epochs=2, fidelity_weight=0.5),
        train_dataset=brightness_pairs(32, seed=0, prefer_bright=prefer_bright),
        eval_dataset=brightness_pairs(16, seed=1, prefer_bright=prefer_bright),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainable = {name for name, param in scorer.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("head.") for name in trainable)
    assert any(name.startswith("head.") for name in trainable)

    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert before["eval_accuracy"] <= 0.5
    assert after["eval_accuracy"] >= 0.8
    assert after["eval_margin"] > before["eval_margin"]
    assert any("fidelity_loss" in entry for entry in trainer.state.log_history)

    trainer.save_model()
    output = tmp_path / "run"
    assert {"adapter_model.safetensors", "head.safetensors", "qscorer_config.json"} <= {
        p.name for p in output.iterdir()
    }
    loaded = QScorer.from_pretrained(output)
    images = scenes(3, seed=5)
    with torch.no_grad():
        trained = trainer.model.eval()(images)
    assert torch.allclose(loaded(images), trained, atol=1e-5)
    assert not torch.allclose(QScorer.from_base_model(base_model_dir, max_pixels=SIDE * SIDE)(images), trained)


def test_full_training_checkpoints_resume_and_load(tmp_path):
    scorer = tiny_scorer(max_pixels=SIDE * SIDE, seed=3)
    train = brightness_pairs(8, seed=0, prefer_bright=True)
    # TRL's default gradient checkpointing, applied through QScorer.gradient_checkpointing_enable.
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, activation_checkpointing=True)
    trainer = QScorerRewardTrainer(model=scorer, args=args, train_dataset=train)
    assert all(param.requires_grad for param in scorer.parameters())
    assert scorer.is_gradient_checkpointing and not args.activation_checkpointing
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "qscorer_config.json", "trainer_state.json", "optimizer.pt"} <= files
    images = scenes(2, seed=7)
    with torch.no_grad():
        trained = trainer.model.eval()(images)
    assert not torch.allclose(tiny_scorer(max_pixels=SIDE * SIDE, seed=3)(images), trained, atol=1e-4)
    assert torch.allclose(QScorer.from_pretrained(checkpoint)(images), trained, atol=1e-5)

    # Resuming restores those weights into a fresh scorer (and, at the last step, trains no further).
    resumed = QScorerRewardTrainer(model=tiny_scorer(max_pixels=SIDE * SIDE, seed=3), args=args, train_dataset=train)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    with torch.no_grad():
        assert torch.allclose(resumed.model.eval()(images), trained, atol=1e-5)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    args = config(
        tmp_path,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="margin",
        greater_is_better=False,  # lowest margin wins: an early checkpoint, not the final weights
    )
    trainer = QScorerRewardTrainer(
        model=tiny_scorer(max_pixels=SIDE * SIDE, seed=3),
        args=args,
        train_dataset=brightness_pairs(8, seed=0, prefer_bright=True),
        eval_dataset=brightness_pairs(4, seed=1, prefer_bright=True),
    )
    trainer.train()
    margins = [entry["eval_margin"] for entry in trainer.state.log_history if "eval_margin" in entry]
    best = min(range(len(margins)), key=margins.__getitem__)
    assert best < len(margins) - 1 and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best + 1}")
    images = scenes(2, seed=7)
    with torch.no_grad():
        final = trainer.model.eval()(images)
    assert torch.allclose(final, QScorer.from_pretrained(trainer.state.best_model_checkpoint)(images), atol=1e-5)


def test_save_into_keeps_other_files_and_replaces_an_earlier_checkpoint(tmp_path):
    directory = tmp_path / "run"
    (directory / "checkpoint-1").mkdir(parents=True)
    (directory / "README.md").write_text("card")
    (directory / "adapter_model.safetensors").write_bytes(b"stale")
    scorer = tiny_scorer(max_pixels=SIDE * SIDE)
    save_into(scorer, directory, "full")
    names = {p.name for p in directory.iterdir()}
    assert {"checkpoint-1", "README.md", "model.safetensors", "qscorer_config.json"} <= names
    assert "adapter_model.safetensors" not in names
    assert not [name for name in names if name.startswith(".")]
    images = scenes(1, seed=0)
    assert torch.equal(QScorer.from_pretrained(directory)(images), scorer(images))


def test_collator_batches_pairs_chosen_first():
    pixels = scenes(3, seed=0)
    examples = [
        {"chosen": to_pil(pixels[0]), "rejected": np.asarray(to_pil(pixels[1])), "margin": 0.5},
        {"chosen": pixels[2], "rejected": to_pil(pixels[0])},
    ]
    batch = ImagePairCollator()(examples)
    assert torch.equal(batch["margin"], torch.tensor([0.5, 0.0]))
    assert batch["images"].shape == (4, 3, SIDE, SIDE)
    assert torch.allclose(batch["images"][1], pixels[2]) and torch.allclose(batch["images"][3], pixels[0], atol=1 / 255)

    mixed = ImagePairCollator()([{"chosen": torch.rand(3, 56, 70), "rejected": torch.rand(3, 56, 56)}])
    assert isinstance(mixed["images"], list) and [tuple(i.shape) for i in mixed["images"]] == [(3, 56, 70), (3, 56, 56)]


def test_collator_errors_name_the_example():
    with pytest.raises(ValueError, match=r"example 1 has no rejected image; its keys are \['chosen'\]"):
        ImagePairCollator()([{"chosen": torch.rand(3, 56, 56), "rejected": torch.rand(3, 56, 56)}, {"chosen": 1}])
    with pytest.raises(ValueError, match="rejected image of example 0: .*outside the declared input_range"):
        ImagePairCollator()([{"chosen": torch.rand(3, 56, 56), "rejected": torch.rand(3, 56, 56) * 255}])


def test_losses():
    difference = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    expected = np.mean([math.log1p(math.exp(-0.5 * d)) for d in (-1.0, 0.0, 2.0)])
    assert bradley_terry_loss(difference, scale=0.5).item() == pytest.approx(expected, rel=1e-6)

    fidelity = thurstone_fidelity_loss(difference, score_std=0.7)
    probabilities = norm.cdf(np.array([-1.0, 0.0, 2.0]) / (math.sqrt(2) * 0.7))
    assert fidelity.item() == pytest.approx(np.mean(1 - np.sqrt(probabilities)), abs=2e-4)  # eps 1e-8 in sqrt
    fidelity.backward()
    assert torch.isfinite(difference.grad).all() and (difference.grad < 0).all()
    far_behind = torch.tensor([-40.0], requires_grad=True)
    thurstone_fidelity_loss(far_behind).backward()
    assert torch.isfinite(far_behind.grad).all()


def test_bad_setups_are_refused(base_model_dir, tmp_path):
    scorer = tiny_scorer(max_pixels=SIDE * SIDE)
    pairs = brightness_pairs(2, seed=0, prefer_bright=True)
    with pytest.raises(ValueError, match=r"no column 'rejected'.*it has \['chosen', 'prompt'\]"):
        QScorerRewardTrainer(model=scorer, args=config(tmp_path), train_dataset=pairs.remove_columns("rejected"))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        QScorerRewardTrainer(model=scorer, args=config(tmp_path, center_rewards_coefficient=0.01), train_dataset=pairs)
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="config.base_model"):
        QScorerRewardTrainer(model=scorer, args=config(tmp_path), train_dataset=pairs, peft_config=lora)
    with pytest.raises(ValueError, match="modules_to_save"):
        QScorerRewardTrainer(
            model=tiny_scorer(max_pixels=SIDE * SIDE),
            args=config(tmp_path),
            train_dataset=pairs,
            peft_config=LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
    with pytest.raises(ValueError, match="fidelity_weight"):
        config(tmp_path, fidelity_weight=-1.0)
