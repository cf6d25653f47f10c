"""Pristine content for the synthetic IQA data: crops of scikit-image photos and procedurally
generated natural-statistics images. Everything is deterministic given the ``rng`` passed in.

Photos (``skimage.data``, bundled with scikit-image, no download) are split by name:

- `TRAIN_PHOTOS`: used for training data only.
- `HELD_OUT_PHOTOS`: used for the evaluation set only. ``motorcycle_left`` is the left view of
  ``stereo_motorcycle``; its right view shows the same scene and is used nowhere.

``cat`` is the same picture as ``chelsea`` and is therefore not listed separately. The synthetic
test images of ``skimage.data`` (logo, colorwheel, checkerboard, binary_blobs, horse,
shepp_logan_phantom) and the tiny ones (lfw_subset, microaneurysms) are not photos and are not used;
neither are scikit-learn's or matplotlib's sample images. Grey photos are colourised (a random colour
map of their lightness plus a smooth chroma field) so that colour distortions act on them too.

Procedural content: `dead_leaves` (occluding discs with power-law radii, giving the 1/f^2 power
spectrum and the edge and flat-region statistics of natural images) and `spectral_texture`
(1/f^beta noise in lightness with smooth colour).

Images are unit images: numpy float32 ``[H, W, 3]``, sRGB values in [0, 1], quantised to 8 bits
(so a pristine image is exactly what a uint8 PNG of it holds).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw
from skimage import color, data

from .image_ops import from_uint8, lab_to_unit_rgb, luma, to_uint8

TRAIN_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "text",
)
HELD_OUT_PHOTOS = ("coffee", "motorcycle_left", "rocket")

# How training content is drawn: mostly photos, with procedural images for content diversity.
TRAIN_CONTENT_WEIGHTS = {"photo": 0.6, "dead_leaves": 0.28, "spectral_texture": 0.12}
# Crops whose luma std is below this are nearly flat (sky, black borders of retina or hubble): most
# distortions would not show on them, so they are drawn again.
MIN_CROP_LUMA_STD = 0.04
_MAX_CROP_ATTEMPTS = 20


@functools.cache
def _load_photo(name: str) -> np.ndarray:
    """The photo as stored: uint8 ``[H, W]`` (grey) or ``[H, W, 3]``; cached (callers must not modify it)."""
    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    if name not in TRAIN_PHOTOS + HELD_OUT_PHOTOS:
        raise ValueError(f"unknown photo {name!r}; train photos: {TRAIN_PHOTOS}, held-out: {HELD_OUT_PHOTOS}")
    photo = getattr(data, name)()
    return photo[..., :3] if photo.ndim == 3 else photo


def photo_size(name: str) -> tuple[int, int]:
    """(height, width) of a photo."""
    return _load_photo(name).shape[:2]


def photo_crop(name: str, size: int, rng: np.random.Generator, max_downscale: float = 2.5) -> np.ndarray:
    """A random ``size`` x ``size`` crop of a photo as a unit image.

    A square of side between ``size`` and ``size * max_downscale`` (log-uniform, limited by the
    photo) is cut at a random place, resized to ``size`` with Lanczos filtering (never enlarged:
    enlarging would blur) and flipped left-right half the time; nearly flat crops are redrawn (up to
    20 times). Grey photos are colourised (`colourise`). Raises `ValueError` if the photo is
    smaller than ``size``.
    """
    photo = _load_photo(name)
    height, width = photo.shape[:2]
    if min(height, width) < size:
        raise ValueError(f"photo {name!r} is {height}x{width}, smaller than the crop size {size}")
    largest = min(height, width, int(size * max_downscale))
    for _ in range(_MAX_CROP_ATTEMPTS):
        side = int(round(math.exp(rng.uniform(math.log(size), math.log(largest)))))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        if side != size:
            crop = crop.resize((size, size), Image.LANCZOS)
        crop = from_uint8(np.asarray(crop))
        if rng.random() < 0.5:
            crop = crop[:, ::-1].copy()
        if luma(crop).std() >= MIN_CROP_LUMA_STD:
            break
    return colourise(crop, rng) if photo.ndim == 2 else crop


def colourise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey square unit image given colour: its lightness kept, CIELAB a*/b* a random colour map of
    the lightness plus a smooth random field.

    The colour map (a* and b* linear between random colours at 5 evenly spaced lightnesses: a mean
    tint within +-15 plus per-knot colours of std 8..25) ties colour to structure, as in photos,
    where objects differ in colour and colour edges follow lightness edges; the field (1/f^4 noise,
    std 3..12) adds slow colour variation across the frame.
    """
    lab = color.rgb2lab(image)
    knots = np.linspace(0.0, 100.0, 5)
    for channel in (1, 2):
        knot_colours = rng.uniform(-15, 15) + rng.normal(0, rng.uniform(8, 25), size=knots.size)
        field = rng.uniform(3, 12) * _power_law_noise(image.shape[0], 4.0, rng)
        lab[..., channel] = np.interp(lab[..., 0], knots, knot_colours) + field
    return quantise(lab_to_unit_rgb(lab))


