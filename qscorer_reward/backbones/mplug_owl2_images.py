"""Images to mPLUG-Owl2 pixel values, the way the paper's evaluation prepares them.

The reference pads each image to a square with the CLIP mean colour (``(122, 116, 104)``, the
image centred along its long side), resizes it with PIL's bicubic filter to the tower's input size,
rescales to [0, 1] and normalises with the CLIP statistics. Two paths do that here:

- 8-bit images (files, PIL images, uint8 arrays and tensors) take `reference_pixels`, the
  reference's own PIL and numpy steps, and give exactly its pixel values.
- float tensors take `differentiable_pixels`, the same steps in torch so that scores can be
  differentiated with respect to the pixels. It differs from the PIL path only where PIL rounds to
  8 bits between its two resize passes; `docs/official_model.md` gives the measured difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from qscorer_reward.preprocessing import normalize, resize_antialiased


def pad_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The reference's background colour: the mean truncated to 8 bits, ``(122, 116, 104)`` for CLIP."""
    return tuple(int(m * 255) for m in image_mean)


def square_offsets(height: int, width: int) -> tuple[int, int]:
    """``(top, left)`` of an image of that size pasted centred on its square canvas (the reference's
    rounding: the spare rows or columns split with the odd one after the image)."""
    if width > height:
        return (width - height) // 2, 0
    return 0, (height - width) // 2


def reference_pixels(
    image: torch.Tensor, size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> torch.Tensor:
    """uint8 RGB ``[3, H, W]`` -> float32 ``[3, size, size]``, bit for bit the reference's pixels.

    PIL pastes the image on the mean-coloured square and resizes it (bicubic, antialiased when
    shrinking, 8-bit result); the rescale multiplies by 1/255 in float64 and casts to float32; the
    normalisation subtracts and divides in float32.
    """
    array = image.permute(1, 2, 0).cpu().numpy()
    height, width = array.shape[:2]
    picture = Image.fromarray(array, "RGB")
    side = max(height, width)
    if height != width:
        canvas = Image.new("RGB", (side, side), pad_colour(image_mean))
        top, left = square_offsets(height, width)
        canvas.paste(picture, (left, top))
        picture = canvas
    if side != size:
        picture = picture.resize((size, size), Image.BICUBIC)
    rescaled = (np.asarray(picture) * (1 / 255)).astype(np.float32)
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    return torch.from_numpy(((rescaled - mean) / std).transpose(2, 0, 1).copy())


def differentiable_pixels(
    pixels: torch.Tensor, size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> torch.Tensor:
    """Float RGB ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]``, differentiable, on the input's device.

    The pad colour is the reference's 8-bit one; the resize is `resize_antialiased` (PIL's bicubic
    kernel, per-axis passes clamped to [0, 1] as PIL's 8-bit passes are).
    """
    batch, _, height, width = pixels.shape
    side = max(height, width)
    if height != width:
        colour = torch.tensor(pad_colour(image_mean), dtype=pixels.dtype, device=pixels.device) / 255
        canvas = colour.view(1, 3, 1, 1).expand(batch, 3, side, side).clone()
        top, left = square_offsets(height, width)
        canvas[:, :, top : top + height, left : left + width] = pixels
        pixels = canvas
    return normalize(resize_antialiased(pixels, size, size), image_mean, image_std)
