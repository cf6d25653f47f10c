"""Spatial implementations: pixelation, resampling, pixel jitter, patch displacement, colour blocks.

Every function maps ``(image, strength, rng) -> image`` on unit images (float32 ``[H, W, 3]``, sRGB
in [0, 1], see `image_ops`); ``strength`` is read the same way by all implementations of a type.
Patches and blocks have sides proportional to the image's shorter side, and their number is set by
the fraction of the image they cover, so a level looks the same at any image size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import transform

from .image_ops import clip_unit, from_pil, hwc_to_nchw, nchw_to_hwc, to_pil, to_uint8, torch_generator


def _count_covering(fraction: float, side: int, image: np.ndarray) -> int:
    """How many ``side`` x ``side`` squares make up ``fraction`` of the image area (at least 1)."""
    return max(1, int(round(fraction * image.shape[0] * image.shape[1] / side**2)))


# ---------------------------------------------------------------- pixelation (strength: block side in pixels)


def pixelate_pil_nearest(image: np.ndarray, block: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow nearest-neighbour down to 1/``block`` size and back up: each block shows one sampled pixel."""
    height, width = image.shape[:2]
    small = to_pil(image).resize((max(1, round(width / block)), max(1, round(height / block))), Image.NEAREST)
    return from_pil(small.resize((width, height), Image.NEAREST))


def pixelate_block_mean(image: np.ndarray, block: float, rng: np.random.Generator) -> np.ndarray:
    """Each aligned ``block`` x ``block`` square replaced by its mean colour (numpy)."""
    side = max(2, int(round(block)))
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, -height % side), (0, -width % side), (0, 0)), mode="edge")
    rows, cols = padded.shape[0] // side, padded.shape[1] // side
    means = padded.reshape(rows, side, cols, side, 3).mean(axis=(1, 3))
    return means.repeat(side, axis=0).repeat(side, axis=1)[:height, :width].astype(np.float32)


def pixelate_torch_area_offset(image: np.ndarray, block: float, rng: np.random.Generator) -> np.ndarray:
    """Block means (torch average pooling) on a block grid shifted by a random phase, so blocks are
    not aligned with the image corner."""
    side = max(2, int(round(block)))
    offset_y, offset_x = (int(value) for value in rng.integers(0, side, size=2))
    pixels = hwc_to_nchw(image)
    height, width = pixels.shape[2:]
    padded = F.pad(
        pixels,
        (offset_x, -(width + offset_x) % side, offset_y, -(height + offset_y) % side),
        mode="replicate",
    )
    means = F.avg_pool2d(padded, side)
    blocks = means.repeat_interleave(side, dim=2).repeat_interleave(side, dim=3)
    return nchw_to_hwc(blocks[:, :, offset_y : offset_y + height, offset_x : offset_x + width])


# ---------------------------------------------------------------- resampling (strength: downscale factor)


def _reduced_size(image: np.ndarray, factor: float) -> tuple[int, int]:
    """(height, width) after dividing by ``factor``, at least 2 pixels each."""
    return max(2, round(image.shape[0] / factor)), max(2, round(image.shape[1] / factor))


