"""Tone implementations: brightness, contrast, uneven illumination and posterisation.

Every function maps ``(image, strength, rng) -> image`` on unit images (float32 ``[H, W, 3]``, sRGB
in [0, 1], see `image_ops`); ``strength`` is read the same way by all implementations of a type.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import ImageEnhance, ImageOps
from scipy import optimize
from skimage import color

from .image_ops import clip_unit, from_pil, lab_to_unit_rgb, linear_to_srgb, srgb_to_linear, to_pil

# ---------------------------------------------------------------- brightness (strength: tone-curve exponent gamma;
# < 1 brightens, > 1 darkens)


def tone_curve_srgb(image: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Power curve ``x ** gamma`` on sRGB values."""
    return clip_unit(image**gamma)


def tone_curve_lab_lightness(image: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Power curve on CIELAB lightness, ``L = 100 (L / 100) ** gamma``, chroma kept."""
    lab = color.rgb2lab(image)
    lab[..., 0] = 100.0 * (lab[..., 0] / 100.0) ** gamma
    return lab_to_unit_rgb(lab)


def exposure_gain_linear_light(image: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Exposure change: linear light multiplied by the gain that moves mid grey where the curve
    ``x ** gamma`` moves it; brightening clips highlights instead of compressing them."""
    mid_grey = np.float32(0.5)
    gain = srgb_to_linear(mid_grey**gamma) / srgb_to_linear(mid_grey)
    return linear_to_srgb(srgb_to_linear(image) * gain)


# ---------------------------------------------------------------- contrast (strength: contrast factor;
# < 1 reduces, > 1 increases)


def contrast_about_mean_colour(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Each channel's deviation from its mean scaled by ``factor``, clipped."""
    mean = image.mean(axis=(0, 1), keepdims=True)
    return clip_unit(mean + factor * (image - mean))


def contrast_lab_lightness(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """CIELAB lightness deviation from its mean scaled by ``factor``, chroma kept."""
    lab = color.rgb2lab(image)
    mean_lightness = lab[..., 0].mean()
    lab[..., 0] = np.clip(mean_lightness + factor * (lab[..., 0] - mean_lightness), 0.0, 100.0)
    return lab_to_unit_rgb(lab)


def contrast_s_curve(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """S-shaped tone curve ``0.5 + 0.5 tanh(k (x - 0.5)) / tanh(k / 2)`` through (0, 0) and (1, 1),
    its slope at mid grey equal to ``factor`` (> 1): mid-tone contrast up, shadows and highlights
    compressed rather than clipped."""
    steepness = optimize.brentq(lambda k: 0.5 * k / math.tanh(k / 2) - factor, 1e-6, 100.0)
    return clip_unit(0.5 + 0.5 * np.tanh(steepness * (image - 0.5)) / math.tanh(steepness / 2))


def contrast_haze_linear_light(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric haze: linear light blended with a grey airlight a little brighter than the
    image's mean light. Haze on linear light lifts sRGB shadows far more than a blend of sRGB values
    does, so the transmission is ``factor ** 0.35``, which makes each level's PSNR match the
    sRGB-domain implementations' within about 1 dB (measured on six skimage photos)."""
    linear = srgb_to_linear(image)
    airlight = min(1.0, 1.1 * float(linear.mean()))
    transmission = factor**0.35
    return linear_to_srgb(transmission * linear + (1.0 - transmission) * airlight)


def contrast_pil_enhance(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow's ``ImageEnhance.Contrast``: deviation from the mean grey level scaled, 8-bit sRGB."""
    return from_pil(ImageEnhance.Contrast(to_pil(image)).enhance(factor))


# ---------------------------------------------------------------- uneven illumination (strength: light lost in the
# darkest place, a fraction in 0..1)


def vignette_cos4_linear_light(image: np.ndarray, loss: float, rng: np.random.Generator) -> np.ndarray:
    """Natural vignetting, the cos^4 law about an optical centre near the middle, on linear light;
    the farthest corner keeps ``1 - loss`` of its light."""
    height, width = image.shape[:2]
    centre_y = (height - 1) / 2 + rng.uniform(-0.1, 0.1) * height
    centre_x = (width - 1) / 2 + rng.uniform(-0.1, 0.1) * width
    y, x = np.mgrid[0:height, 0:width]
    radius_squared = (y - centre_y) ** 2 + (x - centre_x) ** 2
    # cos^4(atan(r / f)) = (f^2 / (f^2 + r^2))^2; choose the focal length f that gives 1 - loss at r_max.
    kept_root = math.sqrt(1.0 - loss)
    focal_squared = kept_root * radius_squared.max() / (1.0 - kept_root)
    gain = (focal_squared / (focal_squared + radius_squared)) ** 2
    return linear_to_srgb(srgb_to_linear(image) * gain[..., None])


def illumination_gradient_srgb(image: np.ndarray, loss: float, rng: np.random.Generator) -> np.ndarray:
    """Light falling off linearly across the frame in a random direction, on sRGB values."""
    height, width = image.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:height, 0:width]
    position = y * math.sin(angle) + x * math.cos(angle)
    position = (position - position.min()) / max(position.max() - position.min(), 1e-9)
    return clip_unit(image * (1.0 - loss * position)[..., None])


def illumination_shadow_field_linear_light(image: np.ndarray, loss: float, rng: np.random.Generator) -> np.ndarray:
    """Soft shadows: a sum of three broad Gaussian blobs centred at random places in the frame,
    scaled so the deepest point loses ``loss`` of its light, on linear light."""
    height, width = image.shape[:2]
    longer = max(height, width)
    y, x = np.mgrid[0:height, 0:width] / longer
    shadow = np.zeros((height, width))
    for _ in range(3):
        centre_y, centre_x = rng.uniform(0, height / longer), rng.uniform(0, width / longer)
        spread = rng.uniform(0.25, 0.5)
        shadow += rng.uniform(0.7, 1.0) * np.exp(-((y - centre_y) ** 2 + (x - centre_x) ** 2) / (2 * spread**2))
    gain = 1.0 - loss * shadow / shadow.max()
    return linear_to_srgb(srgb_to_linear(image) * gain[..., None])


# ---------------------------------------------------------------- posterisation (strength: bits per channel)


def posterise_uniform_rounding(image: np.ndarray, bits: float, rng: np.random.Generator) -> np.ndarray:
    """sRGB values rounded to ``round(2 ** bits)`` evenly spaced levels per channel (0 and 1 kept)."""
    steps = max(2, int(round(2**bits))) - 1
    return clip_unit(np.round(image * steps) / steps)


def posterise_pil_bits(image: np.ndarray, bits: float, rng: np.random.Generator) -> np.ndarray:
    """Pillow's ``ImageOps.posterize``: the low bits of each 8-bit channel zeroed (values floored)."""
    return from_pil(ImageOps.posterize(to_pil(image), int(np.clip(round(bits), 1, 8))))


def posterise_linear_light(image: np.ndarray, bits: float, rng: np.random.Generator) -> np.ndarray:
    """Linear light rounded to ``round(2 ** bits)`` levels, then sRGB-encoded: coarse steps in the
    shadows (the banding of a low-bit-depth linear pipeline)."""
    steps = max(2, int(round(2**bits))) - 1
    return linear_to_srgb(np.round(srgb_to_linear(image) * steps) / steps)
