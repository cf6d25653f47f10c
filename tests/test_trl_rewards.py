"""QScorerRewardFunc: images from columns or a render function, batching, None, normalisation,
logging, the async variant, and real GRPOTrainer / RLOOTrainer runs with it."""

import asyncio
import functools

import pytest
import torch
from datasets import Dataset
from PIL import Image, ImageDraw
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import is_async_callable

from qscorer_reward.integrations.trl import AsyncQScorerRewardFunc, QScorerRewardFunc, message_text
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.testing.pipelines import tiny_pipeline
from qscorer_reward.testing.policies import tiny_policy

SIDE = 56


@functools.cache
def scorer():
    return tiny_scorer(max_pixels=SIDE * SIDE)


def random_images(count, seed=0):
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def to_pil(pixels):
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def render_text(prompts, completions):
    """A render function: draws each completion's text on a white square."""
    images = []
    for text in completions:
        image = Image.new("RGB", (SIDE, SIDE), "white")
        ImageDraw.Draw(image).text((2, SIDE // 3), text, fill="black")
        images.append(image)
    return images


def test_column_images_of_any_type_score_like_the_scorer(tmp_path):
    pixels = random_images(3)
    path = tmp_path / "image.png"
    to_pil(pixels[2]).save(path)
    values = [to_pil(pixels[0]), pixels[1], str(path), None]
    expected = scorer()([to_pil(pixels[0]), pixels[1], str(path)])

    rewards = QScorerRewardFunc(scorer(), batch_size=2)(["p"] * 4, ["c"] * 4, image=values)

    assert rewards[3] is None
    assert rewards[:3] == pytest.approx(expected.tolist(), abs=1e-5)


def test_images_column_rewards_the_mean_score_of_each_samples_images():
    pixels = random_images(3)
    scores = scorer()(pixels)
    values = [[pixels[0], pixels[1]], [], pixels[2:3]]

    rewards = QScorerRewardFunc(scorer())(["p"] * 3, ["c"] * 3, images=values, image=[None] * 3)

    assert rewards[0] == pytest.approx(((scores[0] + scores[1]) / 2).item(), abs=1e-5)
    assert rewards[1] is None
    assert rewards[2] == pytest.approx(scores[2].item(), abs=1e-5)


def test_image_key_selects_the_column():
    pixels = random_images(2)
    rewards = QScorerRewardFunc(scorer(), image_key="generated")(
        ["p"] * 2, ["c"] * 2, generated=list(pixels), image=[None, None]
    )
    assert rewards == pytest.approx(scorer()(pixels).tolist(), abs=1e-5)


def test_no_images_is_an_error_listing_what_trl_passed():
    reward = QScorerRewardFunc(scorer())
    with pytest.raises(ValueError, match=r"'images' or 'image'.*\['caption', 'trainer_state'\]"):
        reward(["p"], ["c"], caption=["x"], trainer_state=None)
    with pytest.raises(ValueError, match=r"'generated'.*\['image'\]"):
        QScorerRewardFunc(scorer(), image_key="generated")(["p"], ["c"], image=[random_images(1)[0]])
    with pytest.raises(ValueError, match="not both"):
        QScorerRewardFunc(scorer(), image_key="image", render_fn=render_text)


def test_nested_lists_of_numbers_are_refused():
    with pytest.raises(TypeError, match=r"image\[0\] holds a list, not an image"):
        QScorerRewardFunc(scorer())(["p"], ["c"], image=[[[[0, 0, 0]] * 4] * 4])


def test_render_fn_gets_texts_and_its_images_are_scored():
    seen = {}

    def render(prompts, completions):
        seen.update(prompts=prompts, completions=completions)
        return render_text(prompts, completions)[:1] + [None]

    prompts = [[{"role": "user", "content": "draw a cat"}], [{"role": "user", "content": "draw a dog"}]]
    completions = [[{"role": "assistant", "content": "a cat"}], [{"role": "assistant", "content": "a dog"}]]
    rewards = QScorerRewardFunc(scorer(), render_fn=render)(prompts, completions)

    assert seen == {"prompts": ["draw a cat", "draw a dog"], "completions": ["a cat", "a dog"]}
    assert rewards[0] == pytest.approx(scorer()(render_text([], ["a cat"])).item(), abs=1e-5)
    assert rewards[1] is None


def test_render_fn_may_return_a_batch_tensor_in_minus_one_one():
    pixels = random_images(2)
    reward = QScorerRewardFunc(scorer(), render_fn=lambda p, c: pixels * 2 - 1, input_range=(-1, 1))
    assert reward(["p"] * 2, ["a", "b"]) == pytest.approx(scorer()(pixels).tolist(), abs=1e-5)


def test_render_fn_with_the_wrong_count_is_an_error():
    reward = QScorerRewardFunc(scorer(), render_fn=lambda p, c: render_text(p, c)[:1])
    with pytest.raises(ValueError, match="one image .* per completion: expected 2, got 1 items"):
        reward(["p"] * 2, ["a", "b"])


def test_normalisation_unit_and_per_prompt_zscores():
    pixels = random_images(5)
    scores = scorer()(pixels)
    values = [pixels[0], pixels[1], None, pixels[2], pixels[3]]
    prompts = ["a", "a", "a", "b", "b"]

    unit = QScorerRewardFunc(scorer(), normalize="unit")(prompts, ["c"] * 5, image=values)
    low, high = scorer().score_range
    expected_unit = ((scores[:4] - low) / (high - low)).tolist()
    assert [r for r in unit if r is not None] == pytest.approx(expected_unit, abs=1e-5)

    zscores = QScorerRewardFunc(scorer(), normalize="group_zscore")(prompts, ["c"] * 5, image=values)
    assert zscores[2] is None
    for indices, group in (([0, 1], scores[0:2]), ([3, 4], scores[2:4])):
        expected = ((group - group.mean()) / (group.std() + 1e-4)).tolist()
        assert [zscores[i] for i in indices] == pytest.approx(expected, abs=1e-4)

    with pytest.raises(ValueError, match="normalize must be"):
        QScorerRewardFunc(scorer(), normalize="minmax")


def test_zscore_groups_of_chat_prompts_compare_every_message():
    pixels = random_images(3)
    scores = scorer()(pixels)

    def chat(system):
        return [{"role": "system", "content": system}, {"role": "user", "content": "draw a cat"}]

    prompts = [chat("be bold"), chat("be bold"), chat("be calm")]
    rewards = QScorerRewardFunc(scorer(), normalize="group_zscore")(prompts, ["c"] * 3, image=list(pixels))
    expected = ((scores[:2] - scores[:2].mean()) / (scores[:2].std() + 1e-4)).tolist()
    assert rewards[:2] == pytest.approx(expected, abs=1e-4)
    assert rewards[2] == 0.0  # alone in its group


def test_score_statistics_go_to_log_metric():
    pixels = random_images(3)
    scores = scorer()(pixels)
    logged = {}
    QScorerRewardFunc(scorer(), normalize="unit", name="iq")(
        ["p"] * 4, ["c"] * 4, image=[*pixels, None], log_metric=logged.__setitem__
    )
    assert logged == pytest.approx(
        {"iq/score_mean": scores.mean().item(), "iq/score_std": scores.std(correction=0).item()}
    )


def test_async_variant_is_awaited_by_trl_and_gives_the_same_rewards():
    pixels = random_images(2)
    reward = AsyncQScorerRewardFunc(scorer(), normalize="unit")
    assert is_async_callable(reward)
    rewards = asyncio.run(reward(["p"] * 2, ["c"] * 2, image=list(pixels)))
    assert rewards == QScorerRewardFunc(scorer(), normalize="unit")(["p"] * 2, ["c"] * 2, image=list(pixels))


def test_message_text():
    assert message_text("plain") == "plain"
    parts = [{"type": "image"}, {"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]
    assert message_text([{"role": "user", "content": "x"}, {"role": "assistant", "content": parts}]) == "a cat"
    with pytest.raises(TypeError):
        message_text(3)


def grpo_args(tmp_path, config_class=GRPOConfig, **overrides):
    return config_class(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        seed=0,
        beta=0.0,  # no reference model (RLOO would load one by the policy's name)
        **overrides,
    )


def test_grpo_trains_with_images_from_a_dataset_column(tmp_path):
    pixels = random_images(2, seed=3)
    paths = []
    for index, image in enumerate(pixels):
        paths.append(str(tmp_path / f"{index}.png"))
        to_pil(image).save(paths[-1])
    image_scores = scorer()(paths)
    # A text-only policy: the column is not called "image", which GRPOTrainer would feed to the policy.
    dataset = Dataset.from_dict({"prompt": ["a red cat", "a blue dog"] * 2, "image_path": paths * 2})
    policy, tokenizer = tiny_policy()
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=QScorerRewardFunc(scorer(), image_key="image_path"),
        args=grpo_args(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    steps = [entry for entry in trainer.state.log_history if "rewards/qscorer/mean" in entry]
    assert len(steps) == 2 and trainer.state.global_step == 2
    for entry in steps:
        assert image_scores.min() - 1e-5 <= entry["rewards/qscorer/mean"] <= image_scores.max() + 1e-5
        assert entry["qscorer/score_mean"] == pytest.approx(entry["rewards/qscorer/mean"], abs=1e-5)


def diffusion_render():
    """A render function with a (tiny, random) diffusers text-to-image pipeline."""
    pipe = tiny_pipeline("sd")
    generator = torch.Generator().manual_seed(0)
    return lambda prompts, completions: (
        pipe(completions, num_inference_steps=2, output_type="pt", generator=generator).images
    )


@pytest.mark.parametrize(
    "trainer_class, config_class, reward_class, make_render",
    [
        (GRPOTrainer, GRPOConfig, QScorerRewardFunc, diffusion_render),
        (RLOOTrainer, RLOOConfig, AsyncQScorerRewardFunc, lambda: render_text),
    ],
)
def test_policy_trains_on_rewards_of_rendered_completions(
    tmp_path, trainer_class, config_class, reward_class, make_render
):
    dataset = Dataset.from_dict({"prompt": ["a photo of", "a painting of"] * 2})
    policy, tokenizer = tiny_policy()
    before = [param.detach().clone() for param in policy.parameters()]
    render = make_render()
    rendered_batches = []

    def recording_render(prompts, completions):
        rendered_batches.append(render(prompts, completions))
        return rendered_batches[-1]

    trainer = trainer_class(
        model=policy,
        reward_funcs=reward_class(scorer(), render_fn=recording_render),
        args=grpo_args(tmp_path, config_class),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    steps = [entry for entry in trainer.state.log_history if "rewards/qscorer/mean" in entry]
    assert len(steps) == len(rendered_batches) == 2
    for entry, images in zip(steps, rendered_batches):
        assert len(images) == 2  # per step: one prompt, two completions
        scores = scorer()(images)
        assert entry["rewards/qscorer/mean"] == pytest.approx(scores.mean().item(), abs=1e-5)
        assert entry["qscorer/score_std"] == pytest.approx(scores.std(correction=0).item(), abs=1e-5)
    # Different completions get different rewards, so the policy moves.
    assert any(not torch.equal(old, new) for old, new in zip(before, policy.parameters()))
