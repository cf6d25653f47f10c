import functools
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

from qscorer_reward.testing import FAMILIES, tiny_scorer

# ---------------------------------------------------------------- determinism, whatever the order
# Every test body and every fixture starts from the same seeds of torch, numpy and `random`, so no
# outcome depends on which tests ran before (the suite runs in random order: pytest-randomly).
# Hypothesis draws its examples from each test's own seed and keeps no example database.
TEST_SEED = 0
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")


def seed_everything(seed: int = TEST_SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("randomly"):  # it shuffles the order; the seeds are ours
        config.option.randomly_reset_seed = False


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    seed_everything()  # a module-scoped fixture is the same whichever test sets it up
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    seed_everything()
    return (yield)


@functools.cache
def shared_scorer(family: str = "qwen2_5_vl", num_score_tokens: int = 1):
    """One tiny scorer per (family, K) for the whole session; tests must not modify it."""
    return tiny_scorer(family, num_score_tokens=num_score_tokens)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def photos():
    """Real photos from scikit-image as uint8 HWC arrays, grey ones expanded to RGB."""
    from skimage import data

    images = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"):
        image = getattr(data, name)()
        images.append(np.stack([image] * 3, axis=-1) if image.ndim == 2 else image)
    return images


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    the tiny models gain nothing from a second thread, and on shared, busy cores OpenMP's waiting
    threads slow them down several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base_model_dir(tmp_path):
    """A tiny random Qwen2.5-VL base model and its tokenizer saved as a local model directory."""
    from qscorer_reward.testing import tiny_base_model

    model, tokenizer = tiny_base_model("qwen2_5_vl", seed=7)
    directory = tmp_path / "base"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
