"""Reward fine-tuning (DRaFT-K and ReFL with LoRA) of a tiny Stable Diffusion pipeline against a tiny
Q-Scorer: the held-out reward rises, the LoRA weights save and load, resume continues exactly."""

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from peft.utils import get_peft_model_state_dict

from qscorer_reward.integrations.diffusers.reward_finetune import (
    RewardFinetuneConfig,
    RewardFinetuner,
    load_prompts,
    main,
)
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.testing.pipelines import tiny_pipeline

CONFIG_DIR = Path(__file__).resolve().parents[1] / "training" / "configs"
TRAIN_PROMPTS = ["a cat", "a dog", "a red car", "a tree", "a house", "a bird"]
EVAL_PROMPTS = ["a horse", "a boat", "a flower", "a cup"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def scorer():
    return tiny_scorer(max_pixels=56 * 56)


def tiny_config(output_dir, **overrides) -> RewardFinetuneConfig:
    values = dict(
        method="draft",
        truncation_steps=2,
        num_inference_steps=4,
        guidance_scale=3.0,
        resolution=32,
        lora_rank=4,
        lora_alpha=4.0,
        learning_rate=5e-2,
        max_train_steps=6,
        train_batch_size=2,
        mixed_precision="no",
        train_prompts=TRAIN_PROMPTS,
        eval_prompts=EVAL_PROMPTS,
        eval_every=6,
        checkpoint_every=100,
        output_dir=str(output_dir),
    )
    return RewardFinetuneConfig(**{**values, **overrides})


def finetuner(config, seed=0):
    torch.manual_seed(seed)  # the LoRA initialisation
    return RewardFinetuner(tiny_pipeline("sd"), scorer(), config)


def sample(pipe, prompts, seeds):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts, generator=generators, num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="pt"
    ).images


def test_draft_raises_the_held_out_reward_and_the_lora_weights_load_into_a_fresh_pipeline(tmp_path):
    trainer = finetuner(tiny_config(tmp_path))
    history = trainer.train()

    assert [record["step"] for record in history] == [0, 6]
    before, after = history[0]["mean_reward"], history[-1]["mean_reward"]
    assert after > before + 0.005, f"held-out reward {before:.4f} -> {after:.4f}"
    assert (tmp_path / "eval" / "step_000000.png").is_file() and (tmp_path / "eval" / "step_000006.png").is_file()
    lines = (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 6]

    # The saved LoRA, loaded by diffusers into a fresh pipeline, reproduces the evaluated images.
    fresh = tiny_pipeline("sd")
    base_images = sample(fresh, EVAL_PROMPTS, range(4))
    fresh.load_lora_weights(tmp_path)
    loaded_images = sample(fresh, EVAL_PROMPTS, range(4))
    torch.testing.assert_close(loaded_images, sample(trainer.pipeline, EVAL_PROMPTS, range(4)), rtol=0, atol=1e-5)
    assert (loaded_images - base_images).abs().max() > 1e-3
    torch.testing.assert_close(scorer()(loaded_images), torch.tensor(history[-1]["rewards"]), rtol=0, atol=1e-5)


def test_refl_raises_the_held_out_reward(tmp_path):
    history = finetuner(tiny_config(tmp_path, method="refl", max_train_steps=8, eval_every=8)).train()
    before, after = history[0]["mean_reward"], history[-1]["mean_reward"]
    assert after > before + 0.005, f"held-out reward {before:.4f} -> {after:.4f}"


def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path):
    straight = finetuner(tiny_config(tmp_path / "straight", max_train_steps=4, eval_prompts=[]))
    straight.train()
    interrupted = finetuner(tiny_config(tmp_path / "resumed", max_train_steps=2, eval_prompts=[], checkpoint_every=2))
    interrupted.train()
    assert (tmp_path / "resumed" / "checkpoint-2" / "optimizer.pt").is_file()
    resumed = finetuner(
        tiny_config(tmp_path / "resumed", max_train_steps=4, eval_prompts=[], resume_from="latest"), seed=123
    )
    resumed.train()

    assert resumed.step == 4
    expected = get_peft_model_state_dict(straight.denoiser)
    actual = get_peft_model_state_dict(resumed.denoiser)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_kl_term_is_zero_at_the_base_model_and_enters_the_loss(tmp_path):
    # ReFL at a middle step (1 or 2 of 4): the pipeline is stopped right after the step with gradients.
    config = tiny_config(tmp_path, method="refl", refl_step_range=(0.25, 0.75), kl_weight=10.0, eval_prompts=[])
    trainer = finetuner(config)
    first = trainer.train_step()
    assert first["kl"] == 0.0  # the LoRA starts as an identity (B = 0)
    second = trainer.train_step()
    assert second["kl"] > 0.0
    assert second["loss"] == pytest.approx(-second["reward"] + 10.0 * second["kl"], rel=1e-5)


def test_reward_above_the_clip_gives_no_gradient(tmp_path):
    trainer = finetuner(tiny_config(tmp_path, reward_clip=1.5, eval_prompts=[]))
    before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.denoiser).items()}
    metrics = trainer.train_step()
    assert metrics["reward"] > 1.5 and metrics["grad_norm"] == 0.0
    for key, value in get_peft_model_state_dict(trainer.denoiser).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------ config, CLI


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_shipped_configs_load_and_name_their_prompts(name):
    config = RewardFinetuneConfig.from_file(CONFIG_DIR / f"reward_finetune_{name}.yaml")
    assert config.pretrained_model
    train, held_out = load_prompts(config.train_prompts), load_prompts(config.eval_prompts)
    assert len(train) >= 20 and len(held_out) >= 4
    assert not set(train) & set(held_out)


def test_config_round_trips_through_yaml_and_json(tmp_path):
    config = tiny_config(tmp_path, reward_clip=4.5, kl_weight=0.1)
    for suffix in (".yaml", ".json"):
        config.save(tmp_path / f"config{suffix}")
        assert RewardFinetuneConfig.from_file(tmp_path / f"config{suffix}") == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(truncation_steps=4), "truncation_steps must be in 1..num_inference_steps - 1 = 3"),
        (dict(method="ppo"), "method must be one of"),
        (dict(refl_step_range=(0.9, 0.5)), "refl_step_range must be"),
        (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
        (dict(train_batch_size=0), "train_batch_size must be >= 1"),
    ],
)
def test_bad_config_values_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **overrides)


def test_unknown_config_keys_and_pipelines_are_refused(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1e-4, "learnig_rate": 1e-3}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \[.learnig_rate.\]"):
        RewardFinetuneConfig.from_file(tmp_path / "bad.json")
    img2img = StableDiffusionImg2ImgPipeline(**tiny_pipeline("sd").components)
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline is not supported"):
        RewardFinetuner(img2img, scorer(), tiny_config(tmp_path))


def test_module_entry_point_trains_from_saved_models(tmp_path, capsys):
    tiny_pipeline("sd").save_pretrained(tmp_path / "pipeline")
    scorer().save_pretrained(tmp_path / "scorer")
    config = tiny_config(
        tmp_path / "run", pretrained_model=str(tmp_path / "pipeline"), scorer=str(tmp_path / "scorer"), eval_every=1
    )
    config.save(tmp_path / "config.yaml")
    main(["--config", str(tmp_path / "config.yaml"), "--set", "max_train_steps=1", "eval_prompts=[a horse]"])

    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    saved = RewardFinetuneConfig.from_file(tmp_path / "run" / "reward_finetune_config.yaml")
    assert saved.max_train_steps == 1 and saved.eval_prompts == ["a horse"]
    assert "held-out reward" in capsys.readouterr().out
