"""The vision probe and `VisionTowerFirst`, how qscorer-tiny's tower learns: the probe reaches the
tower, and with the language model's input detached nothing else does; as a trainer callback it
trains the vision side alone, then everything, each group clipped on its own; a run resumed after
the switch ends as the uninterrupted one; and the setup learns a known quality function."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qscorer_reward import QScorer
from qscorer_reward.testing import tiny_backbone_config, tiny_tokenizer
from qscorer_reward.training.config import (
    AugmentSettings,
    DatasetConfig,
    LossWeights,
    ParameterGroup,
    TrainingConfig,
)
from qscorer_reward.training.export import save_trained_parts
from qscorer_reward.training.model import QScorerForTraining, TrainableParts, answer_token_count
from qscorer_reward.training.trainer import ScoreTokenTrainer
from recipes.qscorer_tiny.make_tiny_base import write_tiny_base
from recipes.qscorer_tiny.synthetic_shard import SyntheticSettings, ensure_synthetic_shard
from recipes.qscorer_tiny.vision_probe import VisionProbe, VisionTowerFirst

ANSWER = "The quality of the image is"
SIZE = 56
IMAGES = [torch.rand(3, SIZE, 70, generator=torch.Generator().manual_seed(0)), torch.rand(3, 84, SIZE)]
VISION_GROUPS = [ParameterGroup("vision", ["*.visual.*", "training_aids.*"]), ParameterGroup("language", start_step=3)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    settings = SyntheticSettings(length=16, size=SIZE, group_size=4, workers=1)
    return ensure_synthetic_shard(tmp_path_factory.mktemp("shard") / "train", settings)


def is_vision_side(name: str) -> bool:
    return ".visual." in f".{name}" or name.startswith("training_aids.")


@pytest.mark.parametrize("detach", [False, True])
def test_the_probe_reaches_the_tower_and_detaching_stops_the_score_path_there(base, tmp_path, detach):
    torch.manual_seed(0)
    scorer = QScorer.from_base_model(base, num_score_tokens=1, max_pixels=112 * 112)
    parts = TrainableParts(lora=None, vision_tower=True, merger=True, language_model=True)
    model = QScorerForTraining(scorer, parts, answer_token_count(scorer, ANSWER), gradient_checkpointing=False)
    backbone = scorer.backbone.model
    probe = VisionProbe(backbone.model.visual, backbone.config.text_config.hidden_size, 3.0, detach)
    model.add_training_aid("vision_probe", probe)
    outputs = model.train()(IMAGES)
    assert outputs["vision_probe_scores"].shape == (2,) and outputs["vision_probe_scores"].dtype == torch.float32
    tower = [p for n, p in model.named_parameters() if ".visual." in n]
    language = [p for n, p in model.named_parameters() if ".language_model.layers." in n]

    outputs["scores"].sum().backward()  # the score path alone
    assert all(p.grad is not None for p in language)
    reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower]
    assert not any(reached) if detach else all(reached)
    model.zero_grad(set_to_none=True)
    model(IMAGES)["vision_probe_scores"].sum().backward()  # the probe reaches the tower either way
    assert all(p.grad is not None for p in tower) and all(p.grad is None for p in language)
    # A vision-only forward gives the probe the same scores without the language model.
    with torch.no_grad():
        full, vision_only = model.eval()(IMAGES), model(IMAGES, vision_only=True)
    assert vision_only.keys() == {"vision_probe_scores"}
    torch.testing.assert_close(vision_only["vision_probe_scores"], full["vision_probe_scores"])
    # The probe is a training aid: the exported checkpoint has no trace of it and scores the same.
    directory = save_trained_parts(model, model.state_dict(), tmp_path / f"parts-{detach}")
    assert torch.allclose(QScorer.from_pretrained(directory)(IMAGES), full["scores"], atol=1e-5)


def tower_first_config(base, shard, output_dir, **overrides) -> TrainingConfig:
    """6 steps of the recipe's setup, the first 3 of the vision side alone."""
    settings = dict(
        base_model=str(base), output_dir=str(output_dir), num_score_tokens=1,
        train_datasets=[DatasetConfig(name="shard", path=str(shard), group_size=4)],
        min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE, dtype="float32", mixed_precision="no", lora=None,
        train_vision_tower=True, train_merger=True, train_language_model=True, parameter_groups=VISION_GROUPS,
        loss=LossWeights(mse=1.0, ce=0.05, fidelity=1.0), augment=AugmentSettings(hflip=True), max_steps=6,
        per_device_batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, max_grad_norm=0.01, logging_steps=1,
        num_workers=0, gradient_checkpointing=False, save_steps=None,
    )  # fmt: skip
    return TrainingConfig(**(settings | overrides))


