"""Colour implementations: saturation changes, colour-channel misregistration, palette quantisation.

Every function maps ``(image, strength, rng) -> image`` on unit images (float32 ``[H, W, 3]``, sRGB
in [0, 1], see `image_ops`); ``strength`` is read the same way by all implementations of a type.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage
from skimage import color

from .image_ops import clip_unit, from_pil, lab_to_unit_rgb, to_pil

# ---------------------------------------------------------------- saturation (strength: saturation factor;
# < 1 desaturates, > 1 oversaturates)


def saturation_hsv(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """HSV saturation multiplied by ``factor`` (clipped to 1)."""
    hsv = color.rgb2hsv(image)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0.0, 1.0)
    return clip_unit(color.hsv2rgb(hsv))


def saturation_lab_chroma(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """CIELAB chroma (a*, b*) multiplied by ``factor``; out-of-gamut colours clipped."""
    lab = color.rgb2lab(image)
    lab[..., 1:] *= factor
    return lab_to_unit_rgb(lab)


def saturation_pil_enhance(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow's ``ImageEnhance.Color``: a blend with (``factor`` < 1) or extrapolation away from
    (``factor`` > 1) the image's grey version, in 8-bit sRGB."""
    return from_pil(ImageEnhance.Color(to_pil(image)).enhance(factor))


# ---------------------------------------------------------------- colour shift (strength: misregistration in pixels)


def channel_shift_bilinear(image: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Red and blue planes moved by ``shift`` pixels in opposite directions at a random angle
    (bilinear resampling, edge pixels repeated), green in place."""
    angle = rng.uniform(0, 2 * math.pi)
    offset = np.array([math.sin(angle), math.cos(angle)]) * shift
    shifted = image.copy()
    for channel, sign in ((0, 1.0), (2, -1.0)):
        shifted[..., channel] = ndimage.shift(image[..., channel], sign * offset, order=1, mode="nearest")
    return clip_unit(shifted)


def channel_shift_lateral_aberration(image: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Lateral chromatic aberration: red magnified and blue shrunk about the centre so that the
    misregistration grows radially to ``shift`` pixels at the farthest corner."""
    height, width = image.shape[:2]
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).astype(np.float64)
    radius = float(np.hypot(*centre))
    shifted = image.copy()
    for channel, sign in ((0, 1.0), (2, -1.0)):
        # Sample the plane at points pulled towards (or pushed from) the centre by the scale change.
        scale = 1.0 + sign * shift / radius
        coordinates = centre[:, None, None] + (grid - centre[:, None, None]) / scale
        shifted[..., channel] = ndimage.map_coordinates(image[..., channel], coordinates, order=1, mode="nearest")
    return clip_unit(shifted)


def channel_shift_fourier(image: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Red and blue planes moved sub-pixel by a Fourier phase shift (band-limited interpolation,
    with ringing at sharp edges) after mirrored padding, green in place."""
    angle = rng.uniform(0, 2 * math.pi)
    offset = np.array([math.sin(angle), math.cos(angle)]) * shift
    pad = int(math.ceil(shift)) + 2
    shifted = image.copy()
    for channel, sign in ((0, 1.0), (2, -1.0)):
        plane = np.pad(image[..., channel], pad, mode="symmetric")
        moved = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(plane), sign * offset)).real
        shifted[..., channel] = moved[pad:-pad, pad:-pad]
    return clip_unit(shifted)


# ---------------------------------------------------------------- colour quantisation (strength: palette size)


def palette_pil_median_cut(image: np.ndarray, colours: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow median-cut palette, no dithering."""
    quantised = to_pil(image).quantize(int(round(colours)), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return from_pil(quantised)


def palette_pil_octree(image: np.ndarray, colours: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow fast-octree palette, no dithering."""
    quantised = to_pil(image).quantize(int(round(colours)), method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return from_pil(quantised)


def palette_kmeans_lab(image: np.ndarray, colours: float, rng: np.random.Generator) -> np.ndarray:
    """k-means palette in CIELAB (k-means++ seeding on a pixel sample, 12 Lloyd iterations), each
    pixel mapped to its nearest palette colour."""
    lab = color.rgb2lab(image).reshape(-1, 3)
    sample = lab[rng.choice(len(lab), size=min(len(lab), 4096), replace=False)]
    centres = _kmeans_plus_plus(sample, int(round(colours)), rng)
    for _ in range(12):
        nearest = _nearest_centre(sample, centres)
        counts = np.bincount(nearest, minlength=len(centres))
        sums = np.stack([np.bincount(nearest, sample[:, axis], minlength=len(centres)) for axis in range(3)], axis=1)
        occupied = counts > 0  # an empty cluster keeps its centre
        centres[occupied] = sums[occupied] / counts[occupied, None]
    quantised = centres[_nearest_centre(lab, centres)]
    return lab_to_unit_rgb(quantised.reshape(image.shape))


def _kmeans_plus_plus(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` initial centres ``[K, 3]``, each drawn with probability proportional to its squared
    distance from the nearest centre so far (fewer if the points have fewer distinct values)."""
    centres = [points[rng.integers(len(points))]]
    nearest_distance = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, count):
        if nearest_distance.sum() == 0:
            break
        centres.append(points[rng.choice(len(points), p=nearest_distance / nearest_distance.sum())])
        nearest_distance = np.minimum(nearest_distance, ((points - centres[-1]) ** 2).sum(axis=1))
    return np.array(centres)


def _nearest_centre(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return _squared_distances(points, centres).argmin(axis=1)


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[N, K]`` squared distances, expanded as |p|^2 - 2 p.c + |c|^2 to avoid an [N, K, 3] array."""
    squared = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None]
    return np.maximum(squared, 0.0)  # rounding can leave tiny negatives
