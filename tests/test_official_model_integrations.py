"""The paper's model (the fixture's tiny release, converted) in the integrations: reward guidance,
the quality gate and best-of-N in a real tiny StableDiffusionPipeline, a real GRPOTrainer run, the
DDPO reward protocol, and ``qscorer convert-official`` + ``qscorer score`` from the command line."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file
from trl import GRPOConfig, GRPOTrainer

from qscorer_reward import QScorer
from qscorer_reward.integrations.ddpo import QScorerDDPOReward
from qscorer_reward.integrations.diffusers import QScorerGuidance, QualityGate, best_of_n
from qscorer_reward.integrations.trl import QScorerRewardFunc
from qscorer_reward.official_checkpoint import convert_official, missing_official_packages
from qscorer_reward.testing.pipelines import tiny_call_kwargs, tiny_pipeline
from qscorer_reward.testing.policies import tiny_policy

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "qscorer_official_tiny"
PROMPTS = ["a cat on a sofa", "a red car", "a mountain lake", "a bowl of fruit"]

pytestmark = [
    pytest.mark.skipif(not FIXTURE.is_dir(), reason="needs ../shared/fixtures/qscorer_official_tiny (golden data)"),
    pytest.mark.skipif(
        bool(missing_official_packages()),
        reason="the fixture's tokenizer.model needs sentencepiece and protobuf: pip install -e '.[official]'",
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """The fixture's release converted once, loaded from this package's format."""
    output = tmp_path_factory.mktemp("converted") / "qscorer-official"
    convert_official(FIXTURE / "lora_subset", FIXTURE / "base", output)
    return QScorer.from_pretrained(output)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def generate(pipe, callback=None, seeds=(0, 1, 2, 3)):
    return pipe(
        PROMPTS[: len(seeds)],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        callback_on_step_end=callback,
        output_type="pt",
        **tiny_call_kwargs("sd"),
    ).images


def test_guidance_raises_the_papers_score_in_stable_diffusion(scorer, pipe):
    unguided = generate(pipe)
    guidance = QScorerGuidance(scorer, guidance_scale=0.1)
    guided = generate(pipe, guidance)
    gain = (scorer(guided) - scorer(unguided)).mean().item()
    assert gain > 0.05, f"guidance changed the mean score by {gain:+.4f}"
    assert guidance.step_scores[3].mean() > guidance.step_scores[1].mean()


def test_best_of_n_and_the_gate_rank_by_the_papers_score(scorer, pipe):
    result = best_of_n(pipe, "a red car", 3, scorer, output_type="pt", **tiny_call_kwargs("sd"))
    assert result.scores[0, 0] == result.all_scores.max()
    torch.testing.assert_close(scorer(result.images[0][0]), result.scores[0, :1], rtol=0, atol=1e-5)

    gate = QualityGate(scorer, threshold=0.0, gate_step_index=2)
    generate(pipe, gate)
    assert gate.scores.shape == (4,) and gate.passed.all()
    torch.testing.assert_close(scorer(gate.previews), gate.scores, rtol=0, atol=1e-5)


def test_the_ddpo_reward_protocol(scorer):
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    rewards, metadata = QScorerDDPOReward(scorer)(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(rewards, scorer(images))
    torch.testing.assert_close(metadata["scores"], rewards)


def test_a_grpo_trainer_step_takes_its_reward_from_the_papers_model(scorer, tmp_path):
    paths = []
    for index, seed in enumerate((3, 4)):
        pixels = torch.randint(0, 256, (40, 60, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(pixels.numpy()).save(paths[-1])
    image_scores = scorer(paths)
    dataset = Dataset.from_dict({"prompt": ["a red cat", "a blue dog"] * 2, "image_path": paths * 2})
    policy, tokenizer = tiny_policy()
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
        max_completion_length=6, max_steps=1, logging_steps=1, learning_rate=1e-2, report_to="none",
        use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no", seed=0, beta=0.0,
    )  # fmt: skip
    reward = QScorerRewardFunc(scorer, image_key="image_path")
    trainer = GRPOTrainer(
        model=policy, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/qscorer/mean" in entry]
    assert len(logged) == 1 and trainer.state.global_step == 1
    assert image_scores.min() - 1e-5 <= logged[0]["rewards/qscorer/mean"] <= image_scores.max() + 1e-5


@pytest.mark.slow
def test_convert_official_and_score_from_the_command_line(tmp_path):
    command = [sys.executable, "-m", "qscorer_reward.cli"]
    output = tmp_path / "qscorer-official"
    converted = subprocess.run(
        [*command, "convert-official", str(FIXTURE / "lora_full_dump"), "--base-model", str(FIXTURE / "base"),
         "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert f"wrote {output}" in converted.stderr
    scored = subprocess.run(
        [*command, "score", str(FIXTURE / "images"), "--model", str(output), "--output", str(tmp_path / "s.csv"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    with open(tmp_path / "s.csv") as stream:
        scores = {Path(row["path"]).stem: float(row["score"]) for row in csv.DictReader(stream)}
    golden = load_file(FIXTURE / "golden.safetensors")
    assert len(scores) == 4
    for stem, score in scores.items():
        assert score == pytest.approx(golden[f"lora_full_dump/{stem}/score_fp32_pixels"].item(), abs=1e-4)
