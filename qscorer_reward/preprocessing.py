"""Turn what users pass as images into float pixels in [0, 1], and the shared pixel operations.

Everything here is pure torch on the target device, so tensor input stays differentiable; PIL,
path and numpy inputs are converted to tensors first and then take the same path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageInput = torch.Tensor | np.ndarray | Image.Image | str | os.PathLike | Sequence

# Pillow's own default guard against decompression bombs (about 89.5 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Float input may overshoot its declared range a little (a VAE decode does); beyond this fraction
# of the range width it is taken to be in another range and refused.
RANGE_TOLERANCE = 0.1


def load_image(path: str | os.PathLike, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read an image file as a uint8 tensor ``[3, H, W]``.

    Raises `ValueError` naming the file when it is missing, unreadable, truncated or larger than
    ``max_image_pixels`` (checked from the header, before any pixel is decoded).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_image_pixels:
                raise ValueError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_image_pixels} (a possible decompression bomb); raise max_image_pixels to allow it"
                )
            image.load()
            return pil_to_tensor(image)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such file") from err
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of any mode -> uint8 ``[3, H, W]``; transparency is composited onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def to_unit_pixels(
    images: ImageInput,
    input_range: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[torch.Tensor] | torch.Tensor:
    """Convert any supported image input to float32 (float64 if given) RGB pixels in [0, 1] on ``device``.

    Accepted: a float tensor ``[B, 3, H, W]`` or ``[3, H, W]`` in ``input_range``; a uint8 tensor
    (0..255); 1-channel (grey) or 4-channel (RGBA, composited onto white) tensors; a PIL image; a
    path; a numpy array ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` (uint8, or float in
    ``input_range``); or a list mixing these (each item one image).

    Returns a tensor ``[B, 3, H, W]`` when the input was one batched tensor/array (kept batched so
    later steps stay vectorised), else a list of ``[3, H, W]`` tensors. Float input keeps its
    autograd graph. Raises `TypeError` for unsupported types, `ValueError` (naming the item) for an
    empty batch, wrong rank or channel count, non-finite values or values outside ``input_range``.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"empty batch: images has shape {tuple(images.shape)}")
        return _to_unit(_as_tensor(images, "images", batched=True), input_range, "images", device)
    if isinstance(images, (torch.Tensor, np.ndarray, Image.Image, str, os.PathLike)):
        images = [images]
    if not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a tensor, numpy array, PIL image, path or a list of them, got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("empty batch: no images given")
    converted = []
    for index, item in enumerate(images):
        name = f"images[{index}]"
        if isinstance(item, (str, os.PathLike)):
            tensor = load_image(item, max_image_pixels)
            name = f"{name} ({item})"
        elif isinstance(item, Image.Image):
            tensor = pil_to_tensor(item)
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            tensor = _as_tensor(item, name, batched=False)
        else:
            raise TypeError(
                f"{name} has unsupported type {type(item).__name__}; expected a tensor, numpy array, PIL image or path"
            )
        converted.append(_to_unit(tensor.unsqueeze(0), input_range, name, device)[0])
    return converted


def _as_tensor(item: torch.Tensor | np.ndarray, name: str, batched: bool) -> torch.Tensor:
    """A tensor laid out channels-first (``[B, C, H, W]`` if ``batched`` else ``[C, H, W]``)."""
    rank = 4 if batched else 3
    if isinstance(item, np.ndarray):
        array = item
        if not batched and array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != rank:
            raise ValueError(f"{name}: numpy images must be [H, W], [H, W, C] or [B, H, W, C], got shape {array.shape}")
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name}: numpy images must be uint8 or float, got {array.dtype}")
        if not array.flags.writeable:  # e.g. np.asarray(pil_image); torch wants memory it may write
            array = array.copy()
        return torch.from_numpy(np.ascontiguousarray(array)).movedim(-1, -3)
    if item.ndim != rank:
        expected = "[B, C, H, W]" if batched else "[C, H, W]"
        raise ValueError(f"{name}: expected a tensor of shape {expected}, got shape {tuple(item.shape)}")
    return item


def _to_unit(
    pixels: torch.Tensor, input_range: tuple[float, float], name: str, device: torch.device | str | None
) -> torch.Tensor:
    """``[B, C, H, W]`` uint8 or float -> float32 ``[B, 3, H, W]`` in [0, 1] on ``device``."""
    channels = pixels.shape[1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels} "
            f"(shape {tuple(pixels.shape)}; tensors are channels-first, numpy arrays channels-last)"
        )
    if pixels.shape[-1] == 0 or pixels.shape[-2] == 0:
        raise ValueError(f"{name}: image has zero size, shape {tuple(pixels.shape)}")
    pixels = pixels.to(device) if device is not None else pixels
    if pixels.dtype == torch.uint8:
        pixels = pixels.float().div_(255.0)  # a new tensor: dividing in place is safe
    elif pixels.is_floating_point():
        # float64 stays float64 (numerical checks); half precisions are computed in float32
        pixels = _float_to_unit(pixels if pixels.dtype == torch.float64 else pixels.float(), input_range, name)
    else:
        raise TypeError(f"{name}: image tensors must be uint8 or floating point, got {pixels.dtype}")
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif channels == 4:
        alpha = pixels[:, 3:]
        pixels = pixels[:, :3] * alpha + (1.0 - alpha)
    return pixels


def _float_to_unit(pixels: torch.Tensor, input_range: tuple[float, float], name: str) -> torch.Tensor:
    low, high = (float(v) for v in input_range)
    if not low < high:
        raise ValueError(f"input_range must be (low, high) with low < high, got {input_range}")
    # One pass and one host sync: NaN and +-inf show up in the extremes.
    minimum, maximum = torch.stack(torch.aminmax(pixels.detach())).tolist()
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        raise ValueError(f"{name} contains NaN or infinite values")
    slack = RANGE_TOLERANCE * (high - low)
    if minimum < low - slack or maximum > high + slack:
        hint = ""
        if maximum > 2.0 and high <= 1.0:
            hint = " (it looks like 0..255 data: divide by 255 or pass a uint8 tensor)"
        elif minimum < -0.5 and low >= 0.0:
            hint = " (it looks like [-1, 1] data: pass input_range=(-1, 1))"
        raise ValueError(
            f"{name} has values in [{minimum:.4g}, {maximum:.4g}], outside the declared input_range {(low, high)}{hint}"
        )
    if (low, high) != (0.0, 1.0):
        pixels = (pixels - low) / (high - low)
    elif minimum >= 0.0 and maximum <= 1.0:
        return pixels  # already in [0, 1]: no copy (the clamp would be the identity, gradient included)
    return pixels.clamp(0.0, 1.0)


def resize_antialiased(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize of ``[N, 3, H, W]`` float pixels in [0, 1], differentiable.

    Antialiased bicubic in torch uses PIL's kernel (a = -0.5). Like PIL, it resizes one axis at a
    time and clamps to [0, 1] after each pass (PIL stores each pass as uint8, which cuts the bicubic
    overshoot at edges), in PIL's order: width first, except when the height shrinks while the
    width grows. So it matches the reference processors' PIL resize up to PIL's rounding to uint8
    after each pass.
    """
    in_height, in_width = pixels.shape[-2:]
    if (in_height, in_width) == (height, width):
        return pixels
    if height < in_height and width > in_width:
        passes = [(height, in_width), (height, width)]
    else:
        passes = [(in_height, width), (height, width)]
    for size in passes:
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.clamp_(0.0, 1.0)  # in place on a fresh tensor: saves an allocation
    return pixels


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel for ``[N, 3, H, W]`` float pixels."""
    inverse_std = 1.0 / torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    offset = -torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1) * inverse_std
    return torch.addcmul(offset, pixels, inverse_std)  # one fused pass instead of two
