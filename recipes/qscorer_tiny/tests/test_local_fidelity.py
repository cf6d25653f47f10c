"""The dense full-reference experiment of the vision-probe script: local fidelity maps equal
scikit-image's SSIM and CIELAB differences region by region, and a grouped shard names each
image's reference."""

import csv

import numpy as np
import pytest
import torch
from skimage import color, data
from skimage.metrics import structural_similarity

from recipes.qscorer_tiny.image_ops import luma
from recipes.qscorer_tiny.local_fidelity import local_fidelity_maps, unit_rgb_to_lab
from recipes.qscorer_tiny.synthetic_shard import SyntheticSettings, ensure_synthetic_shard


def unit_image(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def pair():
    """A 56 x 84 crop of astronaut and a noisier, tinted version (unit float32 ``[H, W, 3]``)."""
    pristine = data.astronaut()[100:156, 200:284].astype(np.float32) / 255
    noise = np.random.default_rng(0).normal(0, 0.06, pristine.shape)
    distorted = np.clip(pristine + noise + np.array([0.05, 0.0, -0.04]), 0, 1).astype(np.float32)
    return pristine, distorted


def test_maps_are_scikit_image_ssim_and_cielab_difference_per_region(pair):
    pristine, distorted = pair
    maps = local_fidelity_maps(unit_image(pristine), unit_image(distorted), region=28)
    assert maps.shape == (1, 2, 2, 3) and maps.dtype == torch.float32
    _, ssim = structural_similarity(luma(pristine), luma(distorted), data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)  # fmt: skip
    difference = np.linalg.norm(color.rgb2lab(pristine) - color.rgb2lab(distorted), axis=-1)
    for row in range(2):
        for column in range(3):
            region = np.s_[28 * row : 28 * row + 28, 28 * column : 28 * column + 28]
            assert maps[0, 0, row, column] == pytest.approx(max(0.0, ssim[region].mean()), abs=1e-4)
            assert maps[0, 1, row, column] == pytest.approx(np.exp(-difference[region].mean() / 30), abs=1e-4)
    assert 0.2 < maps[0, 0].mean() < 0.9 and 0.2 < maps[0, 1].mean() < 0.9  # damaged, not destroyed
    lab = unit_rgb_to_lab(unit_image(pristine))[0].permute(1, 2, 0).numpy()
    assert np.abs(lab - color.rgb2lab(pristine)).max() < 1e-3


def test_an_image_against_itself_is_all_ones_and_shared_references_are_computed_once(pair):
    pristine, distorted = (unit_image(image) for image in pair)
    assert torch.allclose(local_fidelity_maps(pristine, pristine, 28), torch.ones(1, 2, 2, 3))
    images = torch.cat([pristine, distorted, distorted.flip(-1)])
    references = torch.cat([pristine, pristine.flip(-1)])
    index = torch.tensor([0, 0, 1])
    shared = local_fidelity_maps(references, images, 28, index)
    assert torch.allclose(shared, local_fidelity_maps(references[index], images, 28), atol=1e-6)
    assert torch.allclose(shared[2], shared[1].flip(-1), atol=1e-5)  # mirrored together: mirrored maps
    with pytest.raises(ValueError, match="multiples of the region side"):
        local_fidelity_maps(pristine, distorted, 32)
    with pytest.raises(ValueError, match="give reference_index"):
        local_fidelity_maps(references, images, 28)


def test_a_grouped_shard_names_each_images_reference(tmp_path):
    manifest = ensure_synthetic_shard(tmp_path / "shard", SyntheticSettings(length=8, size=32, group_size=4, workers=1))
    rows = list(csv.DictReader(manifest.open()))
    assert [row["reference"] for row in rows] == [rows[0]["image"]] * 4 + [rows[4]["image"]] * 4
    ungrouped = ensure_synthetic_shard(tmp_path / "plain", SyntheticSettings(length=2, size=32, workers=1))
    assert all(row["reference"] == "" for row in csv.DictReader(ungrouped.open()))
