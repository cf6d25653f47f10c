"""Augmentation that leaves image quality as it is: mirroring, and crops within the pixel budget."""

from __future__ import annotations

import math

import numpy as np
import torch


class QualityPreservingAugment:
    """Random horizontal flip and crop of uint8 ``[C, H, W]`` images (the dataset applies it).

    Crops keep the aspect ratio, with sides at least ``min_crop_side`` of the image's; a crop never
    has fewer pixels than ``min(H * W, max_pixels)``, so the backbone never upsamples it more than
    it would the whole image. Blur, noise and compression look the same in any part of an image,
    and a mirrored image has the same quality; rescaling (which would change sharpness) is avoided.

    Args:
        hflip: mirror with probability 1/2.
        min_crop_side: smallest crop side as a fraction of the image side, in (0, 1]; 1 disables cropping.
        max_pixels: the backbone's pixel budget (``QScorerConfig.max_pixels``).
    """

    def __init__(self, hflip: bool, min_crop_side: float, max_pixels: int):
        if not 0.0 < min_crop_side <= 1.0:
            raise ValueError(f"min_crop_side must be in (0, 1], got {min_crop_side}")
        self.hflip = hflip
        self.min_crop_side = min_crop_side
        self.max_pixels = max_pixels

    @property
    def active(self) -> bool:
        return self.hflip or self.min_crop_side < 1.0

    def __call__(self, pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``pixels``: uint8 ``[C, H, W]``; returns an augmented view of the same dtype."""
        flip, side, top, left = rng.random(4)
        height, width = pixels.shape[-2:]
        budget_side = math.sqrt(min(height * width, self.max_pixels) / (height * width))
        fraction = max(self.min_crop_side, budget_side)
        fraction = fraction + (1.0 - fraction) * side
        crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
        y0 = int(top * (height - crop_h + 1))
        x0 = int(left * (width - crop_w + 1))
        pixels = pixels[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
        if self.hflip and flip < 0.5:
            pixels = pixels.flip(-1)
        return pixels.contiguous()
