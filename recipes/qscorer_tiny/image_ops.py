"""Pixel conversions shared by the synthetic distortions, content generators and quality labels.

Layout everywhere in this family of modules: an RGB image is a numpy ``float32`` array
``[H, W, 3]`` with sRGB-encoded values in [0, 1] ("unit image"). Conversions to PIL and uint8 go
through `to_uint8` so rounding is the same everywhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image
from skimage import color

# JFIF (full-range BT.601) RGB -> YCbCr; Cb and Cr are centred on 0.5.
_BT601_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32
)
# BT.709 luma weights, the HDTV matrix; Cb, Cr scaled to the same +-0.5 range as BT.601.
_BT709_KR, _BT709_KB = 0.2126, 0.0722
_BT709_RGB_TO_YCBCR = np.array(
    [
        [_BT709_KR, 1 - _BT709_KR - _BT709_KB, _BT709_KB],
        [-_BT709_KR / (2 - 2 * _BT709_KB), -(1 - _BT709_KR - _BT709_KB) / (2 - 2 * _BT709_KB), 0.5],
        [0.5, -(1 - _BT709_KR - _BT709_KB) / (2 - 2 * _BT709_KR), -_BT709_KB / (2 - 2 * _BT709_KR)],
    ],
    dtype=np.float32,
)
YCBCR_MATRICES = {"bt601": _BT601_RGB_TO_YCBCR, "bt709": _BT709_RGB_TO_YCBCR}


def clip_unit(image: np.ndarray) -> np.ndarray:
    """``image`` clipped to [0, 1] as float32 (same shape)."""
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Unit image ``[H, W, 3]`` -> uint8 ``[H, W, 3]`` (rounded to nearest)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def from_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> unit image ``[H, W, 3]`` (grey expanded, alpha dropped)."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return (image[..., :3].astype(np.float32) / 255.0).astype(np.float32)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(to_uint8(image), mode="RGB")


def from_pil(image: Image.Image) -> np.ndarray:
    return from_uint8(np.asarray(image.convert("RGB")))


def to_tensor_uint8(image: np.ndarray) -> torch.Tensor:
    """Unit image ``[H, W, 3]`` -> uint8 tensor ``[3, H, W]``, the layout `QScorer` accepts."""
    return torch.from_numpy(to_uint8(image)).permute(2, 0, 1).contiguous()


def srgb_to_linear(image: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light in [0, 1] (IEC 61966-2-1 transfer curve)."""
    image = np.clip(image, 0.0, 1.0)
    return np.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB-encoded values, clipped to [0, 1]."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055).astype(np.float32)


def rgb_to_ycbcr(image: np.ndarray, standard: str = "bt601") -> np.ndarray:
    """Unit RGB ``[H, W, 3]`` -> YCbCr ``[H, W, 3]``: Y in [0, 1], Cb and Cr centred on 0.5."""
    ycbcr = image @ YCBCR_MATRICES[standard].T
    ycbcr[..., 1:] += 0.5
    return ycbcr.astype(np.float32)


def ycbcr_to_rgb(ycbcr: np.ndarray, standard: str = "bt601") -> np.ndarray:
    """Inverse of `rgb_to_ycbcr`, clipped to [0, 1]."""
    centred = ycbcr - np.array([0.0, 0.5, 0.5], dtype=np.float32)
    return clip_unit(centred @ np.linalg.inv(YCBCR_MATRICES[standard]).T)


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma ``[H, W]`` of a unit RGB image."""
    return (image @ _BT601_RGB_TO_YCBCR[0]).astype(np.float32)


def lab_to_unit_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) ``[H, W, 3]`` -> unit RGB image; out-of-gamut colours are clipped."""
    with warnings.catch_warnings():
        # skimage warns when it clips out-of-gamut colours; clipping is what is wanted here.
        warnings.simplefilter("ignore", UserWarning)
        return clip_unit(color.lab2rgb(lab))


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch CPU generator seeded from ``rng``, so torch-based code stays deterministic in ``rng``."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


def hwc_to_nchw(image: np.ndarray) -> torch.Tensor:
    """Unit image ``[H, W, 3]`` -> float32 tensor ``[1, 3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def nchw_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """Float tensor ``[1, 3, H, W]`` -> unit image ``[H, W, 3]`` (clipped)."""
    return clip_unit(tensor[0].permute(1, 2, 0).numpy())
