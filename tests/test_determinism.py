"""Every test starts from the same random state, whatever ran before it (the suite runs in random
order), so no outcome depends on the order: see `seed_everything` in conftest.py."""

import random

import numpy as np
import pytest
import torch
from conftest import TEST_SEED
from hypothesis import settings


@pytest.mark.parametrize("turn", ["first", "second"])
def test_the_global_generators_start_from_the_test_seed(turn):
    assert torch.initial_seed() == TEST_SEED
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(TEST_SEED)))
    assert np.random.random() == np.random.RandomState(TEST_SEED).random_sample()
    assert random.random() == random.Random(TEST_SEED).random()
    # whatever this test leaves behind, the next one starts afresh
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


@pytest.fixture(scope="module")
def module_draw():
    return torch.rand(3)


def test_a_module_fixture_is_the_same_whichever_test_sets_it_up(module_draw):
    assert torch.equal(module_draw, torch.rand(3, generator=torch.Generator().manual_seed(TEST_SEED)))


def test_hypothesis_draws_the_same_examples_every_run():
    assert settings.default.derandomize and settings.default.database is None
