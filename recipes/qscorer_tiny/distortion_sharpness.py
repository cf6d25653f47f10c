"""Sharpness implementations: Gaussian, lens (defocus) and motion blur, and over-sharpening.

Every function maps ``(image, strength, rng) -> image``: unit images (float32 ``[H, W, 3]``, sRGB in
[0, 1], see `image_ops`) in and out, ``strength`` the type's physical parameter (documented per
function), ``rng`` a ``numpy.random.Generator`` for any random choice. Implementations of one type
read ``strength`` the same way, so they are interchangeable at a given level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import ndimage, signal

from .image_ops import (
    clip_unit,
    from_pil,
    hwc_to_nchw,
    linear_to_srgb,
    nchw_to_hwc,
    srgb_to_linear,
    to_pil,
    to_uint8,
)

# ---------------------------------------------------------------- Gaussian blur (strength: sigma in pixels)


def gaussian_blur_scipy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sampled Gaussian kernel (scipy.ndimage), sRGB values, mirrored borders."""
    return clip_unit(ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect", truncate=4.0))


def gaussian_blur_pil(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow's Gaussian blur (repeated box filters approximating the Gaussian), 8-bit sRGB."""
    return from_pil(to_pil(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def gaussian_blur_fft_linear_light(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian transfer function applied in the Fourier domain to linear light, as an optical blur
    acts: highlights spread into their surroundings more than in the sRGB-domain blurs."""
    pad = int(math.ceil(4 * sigma)) + 1
    linear = np.pad(srgb_to_linear(image), ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    frequency_y = np.fft.fftfreq(linear.shape[0])[:, None]
    frequency_x = np.fft.rfftfreq(linear.shape[1])[None, :]
    transfer = np.exp(-2.0 * (math.pi * sigma) ** 2 * (frequency_y**2 + frequency_x**2))
    spectrum = np.fft.rfft2(linear, axes=(0, 1)) * transfer[..., None]
    blurred = np.fft.irfft2(spectrum, s=linear.shape[:2], axes=(0, 1))
    return linear_to_srgb(blurred[pad:-pad, pad:-pad])


# ---------------------------------------------------------------- lens blur (strength: aperture radius in pixels)


def aperture_kernel(radius: float, sides: int | None = None, rotation: float = 0.0, supersample: int = 8) -> np.ndarray:
    """Normalised defocus kernel ``[2R+1, 2R+1]`` float32: the area of each pixel covered by a disk
    (``sides=None``) or a regular polygon of circumradius ``radius`` rotated by ``rotation`` radians,
    estimated on a ``supersample``-times finer grid so the edge is anti-aliased."""
    half = int(math.ceil(radius))
    steps = (2 * half + 1) * supersample
    coords = (np.arange(steps) + 0.5) / supersample - (half + 0.5)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    if sides is None:
        inside = x**2 + y**2 <= radius**2
    else:
        # A point is inside a regular polygon when its projection on every edge normal is within the apothem.
        apothem = radius * math.cos(math.pi / sides)
        normals = rotation + (np.arange(sides) + 0.5) * 2 * math.pi / sides
        projections = x[..., None] * np.cos(normals) + y[..., None] * np.sin(normals)
        inside = np.all(projections <= apothem, axis=-1)
    coverage = inside.reshape(2 * half + 1, supersample, 2 * half + 1, supersample).mean(axis=(1, 3))
    return (coverage / coverage.sum()).astype(np.float32)


def _convolve_fft(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image`` [H, W, C] convolved with ``kernel`` [k, k] per channel, mirrored borders, same size."""
    pad = kernel.shape[0] // 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    return signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))


def lens_blur_disk(image: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Circular aperture (scipy FFT convolution) on sRGB values."""
    return clip_unit(_convolve_fft(image, aperture_kernel(radius)))


def lens_blur_hexagon_linear_light(image: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Six-blade aperture at a random rotation (scipy direct convolution) on linear light."""
    kernel = aperture_kernel(radius, sides=6, rotation=rng.uniform(0, math.pi / 3))
    linear = ndimage.convolve(srgb_to_linear(image), kernel[..., None], mode="mirror")
    return linear_to_srgb(linear)


def lens_blur_octagon_torch_linear_light(image: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Eight-blade aperture at a random rotation (torch conv2d, replicated borders) on linear light."""
    kernel = torch.from_numpy(aperture_kernel(radius, sides=8, rotation=rng.uniform(0, math.pi / 4)))
    pad = kernel.shape[0] // 2
    linear = F.pad(hwc_to_nchw(srgb_to_linear(image)), (pad, pad, pad, pad), mode="replicate")
    # conv2d correlates; an even-sided polygon is point-symmetric, so that is the same as convolving.
    weight = kernel[None, None].expand(3, 1, -1, -1)
    return linear_to_srgb(nchw_to_hwc(F.conv2d(linear, weight, groups=3)))


# ---------------------------------------------------------------- motion blur (strength: path length in pixels)


def _splat_path(points: np.ndarray) -> np.ndarray:
    """Normalised kernel from points ``[N, 2]`` (y, x) around 0, each spread bilinearly onto the grid."""
    half = int(math.ceil(np.abs(points).max())) + 1
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    shifted = points + half
    base = np.floor(shifted).astype(int)
    frac = shifted - base
    for dy in (0, 1):
        for dx in (0, 1):
            weight = (frac[:, 0] if dy else 1 - frac[:, 0]) * (frac[:, 1] if dx else 1 - frac[:, 1])
            np.add.at(kernel, (base[:, 0] + dy, base[:, 1] + dx), weight)
    return (kernel / kernel.sum()).astype(np.float32)


def motion_blur_linear_kernel(image: np.ndarray, length: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform motion along a straight line at a random angle (anti-aliased line kernel)."""
    angle = rng.uniform(0, math.pi)
    positions = np.linspace(-length / 2, length / 2, max(2, int(length * 4)))
    points = np.stack([positions * math.sin(angle), positions * math.cos(angle)], axis=1)
    return clip_unit(_convolve_fft(image, _splat_path(points)))


def motion_blur_camera_shake(image: np.ndarray, length: float, rng: np.random.Generator) -> np.ndarray:
    """Hand-held camera shake: a random walk with momentum whose path has the given length."""
    steps = max(8, int(length * 4))
    angle = rng.uniform(0, 2 * math.pi)
    velocity = np.array([math.sin(angle), math.cos(angle)])
    points = np.zeros((steps, 2))
    for step in range(1, steps):
        # Momentum keeps the path smooth; the random turn makes it curve like real shake.
        velocity = 0.9 * velocity + 0.3 * rng.normal(size=2)
        velocity /= np.linalg.norm(velocity)
        points[step] = points[step - 1] + velocity * length / (steps - 1)
    return clip_unit(_convolve_fft(image, _splat_path(points - points.mean(axis=0))))


def motion_blur_shifted_copies_pil(image: np.ndarray, length: float, rng: np.random.Generator) -> np.ndarray:
    """Average of sub-pixel shifted copies along a random direction, each resampled by Pillow's
    bilinear affine transform (how exposure over a moving scene accumulates)."""
    angle = rng.uniform(0, math.pi)
    pad = int(math.ceil(length / 2)) + 2
    padded = Image.fromarray(to_uint8(np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")))
    copies = max(2, int(math.ceil(length)) + 1)
    total = np.zeros(np.asarray(padded).shape, dtype=np.float64)
    for offset in np.linspace(-length / 2, length / 2, copies):
        shift_x, shift_y = offset * math.cos(angle), offset * math.sin(angle)
        moved = padded.transform(padded.size, Image.Transform.AFFINE, (1, 0, shift_x, 0, 1, shift_y), Image.BILINEAR)
        total += np.asarray(moved, dtype=np.float64)
    return clip_unit(total[pad:-pad, pad:-pad] / (copies * 255.0))


# ---------------------------------------------------------------- over-sharpening (strength: unsharp-mask amount)


def sharpen_unsharp_mask_scipy(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """``x + amount * (x - gaussian(x))``, Gaussian sigma 1 pixel (scipy), sRGB values."""
    blurred = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0), mode="reflect")
    return clip_unit(image + amount * (image - blurred))


def sharpen_unsharp_mask_pil(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow's unsharp mask, radius 1 pixel, no threshold, 8-bit sRGB."""
    sharpened = to_pil(image).filter(ImageFilter.UnsharpMask(radius=1, percent=int(round(amount * 100)), threshold=0))
    return from_pil(sharpened)


def sharpen_laplacian_torch(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """``x - amount / 2 * laplacian(x)`` with the 8-neighbour Laplacian (torch conv2d). For smooth
    content ``x - gaussian_1(x)`` is about ``-laplacian(x) / 2``, so ``amount`` means the same as in
    the unsharp masks; the 3x3 kernel boosts the finest detail more, as cheap sharpeners do."""
    laplacian = torch.tensor([[1.0, 1.0, 1.0], [1.0, -8.0, 1.0], [1.0, 1.0, 1.0]]) / 3.0
    pixels = F.pad(hwc_to_nchw(image), (1, 1, 1, 1), mode="replicate")
    detail = F.conv2d(pixels, laplacian[None, None].expand(3, 1, 3, 3), groups=3)
    return nchw_to_hwc(hwc_to_nchw(image) - amount / 2 * detail)
