"""Reading image files and PIL images: every mode by its real range, EXIF orientation, reduction
right after decoding, and per-image failures that leave the rest of a batch alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from qscorer_reward.preprocessing import load_image, open_image, to_unit_pixels
from qscorer_reward.testing import tiny_scorer


def _uint8(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"))


# ---------------------------------------------------------------------------------------- modes


def test_a_16_bit_png_is_divided_by_65535(tmp_path):
    """It was clipped at 255: 99.98% of a real photo's pixels came out white."""
    ramp = np.linspace(0, 65535, 64 * 48).round().astype(np.uint16).reshape(48, 64)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    pixels = load_image(path)
    assert pixels.shape == (3, 48, 64)
    assert np.abs(pixels[0].numpy().astype(int) - expected).max() <= 1
    assert torch.equal(pixels[0], pixels[2])
    assert (pixels == 255).float().mean() < 0.01


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_modes_in_memory(mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    image = Image.frombytes(mode, (4, 1), raw)
    (pixels,) = to_unit_pixels(image)
    assert torch.allclose(pixels[0, 0], torch.tensor([0, 1, 128, 255]) / 255.0)


def test_a_float_tiff_in_0_1_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0.0, 1.0, 40 * 30, dtype=np.float32).reshape(30, 40)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    pixels = load_image(path)[0].numpy().astype(int)
    assert np.abs(pixels - np.round(values * 255)).max() <= 1


def test_a_float_tiff_uses_its_declared_range_and_else_is_refused(tmp_path):
    values = np.linspace(0.0, 220.0, 40 * 30, dtype=np.float32).reshape(30, 40)
    declared = tmp_path / "declared.tif"
    Image.fromarray(values).save(declared, tiffinfo={340: 0.0, 341: 220.0})  # SMin/SMaxSampleValue
    pixels = load_image(declared)[0].numpy().astype(int)
    assert np.abs(pixels - np.round(values / 220 * 255)).max() <= 1
    undeclared = tmp_path / "undeclared.tif"
    Image.fromarray(values).save(undeclared)
    with pytest.raises(ValueError, match=r"undeclared.tif: float image \(mode F\) with values in \[0, 220\]"):
        load_image(undeclared)
    nan = values.copy()
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_unit_pixels(Image.fromarray(nan / 220))


def test_a_32_bit_integer_image_needs_a_declared_range(tmp_path):
    values = (np.arange(40 * 30).reshape(30, 40) * 3).astype(np.int32)  # 0..3597, 12-bit data
    declared = tmp_path / "declared.tif"
    Image.fromarray(values).save(declared, tiffinfo={280: 0, 281: 4095})  # Min/MaxSampleValue
    pixels = load_image(declared)[0].numpy().astype(int)
    assert np.abs(pixels - np.round(values / 4095 * 255)).max() <= 1
    undeclared = tmp_path / "undeclared.tif"
    Image.fromarray(values).save(undeclared)
    with pytest.raises(ValueError, match=r"32-bit integer image \(mode I\).*convert it to an 8- or 16-bit image"):
        load_image(undeclared)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"])
def test_eight_bit_modes_are_converted_as_pil_converts_them(mode, photos):
    source = Image.fromarray(photos[1]).resize((64, 48))
    image = source.convert(mode) if mode != "P" else source.quantize(64)
    (pixels,) = to_unit_pixels(image)
    assert torch.equal((pixels * 255).round().byte(), torch.from_numpy(_uint8(image)).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La", "P"])
def test_transparency_is_composited_onto_white_in_every_mode(mode):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., :3] = 60  # dark grey where opaque
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent
    image = Image.fromarray(rgba, mode="RGBA")
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((0, 15))
    elif mode == "La":  # PIL converts to La without its alpha: build it (premultiplied) by hand
        image = Image.frombytes("La", (30, 20), np.asarray(image.convert("LA")).tobytes())
    else:
        image = image.convert(mode)
    (pixels,) = to_unit_pixels(image)
    assert torch.allclose(pixels[:, 0, 0], torch.full((3,), 60 / 255), atol=1 / 255)
    assert torch.allclose(pixels[:, -1, 0], torch.ones(3))


# ---------------------------------------------------------------------------------------- orientation


