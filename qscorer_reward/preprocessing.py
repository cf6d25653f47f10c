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


def open_image(
    path: str | os.PathLike,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reduce_to_pixels: int | None = None,
) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright and, if asked, already reduced.

    Every file and PIL input of the package goes through here (or `to_rgb_image` for images
    already in memory), so they are all seen alike:

    - the EXIF orientation tag is applied (a photo stored sideways comes out as it is displayed);
    - every PIL mode becomes 8-bit RGB by its real value range (see `to_rgb_image`);
    - with ``reduce_to_pixels``, an image larger than that is reduced right after decoding (JPEG
      decodes at 1/2, 1/4 or 1/8 scale directly, then an antialiased resize) to an area of at most
      about ``reduce_to_pixels``, aspect ratio kept; smaller images are untouched. Memory then
      peaks at the decoded file in its own mode, not at a float copy of it.

    Raises `ValueError` naming the file when it is missing, unreadable, truncated, of a mode that
    cannot be converted, or larger than ``max_image_pixels`` (checked from the header, before any
    pixel is decoded).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            return decode_opened_image(
                image, max_image_pixels=max_image_pixels, reduce_to_pixels=reduce_to_pixels, name=str(path)
            )
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such file") from err
    except IsADirectoryError as err:
        raise ValueError(f"{path}: is a folder, not an image file") from err
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def decode_opened_image(
    image: Image.Image,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reduce_to_pixels: int | None = None,
    name: str = "image",
) -> Image.Image:
    """Decode an image PIL has opened but not yet loaded (a file, or bytes in memory) as
    `open_image` does: the size checked from the header, a JPEG decoded directly at a reduced scale
    when ``reduce_to_pixels`` allows, then `to_rgb_image`. ``name`` is what errors name."""
    width, height = image.size
    if width * height > max_image_pixels:
        raise ValueError(
            f"{name}: image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_image_pixels} (a possible decompression bomb); raise max_image_pixels to allow it"
        )
    if reduce_to_pixels is not None and width * height > reduce_to_pixels:
        image.draft(image.mode, _reduced_size(width, height, reduce_to_pixels))
    image.load()
    return to_rgb_image(image, reduce_to_pixels=reduce_to_pixels, name=name)


def rgb_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def load_image(
    path: str | os.PathLike,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    reduce_to_pixels: int | None = None,
) -> torch.Tensor:
    """Read an image file as a uint8 tensor ``[3, H, W]`` (see `open_image`, which reads it)."""
    return rgb_to_tensor(open_image(path, max_image_pixels=max_image_pixels, reduce_to_pixels=reduce_to_pixels))


# EXIF orientation (tag 0x0112) -> the transposition that shows the image as it is meant to be seen.
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION_TAG = 0x0112


def to_rgb_image(image: Image.Image, *, reduce_to_pixels: int | None = None, name: str = "image") -> Image.Image:
    """Any PIL image -> a new 8-bit RGB image, upright, reduced to about ``reduce_to_pixels``.

    - EXIF orientation is applied.
    - 8-bit modes (``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``...) are converted by PIL.
    - 16-bit modes (``I;16``, ``I;16B``...) are divided by 65535 (PIL itself would clip them at 255).
    - ``I`` (32-bit integers) by its declared range: the TIFF sample range or bit depth, or 16 bits
      for a PNG; refused when the file declares none.
    - ``F`` (32-bit float) by the TIFF's declared sample range, else taken as [0, 1]; refused when its
      values are not finite or fall outside [0, 1] with no declared range.
    - Transparency (an alpha band, or a palette's transparent entry) is composited onto white.

    ``name`` is the file or item named in errors (`ValueError`).
    """
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG)
    value_range = _value_range(image, name) if image.mode.startswith(("I", "F")) else None
    if value_range is None:  # else one band of high-precision samples, reduced before it is rounded
        image = _working_mode(image, name)
    if reduce_to_pixels is not None and image.width * image.height > reduce_to_pixels:
        # Bicubic after a box reduction to within 3x of the target: antialiased, and cheap on
        # huge images.
        size = _reduced_size(image.width, image.height, reduce_to_pixels)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if value_range is not None:
        low, high = value_range
        scale = 255.0 / (high - low)
        offset = 0.5 - low * scale  # + 0.5: converting F to L truncates
        image = image.convert("F").point(lambda value: value * scale + offset).convert("L")  # and clips
    if orientation in _ORIENTATIONS:
        image = image.transpose(_ORIENTATIONS[orientation])
    if image.mode in ("LA", "RGBA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")  # a new image, also when it was RGB already


