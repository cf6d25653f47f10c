import functools

import numpy as np
import pytest
import torch

from qscorer_reward.testing import FAMILIES, tiny_scorer


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
