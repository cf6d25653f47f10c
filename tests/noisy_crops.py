"""A small synthetic IQA set whose MOS is a known function of the image, for the training tests.

Crops of scikit-image's sample photos get one distortion at a random level ``l`` in [0, 1] and the
score ``mos = 5 - 4 l``: Gaussian noise of std ``0.25 l`` (pixels in [0, 1]) or Gaussian blur of
std ``2.5 l`` pixels. The images are written as PNG with a manifest, so training reads them
exactly as it reads a real dataset. (scikit-image is a test dependency; the photos of
scikit-learn and matplotlib are kept out, for independent evaluation.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qscorer_reward.training.data import IQARecord, write_manifest

DISTORTIONS = ("noise", "blur")
MAX_NOISE_STD = 0.25
MAX_BLUR_SIGMA = 2.5


def load_sample_photo(name: str) -> torch.Tensor:
    """scikit-image sample photo ``name`` (e.g. ``"astronaut"``) as float ``[3, H, W]`` in [0, 1]."""
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("synthetic data is cut from scikit-image's sample photos: pip install scikit-image") from err
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(np.ptp(image), 1e-12)).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def distort(image: torch.Tensor, distortion: str, level: float, rng: np.random.Generator) -> torch.Tensor:
    """Apply ``distortion`` at ``level`` in [0, 1] to float ``[3, H, W]`` pixels in [0, 1]."""
    if distortion == "noise":
        noise = torch.from_numpy(rng.normal(0.0, MAX_NOISE_STD * level, image.shape)).float()
        return (image + noise).clamp(0.0, 1.0)
    if distortion == "blur":
        sigma = MAX_BLUR_SIGMA * level
        if sigma < 1e-3:
            return image
        radius = int(3 * sigma) + 1
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
        blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        return blurred[0]
    raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")


def make_synthetic_dataset(
    directory: str | os.PathLike,
    photos: Sequence[str],
    num_images: int,
    distortion: str = "noise",
    image_size: int = 32,
    seed: int = 0,
    split: str | None = None,
) -> Path:
    """Write ``num_images`` distorted crops of the scikit-image ``photos`` to ``directory``, with
    ``manifest.csv`` (image, mos = 5 - 4 level, group = photo); returns the manifest's path.

    Each image is a random square crop (15 to 50% of the photo's shorter side), resized to
    ``image_size`` (antialiased), then distorted. Deterministic given ``seed``.
    """
    if distortion not in DISTORTIONS:
        raise ValueError(f"distortion must be one of {DISTORTIONS}, got {distortion!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sources = {name: load_sample_photo(name) for name in photos}
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_images):
        name = photos[rng.integers(len(photos))]
        photo = sources[name]
        height, width = photo.shape[-2:]
        side = int(min(height, width) * rng.uniform(0.15, 0.5))
        top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
        crop = photo[None, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        level = float(rng.uniform())
        image = distort(crop[0].clamp(0.0, 1.0), distortion, level, rng)
        path = directory / f"{index:05d}.png"
        array = (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(array).save(path)
        records.append(IQARecord(path=path, mos=5.0 - 4.0 * level, split=split, group=name))
    return write_manifest(records, directory / "manifest.csv")