def _working_mode(image: Image.Image, name: str) -> Image.Image:
    """An 8-bit image as ``L``, ``LA``, ``RGB`` or ``RGBA``: modes PIL resizes correctly (it resizes
    palette and bilevel images by nearest neighbour) and that keep any transparency."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    if image.mode in ("1", "La"):
        return image.convert({"1": "L", "La": "LA"}[image.mode])
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"{name}: PIL cannot convert mode {image.mode!r} to RGB ({err})") from err


def _reduced_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """``(width, height)`` scaled to an area of about ``pixels``, aspect ratio kept, sides >= 1."""
    scale = math.sqrt(pixels / (width * height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _value_range(image: Image.Image, name: str) -> tuple[float, float]:
    """``(black, white)`` sample values of a high-precision (``I;16*``, ``I``, ``F``) image."""
    if image.mode.startswith("I;16"):
        return 0.0, 65535.0
    tags = getattr(image, "tag_v2", None) or {}
    low, high = (float(v) if v is not None else None for v in _declared_range(tags))
    minimum, maximum = image.getextrema()
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():  # extrema skip NaN
        raise ValueError(f"{name}: float image (mode F) holds NaN or infinite values")
    if low is not None and high is not None and low < high:
        return low, high
    if image.mode == "I":
        bits = _first(tags.get(258)) or (16 if image.format == "PNG" else None)  # TIFF BitsPerSample
        if bits is not None and bits <= 16 and minimum >= 0:
            return 0.0, float(2**bits - 1)
        raise ValueError(
            f"{name}: 32-bit integer image (mode I) with values in [{minimum:g}, {maximum:g}] and no declared "
            "range: its brightness scale is unknown; convert it to an 8- or 16-bit image first"
        )
    if minimum >= 0.0 and maximum <= 1.0:
        return 0.0, 1.0
    raise ValueError(
        f"{name}: float image (mode F) with values in [{minimum:g}, {maximum:g}], outside [0, 1], and no "
        "declared range (TIFF SMinSampleValue/SMaxSampleValue): scale it to [0, 1] first"
    )


def _declared_range(tags) -> tuple:
    """A TIFF's declared sample range: SMin/SMaxSampleValue (340, 341), else Min/MaxSampleValue
    (280, 281); ``(None, None)`` when it declares none."""
    for low_tag, high_tag in ((340, 341), (280, 281)):
        if high_tag in tags:
            return _first(tags.get(low_tag)) or 0, _first(tags[high_tag])
    return None, None


def _first(value):
    """The first sample's value of a TIFF tag (stored per sample as a tuple, or as one number)."""
    return value[0] if isinstance(value, tuple) and value else value


def to_unit_pixels(
    images: ImageInput,
    input_range: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    reduce_to_pixels: int | None = None,
) -> list[torch.Tensor] | torch.Tensor:
    """Convert any supported image input to float32 (float64 if given) RGB pixels in [0, 1] on ``device``.

    Accepted: a float tensor ``[B, 3, H, W]`` or ``[3, H, W]`` in ``input_range``; a uint8 tensor
    (0..255); 1-channel (grey) or 4-channel (RGBA, composited onto white) tensors; a PIL image; a
    path; a numpy array ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` (uint8, or float in
    ``input_range``); or a list mixing these (each item one image). Paths and PIL images are read
    as `open_image` reads them (EXIF orientation applied, every mode by its real range, reduced to
    about ``reduce_to_pixels`` if given); tensors and arrays are taken as they are.

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
            tensor = load_image(item, max_image_pixels, reduce_to_pixels=reduce_to_pixels)
            name = f"{name} ({item})"
        elif isinstance(item, Image.Image):
            tensor = rgb_to_tensor(to_rgb_image(item, reduce_to_pixels=reduce_to_pixels, name=name))
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
