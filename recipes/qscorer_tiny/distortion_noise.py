"""Noise implementations: white, chroma, impulse and multiplicative (speckle) noise.

Every function maps ``(image, strength, rng) -> image`` on unit images (float32 ``[H, W, 3]``, sRGB
in [0, 1], see `image_ops`); ``strength`` is read the same way by all implementations of a type.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage import color

from .image_ops import (
    clip_unit,
    hwc_to_nchw,
    lab_to_unit_rgb,
    linear_to_srgb,
    nchw_to_hwc,
    rgb_to_ycbcr,
    srgb_to_linear,
    torch_generator,
    ycbcr_to_rgb,
)

# CIELAB a*/b* units per Cb/Cr unit that give the same RGB-domain noise std on mid grey (measured:
# Cb/Cr noise of std 0.01 gives RGB std 0.0139, a*/b* noise of std 1 gives 0.0061).
_LAB_UNITS_PER_CBCR_UNIT = 230.0
# Slope of the sRGB encoding at mid grey (sRGB 0.5 = linear 0.214), to express linear-light noise
# in sRGB-domain units.
_SRGB_MID_GREY_LINEAR = 0.214
_SRGB_SLOPE_AT_MID_GREY = 1.055 / 2.4 * _SRGB_MID_GREY_LINEAR ** (1 / 2.4 - 1)

# ---------------------------------------------------------------- white noise (strength: std in sRGB units)


def white_noise_rgb(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise on each RGB channel of each pixel."""
    return clip_unit(image + rng.normal(0.0, sigma, image.shape))


def white_noise_luminance(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """One Gaussian value per pixel added to all three channels (grey, film-like grain)."""
    return clip_unit(image + rng.normal(0.0, sigma, image.shape[:2])[..., None])


def white_noise_sensor_poisson_gaussian(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Camera sensor noise: Poisson photon noise plus Gaussian read noise on linear light, then sRGB
    encoding (so shadows get noisier than highlights). Calibrated so that at mid grey the sRGB-domain
    std is ``sigma``, 80% of the variance from photon noise."""
    linear_sigma = sigma / _SRGB_SLOPE_AT_MID_GREY
    photon_gain = 0.8 * linear_sigma**2 / _SRGB_MID_GREY_LINEAR
    read_sigma = math.sqrt(0.2) * linear_sigma
    linear = srgb_to_linear(image)
    photons = rng.poisson(linear / photon_gain) * photon_gain
    return linear_to_srgb(photons + rng.normal(0.0, read_sigma, image.shape))


# ---------------------------------------------------------------- chroma noise (strength: std in Cb/Cr units)


def chroma_noise_ycbcr(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise on the BT.601 Cb and Cr channels; luma untouched."""
    ycbcr = rgb_to_ycbcr(image)
    ycbcr[..., 1:] += rng.normal(0.0, sigma, ycbcr[..., 1:].shape)
    return ycbcr_to_rgb(ycbcr)


def chroma_noise_lab(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise on CIELAB a* and b*; lightness untouched."""
    lab = color.rgb2lab(image)
    lab[..., 1:] += rng.normal(0.0, sigma * _LAB_UNITS_PER_CBCR_UNIT, lab[..., 1:].shape)
    return lab_to_unit_rgb(lab)


def chroma_noise_blotchy_bt709(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Chroma noise drawn at half resolution and upsampled bilinearly (the blotches of camera chroma
    noise after demosaicing), on BT.709 Cb/Cr, with std ``sigma`` after upsampling."""
    height, width = image.shape[:2]
    # Bilinear x2 upsampling averages neighbours with weights (3/4, 1/4) per axis, which scales the
    # std of white noise by 0.625; draw it larger by that much.
    coarse_shape = (1, 2, (height + 1) // 2, (width + 1) // 2)
    coarse = torch.from_numpy(rng.normal(0.0, sigma / 0.625, coarse_shape).astype(np.float32))
    noise = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[0, :, :height, :width]
    ycbcr = rgb_to_ycbcr(image, "bt709")
    ycbcr[..., 1:] += noise.permute(1, 2, 0).numpy()
    return ycbcr_to_rgb(ycbcr, "bt709")


# ---------------------------------------------------------------- impulse noise (strength: fraction of pixels hit)


def impulse_noise_salt_pepper_pixel(image: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Whole pixels set to black or white."""
    hit = rng.random(image.shape[:2]) < density
    values = (rng.random(image.shape[:2]) < 0.5).astype(np.float32)
    return np.where(hit[..., None], values[..., None], image).astype(np.float32)


def impulse_noise_salt_pepper_channel(image: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Single channels set to 0 or 1 (coloured specks), with a per-channel rate chosen so that the
    fraction of pixels with any channel hit is ``density``."""
    channel_rate = 1.0 - (1.0 - density) ** (1.0 / 3.0)
    hit = rng.random(image.shape) < channel_rate
    values = (rng.random(image.shape) < 0.5).astype(np.float32)
    return np.where(hit, values, image).astype(np.float32)


def impulse_noise_random_valued_torch(image: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Whole pixels replaced by uniformly random colours (torch random stream)."""
    generator = torch_generator(rng)
    pixels = hwc_to_nchw(image)
    hit = torch.rand(pixels.shape[2:], generator=generator) < density
    random_colours = torch.rand(pixels.shape, generator=generator)
    return nchw_to_hwc(torch.where(hit, random_colours, pixels))


# ---------------------------------------------------------------- multiplicative noise (strength: std of the factor)


def multiplicative_noise_gaussian(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Speckle ``x * (1 + n)``, ``n`` Gaussian with std ``sigma``, per channel."""
    return clip_unit(image * (1.0 + rng.normal(0.0, sigma, image.shape)))


def multiplicative_noise_gamma(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Speckle ``x * g`` with ``g`` Gamma-distributed (mean 1, std ``sigma``), one factor per pixel
    for all channels, as in multi-look coherent imaging."""
    shape = 1.0 / sigma**2
    factor = rng.gamma(shape, 1.0 / shape, image.shape[:2])
    return clip_unit(image * factor[..., None])


def multiplicative_noise_lognormal_torch(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Speckle ``x * exp(n)``, log-normal factor with mean 1 and std ``sigma``, per channel (torch)."""
    log_sigma = math.sqrt(math.log1p(sigma**2))
    pixels = hwc_to_nchw(image)
    normal = torch.randn(pixels.shape, generator=torch_generator(rng))
    return nchw_to_hwc(pixels * torch.exp(log_sigma * normal - log_sigma**2 / 2))