def log_events(output_dir, event: str) -> list[dict]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def test_the_vision_side_trains_alone_then_everything_each_group_clipped_on_its_own(base, shard, tmp_path, monkeypatch):
    steps = []  # per optimizer step: the gradients it applies and each group's lr
    adamw_step = torch.optim.AdamW.step

    def record(optimizer, *args, **kwargs):
        gradients = {id(p): p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        steps.append((gradients, {group["group"]: group["lr"] for group in optimizer.param_groups}))
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    trainer = ScoreTokenTrainer(tower_first_config(base, shard, tmp_path / "out"), callbacks=[VisionTowerFirst(3)])
    language_model_calls = []
    build = trainer._build_model

    def build_and_watch():
        model = build()
        language_model = model.scorer.backbone.model.model.language_model
        language_model.register_forward_hook(lambda *args: language_model_calls.append(1))
        return model

    monkeypatch.setattr(trainer, "_build_model", build_and_watch)
    trainer.train(resume=None)

    names = {id(param): name for name, param in trainer.prepared.named_parameters()}
    vision = {i for i, name in names.items() if is_vision_side(name)}
    assert len(steps) == 6 and any(name.startswith("training_aids.vision_probe.") for name in names.values())
    for gradients, rates in steps[:3]:
        assert gradients and gradients.keys() <= vision
        assert rates["vision"] > 0 and rates["language"] == 0
    for gradients, rates in steps[3:]:
        assert gradients.keys() & vision and gradients.keys() - vision
        assert rates["vision"] > 0 and rates["language"] > 0
        # Clipped as one vector, the language model's large gradients would shrink the tower's too.
        for part in (vision, gradients.keys() - vision):
            norm = sum(float(gradients[i].pow(2).sum()) for i in part) ** 0.5
            assert norm == pytest.approx(0.01, rel=1e-3)
    assert len(language_model_calls) == 3  # the last 3 steps only (no evaluation here)
    records = log_events(tmp_path / "out", "train")
    assert [("mse" in r, "vision_probe" in r) for r in records] == [(False, True)] * 3 + [(True, True)] * 3


def test_a_run_resumed_after_the_switch_ends_as_the_uninterrupted_one(base, shard, tmp_path):
    def run(output_dir, **settings):
        config = tower_first_config(base, shard, output_dir, save_steps=2, save_total_limit=None, **settings)
        ScoreTokenTrainer(config, callbacks=[VisionTowerFirst(3)]).train()

    run(tmp_path / "uninterrupted")
    checkpoint = "checkpoints/step-00000004"
    shutil.copytree(tmp_path / "uninterrupted" / checkpoint, tmp_path / "resumed" / checkpoint)
    run(tmp_path / "resumed")
    assert log_events(tmp_path / "resumed", "resumed")[0]["step"] == 4
    for name in ("head.safetensors", "score_tokens.safetensors", "trained_modules.safetensors"):
        expected, got = (load_file(tmp_path / run / "final" / name) for run in ("uninterrupted", "resumed"))
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_the_recipes_setup_learns_a_known_quality_function(tmp_path):
    # As qscorer-tiny trains: whole language model, no LoRA, the tower learning from the probe
    # alone, each part's gradients clipped on their own; on noise crops with 4-pixel patches, which
    # a random tower learns in a few hundred steps.
    from transformers import AutoModelForImageTextToText

    from tests.noisy_crops import make_synthetic_dataset

    tokenizer = tiny_tokenizer()
    backbone = tiny_backbone_config("qwen2_5_vl", vocab_size=len(tokenizer) + 2)
    backbone.vision_config.patch_size, backbone.vision_config.window_size = 4, 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(backbone, attn_implementation="sdpa").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    photos = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
    train = make_synthetic_dataset(tmp_path / "train", photos, num_images=800, image_size=32, seed=0)
    held_out = make_synthetic_dataset(
        tmp_path / "held", ["coins", "moon", "gravel", "clock"], 64, image_size=32, seed=1
    )
    config = TrainingConfig(
        base_model=str(tmp_path / "base"), output_dir=str(tmp_path / "out"), num_score_tokens=1,
        train_datasets=[DatasetConfig(name="noise", path=str(train))],
        eval_datasets=[DatasetConfig(name="held-out", path=str(held_out))],
        min_pixels=16 * 16, max_pixels=32 * 32, dtype="float32", mixed_precision="no", lora=None,
        train_vision_tower=True, train_merger=True, train_language_model=True,
        parameter_groups=[VISION_GROUPS[0], ParameterGroup("language")], loss=LossWeights(mse=1.0, ce=0.05),
        max_steps=300, per_device_batch_size=16, learning_rate=1e-3, warmup_ratio=0.05,
        gradient_checkpointing=False, num_workers=0, eval_steps=10_000, save_steps=None, logging_steps=50,
    )  # fmt: skip
    report = ScoreTokenTrainer(config, callbacks=[VisionTowerFirst(0)]).train()
    assert report["held-out"]["srcc"] >= 0.9, report
    probe_losses = [record["vision_probe"] for record in log_events(tmp_path / "out", "train")]
    assert probe_losses[-1] < 0.3 * probe_losses[0]
