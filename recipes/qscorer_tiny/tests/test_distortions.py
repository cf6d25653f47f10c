"""Synthetic distortions, their labels and the content they act on: every implementation of every
type at every level changes the image, is deterministic, keeps shape and range, and gets more
severe with the level; labels are ordered; train and held-out sets do not overlap."""

import functools
import math

import numpy as np
import pytest
from skimage import color

from recipes.qscorer_tiny import content
from recipes.qscorer_tiny.distortions import DISTORTION_TYPES, LEVELS
from recipes.qscorer_tiny.quality_labels import fidelity, mos_label

SIZE = 64


@functools.cache
def sample_crops() -> tuple[np.ndarray, ...]:
    """Three colour crops with different content: a photo, a colourised grey photo, dead leaves."""
    return (
        content.photo_crop("astronaut", SIZE, np.random.default_rng(1)),
        content.photo_crop("camera", SIZE, np.random.default_rng(2)),
        content.dead_leaves(SIZE, np.random.default_rng(3)),
    )


def psnr(reference: np.ndarray, distorted: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - distorted) ** 2))
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


IMPLEMENTATIONS = [
    pytest.param(distortion, name, id=f"{distortion.name}-{name}")
    for distortion in DISTORTION_TYPES.values()
    for split in ("train", "held_out")
    for name in distortion.implementations(split)
]


def test_there_are_at_least_15_types_with_two_training_and_one_held_out_implementation():
    assert len(DISTORTION_TYPES) >= 15
    families = {distortion.family for distortion in DISTORTION_TYPES.values()}
    assert families >= {"blur", "noise", "compression", "colour", "brightness", "spatial", "sharpness"}
    for distortion in DISTORTION_TYPES.values():
        train, held_out = distortion.implementations("train"), distortion.implementations("held_out")
        assert len(train) >= 2 and len(held_out) >= 1, distortion.name
        assert not set(train.values()) & set(held_out.values()), f"{distortion.name}: a held-out implementation trains"
        assert len(distortion.level_strengths) == len(LEVELS)


@pytest.mark.parametrize(("distortion", "implementation"), IMPLEMENTATIONS)
def test_every_level_changes_the_image_deterministically_and_gets_worse(distortion, implementation):
    psnr_by_level = []
    for level in LEVELS:
        values = []
        for index, crop in enumerate(sample_crops()):
            original = crop.copy()
            # One seed per crop for all levels (common random numbers): the levels differ in strength,
            # not in where a patch or a noise draw happened to fall.
            distorted = distortion(crop, level, np.random.default_rng(index), implementation)
            np.testing.assert_array_equal(crop, original, err_msg="the input image was modified")
            assert distorted.shape == crop.shape and distorted.dtype == np.float32
            assert distorted.min() >= 0.0 and distorted.max() <= 1.0
            # What the dataset stores is 8-bit, so the change must survive rounding to 8 bits.
            assert np.abs(np.round(distorted * 255) - np.round(crop * 255)).max() > 0, f"level {level} did nothing"
            values.append(psnr(crop, distorted))
        psnr_by_level.append(np.mean(values))
    assert all(np.diff(psnr_by_level) < 0), f"PSNR by level {np.round(psnr_by_level, 2)} is not decreasing"
    # The same seed gives the same result.
    crop = sample_crops()[0]
    first = distortion(crop, 3, np.random.default_rng(7), implementation)
    np.testing.assert_array_equal(distortion(crop, 3, np.random.default_rng(7), implementation), first)


def test_random_implementations_depend_on_the_seed():
    crop = sample_crops()[0]
    noise = DISTORTION_TYPES["white_noise"]
    first = noise(crop, 3, np.random.default_rng(0), "white_noise_rgb")
    second = noise(crop, 3, np.random.default_rng(1), "white_noise_rgb")
    assert not np.array_equal(first, second)


def test_fractional_levels_interpolate_the_strength_and_out_of_range_levels_are_refused():
    blur = DISTORTION_TYPES["gaussian_blur"]
    assert blur.strength(2.5) == pytest.approx((blur.level_strengths[1] + blur.level_strengths[2]) / 2)
    for level in (0, 5.5):
        with pytest.raises(ValueError, match="level"):
            blur(sample_crops()[0], level, np.random.default_rng(0))


