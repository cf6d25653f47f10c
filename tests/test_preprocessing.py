"""Tensor preprocessing: parity with transformers' Qwen-VL image processor, and input conversion."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference_smart_resize

from qscorer_reward.backbones.qwen_vl import patchify, smart_resize
from qscorer_reward.preprocessing import load_image, resize_antialiased, to_unit_pixels
from qscorer_reward.testing import tiny_scorer


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(14, 3000),
    width=st.integers(14, 3000),
    factor=st.sampled_from([28, 32]),
    budget=st.sampled_from([(56 * 56, 448 * 448), (3136, 28 * 28 * 1280), (64 * 64, 224 * 224)]),
)
def test_smart_resize_matches_the_reference(height, width, factor, budget):
    assume(max(height, width) / min(height, width) <= 200)  # beyond, both refuse the image
    min_pixels, max_pixels = budget
    expected = reference_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected


@pytest.mark.parametrize("patch_size", [14, 16])
def test_patchify_matches_the_reference_layout(patch_size):
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, patch_size * 4, patch_size * 6, generator=generator)
    reference, grid_h, grid_w = Qwen2VLImageProcessorPil().patchify(
        image.numpy(), patch_size=patch_size, merge_size=2, temporal_patch_size=2
    )
    ours = patchify(image[None], patch_size, merge_size=2, temporal_patch_size=2)
    assert (grid_h, grid_w) == (4, 6)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference)))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_pixel_values_match_the_reference_processor_on_photos(family, photos):
    """Grids are identical; pixel values differ only by PIL's rounding to uint8 after each of its
    two resize passes: at most ~1.1 uint8 levels anywhere, ~0.3 levels on average."""
    scorer = tiny_scorer(family, max_pixels=448 * 448)
    config = scorer.config
    processor = Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    reference = processor(images=photos, return_tensors="pt")
    ours = scorer.backbone.prepare(to_unit_pixels(photos))
    assert torch.equal(ours.model_inputs["image_grid_thw"], reference["image_grid_thw"])
    difference = (ours.model_inputs["pixel_values"] - reference["pixel_values"]).abs()
    # back to uint8 levels: the channel is the slowest axis of a flattened patch
    std = torch.tensor(config.image_std).view(1, 3, 1)
    levels = difference.view(difference.shape[0], 3, -1) * std * 255
    assert levels.max() <= 1.15
    assert levels.mean() <= 0.35


def test_resize_is_differentiable_and_identity_when_size_fits():
    pixels = torch.rand(2, 3, 56, 84, requires_grad=True)
    assert resize_antialiased(pixels, 56, 84) is pixels
    resized = resize_antialiased(pixels, 28, 56)
    assert resized.shape == (2, 3, 28, 56)
    resized.sum().backward()
    assert pixels.grad.abs().sum() > 0


# ---------------------------------------------------------------- input conversion


def _photo(height=40, width=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_every_input_type_gives_the_same_pixels(tmp_path):
    array = _photo()
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path)
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    as_uint8 = torch.from_numpy(array).permute(2, 0, 1)
    variants = {
        "float tensor": expected,
        "uint8 tensor": as_uint8,
        "numpy": array,
        "PIL": Image.fromarray(array),
        "path": path,
        "str path": str(path),
        "[-1, 1] tensor": expected * 2 - 1,
    }
    for name, value in variants.items():
        input_range = (-1.0, 1.0) if name.startswith("[-1") else (0.0, 1.0)
        (pixels,) = to_unit_pixels(value, input_range)
        assert torch.allclose(pixels, expected, atol=1e-6), name
    batched = to_unit_pixels(np.stack([array, array]))
    assert batched.shape == (2, 3, 40, 50) and torch.allclose(batched[1], expected)


def test_grey_and_transparent_images_are_converted():
    grey = np.full((20, 30), 100, dtype=np.uint8)
    for value in (Image.fromarray(grey), grey, torch.from_numpy(grey)[None]):
        (pixels,) = to_unit_pixels(value)
        assert pixels.shape == (3, 20, 30) and torch.allclose(pixels, torch.full_like(pixels, 100 / 255))
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red where opaque
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent
    for value in (Image.fromarray(rgba, mode="RGBA"), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        (pixels,) = to_unit_pixels(value)
        assert torch.allclose(pixels[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
        assert torch.allclose(pixels[:, -1, 0], torch.tensor([1.0, 1.0, 1.0]))  # composited onto white


def test_slight_overshoot_is_clamped_and_keeps_gradient():
    pixels = (torch.rand(1, 3, 20, 20) * 1.1 - 0.05).requires_grad_()
    converted = to_unit_pixels(pixels)
    assert converted.min() >= 0 and converted.max() <= 1
    converted.sum().backward()
    assert pixels.grad.sum() > 0


def test_float_batch_in_range_is_used_as_it_is():
    pixels = torch.rand(2, 3, 20, 20, requires_grad=True)
    converted = to_unit_pixels(pixels)
    assert converted is pixels  # no copy when the clamp would change nothing
    assert (torch.autograd.grad(converted.sum(), pixels)[0] == 1).all()


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(path)
    with pytest.raises(ValueError, match="big.png.*90000 pixels.*decompression bomb"):
        load_image(path, max_image_pixels=10_000)