def resample_pil_bicubic(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow bicubic down (antialiased) and bicubic back up: detail lost, edges soft."""
    height, width = _reduced_size(image, factor)
    small = to_pil(image).resize((width, height), Image.BICUBIC)
    return from_pil(small.resize((image.shape[1], image.shape[0]), Image.BICUBIC))


def resample_pil_nearest_bilinear(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow nearest-neighbour down (no antialiasing: aliasing, jagged edges) and bilinear back up."""
    height, width = _reduced_size(image, factor)
    small = to_pil(image).resize((width, height), Image.NEAREST)
    return from_pil(small.resize((image.shape[1], image.shape[0]), Image.BILINEAR))


def resample_skimage_spline(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """scikit-image: Gaussian-prefiltered linear-spline down, cubic-spline back up."""
    small = transform.resize(image, _reduced_size(image, factor), order=1, anti_aliasing=True)
    return clip_unit(transform.resize(small, image.shape[:2], order=3, anti_aliasing=False))


# ---------------------------------------------------------------- pixel jitter (strength: displacement std in pixels)


def jitter_pixels_nearest(image: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Each pixel taken from a Gaussian-random nearby position, rounded to the nearest pixel."""
    height, width = image.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    source_y = np.clip(np.round(y + rng.normal(0, spread, (height, width))), 0, height - 1).astype(int)
    source_x = np.clip(np.round(x + rng.normal(0, spread, (height, width))), 0, width - 1).astype(int)
    return image[source_y, source_x]


def jitter_smooth_field_bilinear(image: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement field (white noise low-passed over ~2 pixels, rescaled to std
    ``spread``) applied with bilinear sampling: wobbly, locally coherent warping."""
    height, width = image.shape[:2]
    grid = np.mgrid[0:height, 0:width].astype(np.float64)
    displacement = np.stack([ndimage.gaussian_filter(rng.normal(size=(height, width)), 2.0) for _ in range(2)])
    displacement *= spread / displacement.std()
    coordinates = grid + displacement
    warped = [ndimage.map_coordinates(image[..., c], coordinates, order=1, mode="nearest") for c in range(3)]
    return clip_unit(np.stack(warped, axis=-1))


def jitter_pixels_torch_grid_sample(image: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Independent uniform displacement per pixel (same std as the Gaussian ones), bilinear
    sampling with torch ``grid_sample``."""
    pixels = hwc_to_nchw(image)
    height, width = pixels.shape[2:]
    half_width = spread * math.sqrt(3.0)
    offsets = (torch.rand((1, height, width, 2), generator=torch_generator(rng)) * 2 - 1) * half_width
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    source_x = (x + offsets[0, ..., 0]) / (width - 1) * 2 - 1
    source_y = (y + offsets[0, ..., 1]) / (height - 1) * 2 - 1
    grid = torch.stack([source_x, source_y], dim=-1)[None]
    return nchw_to_hwc(F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=True))


# ---------------------------------------------------------------- patch displacement, "non-eccentricity"
# (strength: displaced area as a fraction of the image, overlaps counted)


def _patch_side(image: np.ndarray) -> int:
    return max(4, round(min(image.shape[:2]) / 14))


def _nearby_position(
    top: int, left: int, shape: tuple[int, int], image: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """A random position of a ``shape`` = (height, width) patch within three patch sides
    (`_patch_side`) of (top, left), the patch inside the image."""
    reach = 3 * _patch_side(image)
    return (
        int(np.clip(top + rng.integers(-reach, reach + 1), 0, image.shape[0] - shape[0])),
        int(np.clip(left + rng.integers(-reach, reach + 1), 0, image.shape[1] - shape[1])),
    )


def _rectangle_shape(side: int, image: np.ndarray, rng: np.random.Generator, smallest: int) -> tuple[int, int]:
    """(height, width) of a rectangle with the area of a ``side`` x ``side`` square and a random
    aspect ratio between 1:2 and 2:1, each at least ``smallest`` and at most the image's."""
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    return (
        min(image.shape[0], max(smallest, round(side * math.sqrt(aspect)))),
        min(image.shape[1], max(smallest, round(side / math.sqrt(aspect)))),
    )


def _window(top: int, left: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return slice(top, top + shape[0]), slice(left, left + shape[1])


def _random_position(shape: tuple[int, int], image: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random position of a ``shape`` = (height, width) rectangle inside the image."""
    return int(rng.integers(0, image.shape[0] - shape[0] + 1)), int(rng.integers(0, image.shape[1] - shape[1] + 1))


def _blend_nearby_copy(
    image: np.ndarray, result: np.ndarray, shape: tuple[int, int], alpha: np.ndarray, rng: np.random.Generator
) -> None:
    """Blend a ``shape`` patch of ``image`` over a random nearby place of ``result`` (in place), with
    opacity ``alpha`` ``[height, width, 1]``."""
    top, left = _random_position(shape, image, rng)
    source_top, source_left = _nearby_position(top, left, shape, image, rng)
    target = _window(top, left, shape)
    result[target] = alpha * image[_window(source_top, source_left, shape)] + (1 - alpha) * result[target]


def patches_copy_nearby(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Square patches overwritten by copies of nearby squares."""
    side, result = _patch_side(image), image.copy()
    square = (side, side)
    for _ in range(_count_covering(fraction, side, image)):
        top, left = _random_position(square, image, rng)
        source_top, source_left = _nearby_position(top, left, square, image, rng)
        result[_window(top, left, square)] = image[_window(source_top, source_left, square)]
    return result


def patches_swap_nearby(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pairs of nearby square patches exchanged (each pair counts as two patches)."""
    side, result = _patch_side(image), image.copy()
    square = (side, side)
    for _ in range(max(1, _count_covering(fraction, side, image) // 2)):
        top, left = _random_position(square, image, rng)
        other_top, other_left = _nearby_position(top, left, square, image, rng)
        first = result[_window(top, left, square)].copy()
        result[_window(top, left, square)] = result[_window(other_top, other_left, square)]
        result[_window(other_top, other_left, square)] = first
    return result


def patches_copy_nearby_soft_rectangles(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rectangles of random aspect ratio (1:2 to 2:1, each the area of a square patch) blended over
    by copies of nearby rectangles, their edges faded over a random 0..25% of the shorter side:
    displaced content without the hard square outline the other training implementations leave."""
    side, result = _patch_side(image), image.copy()
    for _ in range(_count_covering(fraction, side, image)):
        shape = _rectangle_shape(side, image, rng, smallest=2)
        fade = rng.uniform(0.0, 0.25) * min(shape)
        # Opacity: 1 inside, falling linearly to ~0 over `fade` pixels at each edge.
        distance_y, distance_x = (np.minimum(np.arange(length), np.arange(length)[::-1]) + 0.5 for length in shape)
        alpha = np.clip(np.minimum.outer(distance_y, distance_x) / max(fade, 1e-6), 0.0, 1.0)[..., None]
        _blend_nearby_copy(image, result, shape, alpha, rng)
    return clip_unit(result)


def patches_copy_nearby_discs(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Disc-shaped patches with feathered edges blended over by copies of nearby discs."""
    side, result = _patch_side(image), image.copy()
    centre = (side - 1) / 2
    y, x = np.mgrid[0:side, 0:side]
    radius = np.hypot(y - centre, x - centre)
    # Opaque inside 0.35 side, fading to transparent at 0.5 side.
    alpha = np.clip((0.5 * side - radius) / (0.15 * side), 0.0, 1.0)[..., None]
    for _ in range(_count_covering(fraction, side, image)):
        _blend_nearby_copy(image, result, (side, side), alpha, rng)
    return clip_unit(result)


# ---------------------------------------------------------------- colour blocks (strength: covered fraction of the
# image, overlaps counted)


def _block_side(image: np.ndarray) -> int:
    return max(3, round(min(image.shape[:2]) / 12))


def colour_blocks_squares(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Solid squares of random colours at random places."""
    side, result = _block_side(image), image.copy()
    square = (side, side)
    for _ in range(_count_covering(fraction, side, image)):
        top, left = _random_position(square, image, rng)
        result[_window(top, left, square)] = rng.random(3)
    return result


def colour_blocks_rectangles(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Solid rectangles of random colours and aspect ratios (1:2 to 2:1), each the area of a square block."""
    side, result = _block_side(image), image.copy()
    for _ in range(_count_covering(fraction, side, image)):
        shape = _rectangle_shape(side, image, rng, smallest=1)
        top, left = _random_position(shape, image, rng)
        result[_window(top, left, shape)] = rng.random(3)
    return result


def colour_blocks_ellipses_pil(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Solid ellipses of random colours drawn by Pillow, each about the area of a square block."""
    side = _block_side(image)
    canvas = Image.fromarray(to_uint8(image))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    for _ in range(_count_covering(fraction, side, image)):
        # An ellipse with semi-axes a, b has area pi a b; a b = side^2 / pi matches the square's area.
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        semi_y = side / math.sqrt(math.pi) * math.sqrt(aspect)
        semi_x = side / math.sqrt(math.pi) / math.sqrt(aspect)
        centre_y, centre_x = rng.uniform(0, height), rng.uniform(0, width)
        fill = tuple(int(value) for value in rng.integers(0, 256, size=3))
        draw.ellipse((centre_x - semi_x, centre_y - semi_y, centre_x + semi_x, centre_y + semi_y), fill=fill)
    return from_pil(canvas)