def _with_orientation(array: np.ndarray, orientation: int, path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_to_files_and_pil_images(orientation, suffix, tmp_path, photos):
    array = photos[2][:200, :320]  # wider than high, so a rotation shows in the shape
    path = _with_orientation(array, orientation, tmp_path / f"photo{suffix}")
    expected = _uint8(ImageOps.exif_transpose(Image.open(path)))
    upright = load_image(path).permute(1, 2, 0).numpy()
    assert upright.shape == expected.shape
    assert np.array_equal(upright, expected)
    (from_pil,) = to_unit_pixels(Image.open(path))
    assert torch.equal((from_pil * 255).round().byte().permute(1, 2, 0), torch.from_numpy(expected))
    # an image the user already turned upright (the tag removed) is not turned again
    (turned,) = to_unit_pixels(ImageOps.exif_transpose(Image.open(path)))
    assert turned.shape[1:] == expected.shape[:2]


def test_a_photo_stored_sideways_scores_as_it_is_displayed(tmp_path, photos):
    scorer = tiny_scorer()
    upright = photos[0][:300, :400]
    sideways = np.ascontiguousarray(np.rot90(upright))  # stored turned left; tag 6 turns it back
    path = _with_orientation(sideways, 6, tmp_path / "sideways.png")
    Image.fromarray(upright).save(tmp_path / "upright.png")
    expected = scorer([tmp_path / "upright.png"]).item()
    # reduced before it is turned, which rounds a little differently from turning it first
    assert scorer([path]).item() == pytest.approx(expected, abs=2e-3)
    assert torch.equal(scorer([Image.open(path)]), scorer([path]))
    assert abs(scorer([sideways]).item() - expected) > 0.01


# ---------------------------------------------------------------------------------------- reduction


def test_reduction_right_after_decoding_keeps_the_aspect_ratio(tmp_path, photos):
    photo = Image.fromarray(photos[0]).resize((1500, 1000))
    for name in ("big.png", "big.jpg"):
        photo.save(tmp_path / name, quality=95)
        reduced = open_image(tmp_path / name, reduce_to_pixels=60_000)
        assert reduced.mode == "RGB"
        assert 0.95 * 60_000 <= reduced.width * reduced.height <= 1.05 * 60_000
        assert abs(reduced.width / reduced.height - 1.5) < 0.02
        # the same picture as a full decode resized once (JPEG decodes at 1/4 scale first)
        reference = Image.open(tmp_path / name).convert("RGB").resize(reduced.size, Image.Resampling.BICUBIC)
        difference = np.abs(np.asarray(reduced, dtype=float) - np.asarray(reference, dtype=float))
        assert difference.mean() < 2.0, name
    small = open_image(tmp_path / "big.png", reduce_to_pixels=2_000_000)
    assert small.size == (1500, 1000)  # nothing to reduce


def test_the_scorer_reduces_files_to_its_decode_budget_and_scores_them_as_before(tmp_path, photos):
    """Files are reduced to 4x the model's pixel budget when read; the model's own antialiased
    resize makes the rest of the way, so the patches barely differ from a full-size read."""
    scorer = tiny_scorer()
    budget = scorer.backbone.decode_pixel_budget
    assert budget == 4 * scorer.config.max_pixels
    path = tmp_path / "astronaut.png"
    Image.fromarray(photos[0]).save(path)  # 512 x 512, over the budget of 4 x 112 x 112
    (reduced,) = to_unit_pixels([path], reduce_to_pixels=budget)
    assert reduced.shape[1] * reduced.shape[2] <= 1.01 * budget
    full = scorer.backbone.prepare([torch.from_numpy(photos[0]).permute(2, 0, 1) / 255.0])
    ours = scorer.backbone.prepare([reduced])
    assert torch.equal(ours.model_inputs["image_grid_thw"], full.model_inputs["image_grid_thw"])
    std = torch.tensor(scorer.config.image_std).view(1, 3, 1)
    difference = (ours.model_inputs["pixel_values"] - full.model_inputs["pixel_values"]).abs()
    levels = difference.view(difference.shape[0], 3, -1) * std * 255
    assert levels.mean() < 0.5  # and a few levels at sharp edges
    assert scorer([path]).item() == pytest.approx(scorer([photos[0]]).item(), abs=2e-3)


PROBE = """
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from qscorer_reward.scoring_job import score_files
from qscorer_reward.testing import tiny_scorer
scorer = tiny_scorer()
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = size + int(sys.argv[1]) * 2**20  # the address space left to decode and score in
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rows = list(score_files(scorer, [Path(p) for p in sys.argv[2:]], batch_size=4))
print(json.dumps([[row.path, row.score, row.error] for row in rows]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to size the memory limit")
def test_memory_per_image_is_bounded_and_an_image_too_large_to_decode_fails_alone(tmp_path, photos):
    """In 200 MB of address space: a 6000 x 6000 PNG (108 MB decoded; 432 MB as float pixels, as
    it was read before) is reduced right after decoding and scored, one too large to decode at all
    fails alone, and the rest of its batch is scored."""
    good = tmp_path / "good.png"
    Image.fromarray(photos[1]).save(good)
    big, huge = tmp_path / "big.png", tmp_path / "huge.png"
    Image.new("RGB", (6000, 6000), (90, 120, 150)).save(big)
    Image.new("RGB", (12000, 7000), (90, 120, 150)).save(huge)  # 252 MB decoded
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    command = [sys.executable, "-c", PROBE, "200", str(good), str(big), str(huge), str(good)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert [Path(path).name for path, _, _ in rows] == ["good.png", "big.png", "huge.png", "good.png"]
    assert all(score is not None for _, score, _ in (rows[0], rows[1], rows[3]))
    assert rows[2][1] is None and "huge.png: cannot read image (not enough memory" in rows[2][2]
