"""Images as they travel to and from the reward service: encoding pixels as PNG files (the client),
decoding the files a request carries, and scoring decoded images so that one bad image fails only
itself (the server).

`decode_image` is the one place where the service and the Ray Data engine turn bytes into pixels.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from qscorer_reward.preprocessing import decode_opened_image, rgb_to_tensor

# The encoded formats the service accepts (Pillow's names): lossless PNG for exact pixels, and the
# two lossy formats generated images are usually stored in.
WIRE_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageRejected(ValueError):
    """An image that cannot be scored; ``kind`` names why (``"not_an_image"``,
    ``"decompression_bomb"``, ``"unscorable"``)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def decode_image(
    data: bytes, max_image_pixels: int, name: str = "image", reduce_to_pixels: int | None = None
) -> torch.Tensor:
    """An encoded PNG, JPEG or WebP file -> uint8 ``[3, H, W]``, decoded as `QScorer` decodes files
    (`qscorer_reward.preprocessing.decode_opened_image`: EXIF orientation applied, every mode
    converted by its range, reduced right after decoding to about ``reduce_to_pixels`` (the
    scorer's ``backbone.decode_pixel_budget``) when given; animated files give their first frame).

    Raises `ImageRejected` naming ``name``: ``"decompression_bomb"`` when the header declares more
    than ``max_image_pixels`` pixels (nothing is decoded then), ``"not_an_image"`` for anything
    that is not a complete file of those formats.
    """
    try:
        with Image.open(io.BytesIO(data), formats=WIRE_FORMATS) as image:
            width, height = image.size
            if width * height > max_image_pixels:
                raise ImageRejected(
                    f"{name} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_image_pixels} (a possible decompression bomb)",
                    "decompression_bomb",
                )
            return rgb_to_tensor(
                decode_opened_image(
                    image, max_image_pixels=max_image_pixels, reduce_to_pixels=reduce_to_pixels, name=name
                )
            )
    except ImageRejected:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise ImageRejected(f"{name}: {err}", "decompression_bomb") from err
    except Image.UnidentifiedImageError as err:
        raise ImageRejected(f"{name} is not a PNG, JPEG or WebP file", "not_an_image") from err
    except Exception as err:  # whatever a broken file makes a decoder raise is the sender's problem
        raise ImageRejected(f"{name} cannot be decoded ({type(err).__name__}: {err})", "not_an_image") from err


def encode_png(pixels: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` -> the bytes of a PNG file (lossless; zlib level 1, fast to write)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def score_images(scorer, images: list[torch.Tensor]) -> list[float | ValueError]:
    """Scores of ``images`` (uint8 ``[3, H, W]`` each) in one forward pass; if the scorer refuses
    the batch, each image on its own, so that an unscorable image (too small, too elongated) only
    gets its own error. Returns a score or the `ValueError` per image, in order."""
    try:
        with torch.inference_mode():
            return scorer(images).tolist()
    except ValueError as err:
        if len(images) == 1:
            return [err]
        return [result for image in images for result in score_images(scorer, [image])]
