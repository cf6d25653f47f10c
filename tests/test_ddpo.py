"""The DDPO reward protocol: the same rewards as the scorer, synchronously and through futures."""

import functools
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from qscorer_reward.integrations.ddpo import AsyncQScorerDDPOReward, QScorerDDPOReward
from qscorer_reward.testing import tiny_scorer

SIDE = 56


@functools.cache
def scorer():
    return tiny_scorer(max_pixels=SIDE * SIDE)


def decoded_images(count, seed=0):
    """What a DDPO loop passes: decoded images, float [B, 3, H, W] in [0, 1]."""
    return torch.rand(count, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def test_rewards_are_the_scorers_scores():
    images = decoded_images(4)
    prompts = ["a cat", "a dog", "a cat", "a tree"]
    metadata = [{"index": i} for i in range(4)]

    rewards, reward_metadata = QScorerDDPOReward(scorer())(images, prompts, metadata)

    expected = scorer()(images)
    assert torch.equal(rewards, expected)
    assert torch.equal(reward_metadata["scores"], expected)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)


def test_rewards_are_detached_even_for_images_with_grad():
    images = decoded_images(2).requires_grad_()
    rewards, _ = QScorerDDPOReward(scorer())(images, ["a", "b"], None)
    assert rewards.grad_fn is None and not rewards.requires_grad


def test_input_range_and_batch_size():
    images = decoded_images(5, seed=1)
    rewards, _ = QScorerDDPOReward(scorer(), input_range=(-1, 1), batch_size=2)(images * 2 - 1, ["p"] * 5, {})
    assert torch.allclose(rewards, scorer()(images), atol=1e-5)


def test_async_variant_returns_futures_of_the_same_rewards():
    batches = [decoded_images(3, seed=seed) for seed in range(3)]
    prompts = ["a", "b", "c"]
    with AsyncQScorerDDPOReward(scorer()) as reward_fn:
        futures = [reward_fn(images, prompts, None) for images in batches]
        assert all(isinstance(future, Future) for future in futures)
        results = [future.result() for future in futures]
    for images, (rewards, metadata) in zip(batches, results):
        assert torch.equal(rewards, scorer()(images))
        assert torch.equal(metadata["scores"], rewards)
    with pytest.raises(RuntimeError):  # the owned executor is shut down on leaving the block
        reward_fn(batches[0], prompts, None)


def test_async_variant_leaves_a_given_executor_running():
    images = decoded_images(2)
    with ThreadPoolExecutor(max_workers=1) as executor:
        reward_fn = AsyncQScorerDDPOReward(scorer(), executor=executor, normalize="unit")
        reward_fn.shutdown()
        rewards, metadata = reward_fn(images, ["a", "b"], None).result()
        low, high = scorer().score_range
        assert torch.allclose(rewards, (metadata["scores"] - low) / (high - low))
        assert torch.equal(metadata["scores"], scorer()(images))


def test_per_prompt_zscores():
    images = decoded_images(4, seed=2)
    scores = scorer()(images)
    rewards, _ = QScorerDDPOReward(scorer(), normalize="group_zscore")(images, ["a", "b", "a", "b"], None)
    for indices in ([0, 2], [1, 3]):
        group = scores[indices]
        assert torch.allclose(rewards[indices], (group - group.mean()) / (group.std() + 1e-4), atol=1e-5)


def test_prompt_count_must_match():
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        QScorerDDPOReward(scorer())(decoded_images(2), ["a", "b", "c"], None)