def quantise(image: np.ndarray) -> np.ndarray:
    """A unit image rounded to 8-bit levels (still float32)."""
    return from_uint8(to_uint8(image))


def dead_leaves(size: int, rng: np.random.Generator, supersample: int = 2) -> np.ndarray:
    """A dead-leaves image ``[size, size, 3]``: opaque discs with power-law radii (density ~ r^-3,
    from 1 pixel to half the image) stacked until at most ~0.1% of the canvas shows the background,
    each disc a random colour around a random palette with a soft linear shading, over a faint 1/f
    texture. Drawn ``supersample`` times larger and box-reduced, so edges are anti-aliased."""
    canvas_size = size * supersample
    smallest, largest = 1.0 * supersample, canvas_size / 2
    # Mean disc area pi E[r^2] for this density; exp(-7) of the canvas stays uncovered after
    # 7 * area / (pi E[r^2]) discs.
    mean_squared_radius = math.log(largest / smallest) / (0.5 * (smallest**-2 - largest**-2))
    count = int(math.ceil(7 * canvas_size**2 / (math.pi * mean_squared_radius)))
    # Inverse-CDF draw from density ~ r^-3 on [smallest, largest].
    radius = (smallest**-2 - rng.random(count) * (smallest**-2 - largest**-2)) ** -0.5
    centre_y, centre_x = rng.uniform(-radius, canvas_size + radius), rng.uniform(-radius, canvas_size + radius)
    # Disc 0 is the background; disc i > 0 is drawn over discs < i.
    labels = Image.new("I", (canvas_size, canvas_size), 0)
    draw = ImageDraw.Draw(labels)
    for index in range(count):
        box = (centre_x[index] - radius[index], centre_y[index] - radius[index])
        draw.ellipse((*box, centre_x[index] + radius[index], centre_y[index] + radius[index]), fill=index + 1)
    labels = np.asarray(labels)

    discs = count + 1
    palette_lightness, palette_spread = rng.uniform(25, 65), rng.uniform(10, 30)
    lightness = np.clip(rng.normal(palette_lightness, palette_spread, discs), 5, 97)
    chroma = rng.uniform(-20, 20, size=2) + rng.normal(0, 18, size=(discs, 2))
    # Lightness change per pixel across each disc: up to ~8 units over its radius.
    shading = rng.normal(0, 8, size=(discs, 2)) / np.append(largest, radius)[:, None]
    centres = np.stack([np.append(canvas_size / 2, centre_y), np.append(canvas_size / 2, centre_x)], axis=-1)
    y, x = np.mgrid[0:canvas_size, 0:canvas_size]
    lab = np.empty((canvas_size, canvas_size, 3))
    lab[..., 0] = (
        lightness[labels]
        + shading[labels, 0] * (y - centres[labels, 0])
        + shading[labels, 1] * (x - centres[labels, 1])
        + rng.uniform(0, 6) * _power_law_noise(canvas_size, 2.0, rng)
    )
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    lab[..., 1:] = chroma[labels]
    image = lab_to_unit_rgb(lab)
    return quantise(image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3)))


def spectral_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[size, size, 3]`` texture: lightness is 1/f^beta noise (power spectrum exponent beta in
    1.6..2.6, natural images sit near 2), colour a smoother random field, mean and contrast random."""
    lab = np.empty((size, size, 3), dtype=np.float64)
    lightness = _power_law_noise(size, rng.uniform(1.6, 2.6), rng)
    lab[..., 0] = np.clip(rng.uniform(35, 65) + rng.uniform(8, 22) * lightness, 0, 100)
    for channel in (1, 2):
        lab[..., channel] = rng.uniform(-20, 20) + rng.uniform(3, 20) * _power_law_noise(size, 3.0, rng)
    return quantise(lab_to_unit_rgb(lab))


def _power_law_noise(size: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise ``[size, size]`` with power spectrum ~ 1/f^beta, zero mean, unit std."""
    frequency = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    frequency[0, 0] = 1.0
    spectrum = (rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)) * frequency ** (-beta / 2)
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=(size, size))
    return noise / max(noise.std(), 1e-12)


def training_content(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One pristine training image ``[size, size, 3]`` and its source: ``"photo:<name>"`` for a crop
    of one of the `TRAIN_PHOTOS` large enough for ``size``, else ``"dead_leaves"`` or
    ``"spectral_texture"``, drawn with `TRAIN_CONTENT_WEIGHTS`."""
    kinds = list(TRAIN_CONTENT_WEIGHTS)
    weights = np.array([TRAIN_CONTENT_WEIGHTS[kind] for kind in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == "photo":
        usable = [name for name in TRAIN_PHOTOS if min(photo_size(name)) >= size]
        if usable:
            name = usable[int(rng.integers(len(usable)))]
            return photo_crop(name, size, rng), f"photo:{name}"
        kind = "dead_leaves"
    generator = dead_leaves if kind == "dead_leaves" else spectral_texture
    return generator(size, rng), kind