def test_bad_images_and_implementation_names_are_refused():
    blur = DISTORTION_TYPES["gaussian_blur"]
    with pytest.raises(TypeError, match="float32"):
        blur((sample_crops()[0] * 255).astype(np.uint8), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        blur(np.zeros((SIZE, SIZE), np.float32), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no implementation"):
        blur(sample_crops()[0], 1, np.random.default_rng(0), implementation="jpeg_pil_420")


def test_implementation_draws_respect_the_split():
    for distortion in DISTORTION_TYPES.values():
        for split in ("train", "held_out"):
            drawn = {distortion.choose_implementation(np.random.default_rng(seed), split) for seed in range(12)}
            assert drawn <= set(distortion.implementations(split)), (distortion.name, split)


def test_labels_are_within_1_and_5_pristine_is_5_and_labels_fall_with_the_level():
    assert mos_label(0, 1.0) == 5.0
    assert fidelity(sample_crops()[0], sample_crops()[0]) == pytest.approx(1.0)
    for distortion in DISTORTION_TYPES.values():
        mean_labels = []
        for level in LEVELS:
            labels = []
            for index, crop in enumerate(sample_crops()):
                distorted = distortion(crop, level, np.random.default_rng([index, level]))
                labels.append(mos_label(level, fidelity(crop, distorted)))
            assert all(1.0 <= label <= 5.0 for label in labels)
            mean_labels.append(np.mean(labels))
        assert mean_labels[0] < 5.0
        assert all(np.diff(mean_labels) < 0), f"{distortion.name}: labels by level {np.round(mean_labels, 2)}"


def test_labels_order_types_by_fidelity_at_one_level():
    # Same level, different damage: the label must follow the full-reference fidelity.
    crop = sample_crops()[0]
    mild = DISTORTION_TYPES["posterization"](crop, 1, np.random.default_rng(0), "posterise_uniform_rounding")
    severe = DISTORTION_TYPES["white_noise"](crop, 1, np.random.default_rng(0), "white_noise_sensor_poisson_gaussian")
    assert fidelity(crop, mild) > fidelity(crop, severe)
    assert mos_label(1, fidelity(crop, mild)) > mos_label(1, fidelity(crop, severe))


def test_label_arguments_are_checked():
    with pytest.raises(ValueError, match="level"):
        mos_label(6, 0.5)
    with pytest.raises(ValueError, match="fidelity"):
        mos_label(2, 1.5)


def test_train_and_held_out_photos_are_disjoint_by_name_and_by_pixels():
    assert not set(content.TRAIN_PHOTOS) & set(content.HELD_OUT_PHOTOS)
    # skimage ships some pictures under two names (cat and chelsea); compare the pixels too.
    held_out = [content._load_photo(name) for name in content.HELD_OUT_PHOTOS]
    for name in content.TRAIN_PHOTOS:
        train = content._load_photo(name)
        assert not any(train.shape == other.shape and np.array_equal(train, other) for other in held_out), name


def test_training_content_is_deterministic_and_uses_only_training_photos():
    sources = set()
    for seed in range(12):
        image, source = content.training_content(SIZE, np.random.default_rng(seed))
        again, _ = content.training_content(SIZE, np.random.default_rng(seed))
        np.testing.assert_array_equal(image, again)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        sources.add(source)
    photos = {source.removeprefix("photo:") for source in sources if source.startswith("photo:")}
    assert photos and photos <= set(content.TRAIN_PHOTOS)
    assert {"dead_leaves", "spectral_texture"} & sources


def test_photo_crops_are_never_enlarged_and_small_photos_are_refused():
    with pytest.raises(ValueError, match="smaller than the crop size"):
        content.photo_crop("text", 256, np.random.default_rng(0))


def test_procedural_images_have_natural_power_spectra():
    # Natural images have a power spectrum ~ 1/f^2 (slope near -2 on log-log axes).
    for generator in (content.dead_leaves, content.spectral_texture):
        grey = generator(128, np.random.default_rng(0)).mean(axis=-1)
        power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
        frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
        band = (frequency > 0.02) & (frequency < 0.3)
        slope = np.polyfit(np.log(frequency[band]), np.log(power[band]), 1)[0]
        assert -3.2 < slope < -1.4, f"{generator.__name__}: spectral slope {slope:.2f}"


def test_grey_photos_are_colourised_with_colour_edges_where_lightness_has_edges():
    crop = content.photo_crop("camera", SIZE, np.random.default_rng(0))
    assert np.abs(crop[..., 0] - crop[..., 2]).mean() > 0.01
    # The colour map of lightness ties colour to structure: a smooth field alone would not.
    lab = color.rgb2lab(crop)
    chroma_edges = np.sqrt(sum(gradient**2 for channel in (1, 2) for gradient in np.gradient(lab[..., channel])))
    lightness_edges = np.hypot(*np.gradient(lab[..., 0]))
    assert np.corrcoef(chroma_edges.ravel(), lightness_edges.ravel())[0, 1] > 0.5
