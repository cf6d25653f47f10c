"""The synthetic distortion types: 26 types in the families of KADID-10k, five levels each, several
implementations per type, split into implementations for training and held-out ones for evaluation.

Images are unit images: numpy float32 ``[H, W, 3]``, sRGB values in [0, 1] (see `image_ops`).
Apply a type with its level (1 = mildest .. 5 = strongest; fractional levels interpolate the
type's parameter linearly between the neighbouring levels)::

    rng = np.random.default_rng(0)
    blur = DISTORTION_TYPES["gaussian_blur"]
    distorted = blur(image, level=3, rng=rng)                    # one of the training implementations
    distorted = blur(image, level=3, rng=rng, split="held_out")  # one of the evaluation implementations

Each type has one physical parameter ("strength", e.g. the blur sigma in pixels) with a value per
level, read the same way by all of its implementations. The held-out implementations differ from
the training ones in library, kernel, colour space or codec (e.g. a Fourier-domain Gaussian on
linear light vs. scipy's and Pillow's sRGB-domain ones; an independent numpy JPEG encoder vs.
libjpeg), so an evaluation on them measures generalisation across implementations, not recall of
one implementation's artefacts. The result depends only on the image, level, implementation and
the state of ``rng``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import distortion_colour as colour
from . import distortion_compression as compression
from . import distortion_noise as noise
from . import distortion_sharpness as sharpness
from . import distortion_spatial as spatial
from . import distortion_tone as tone

Implementation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
LEVELS = (1, 2, 3, 4, 5)
SPLITS = ("train", "held_out")
# Smallest side an image may have: the block-based implementations need a few blocks per side.
MIN_SIDE = 32


@dataclass(frozen=True)
class DistortionType:
    """One distortion type.

    Attributes:
        name: identifier, e.g. ``"gaussian_blur"``.
        family: KADID-10k-style family: blur, noise, compression, colour, brightness, spatial, sharpness.
        strength_meaning: what the strength parameter is, with its unit.
        level_strengths: the strength at levels 1..5 (five values, increasingly severe).
        train_implementations: implementations used to make training data.
        held_out_implementations: implementations used only for evaluation.
    """

    name: str
    family: str
    strength_meaning: str
    level_strengths: tuple[float, float, float, float, float]
    train_implementations: tuple[Implementation, ...]
    held_out_implementations: tuple[Implementation, ...]

    def strength(self, level: float) -> float:
        """The strength at ``level`` in [1, 5], linear between the neighbouring integer levels."""
        if not LEVELS[0] <= level <= LEVELS[-1]:
            raise ValueError(f"{self.name}: level must be within [1, 5], got {level}")
        return float(np.interp(level, LEVELS, self.level_strengths))

    def implementations(self, split: str) -> dict[str, Implementation]:
        """``{name: function}`` of the ``split`` (``"train"`` or ``"held_out"``) implementations."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        functions = self.train_implementations if split == "train" else self.held_out_implementations
        return {function.__name__: function for function in functions}

    def choose_implementation(self, rng: np.random.Generator, split: str = "train") -> str:
        """The name of one ``split`` implementation, drawn uniformly with ``rng``."""
        names = sorted(self.implementations(split))
        return names[int(rng.integers(len(names)))]

    def __call__(
        self,
        image: np.ndarray,
        level: float,
        rng: np.random.Generator,
        implementation: str | None = None,
        split: str = "train",
    ) -> np.ndarray:
        """Distort a unit image (float32 ``[H, W, 3]`` in [0, 1], both sides >= `MIN_SIDE`).

        ``implementation`` names one of this type's implementations (of either split); without it
        one of the ``split`` implementations is drawn with ``rng``. Returns a new float32
        ``[H, W, 3]`` array in [0, 1].
        """
        _check_unit_image(image)
        if implementation is None:
            implementation = self.choose_implementation(rng, split)
        functions = {**self.implementations("train"), **self.implementations("held_out")}
        if implementation not in functions:
            raise ValueError(f"{self.name} has no implementation {implementation!r}; it has {sorted(functions)}")
        return functions[implementation](image, self.strength(level), rng)


def _check_unit_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.float32:
        raise TypeError(f"expected a float32 numpy array, got {type(image).__name__} {getattr(image, 'dtype', '')}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"expected an [H, W, 3] image with H, W >= {MIN_SIDE}, got shape {image.shape}")


_TYPES = (
    DistortionType(
        "gaussian_blur",
        "blur",
        "Gaussian sigma, pixels",
        (0.6, 1.0, 1.6, 2.5, 4.0),
        (sharpness.gaussian_blur_scipy, sharpness.gaussian_blur_pil),
        (sharpness.gaussian_blur_fft_linear_light,),
    ),
    DistortionType(
        "lens_blur",
        "blur",
        "aperture (circum)radius, pixels",
        (1.0, 1.8, 2.8, 4.2, 6.5),
        (sharpness.lens_blur_disk, sharpness.lens_blur_hexagon_linear_light),
        (sharpness.lens_blur_octagon_torch_linear_light,),
    ),
    DistortionType(
        "motion_blur",
        "blur",
        "motion path length, pixels",
        (2.0, 4.0, 7.0, 11.0, 17.0),
        (sharpness.motion_blur_linear_kernel, sharpness.motion_blur_camera_shake),
        (sharpness.motion_blur_shifted_copies_pil,),
    ),
    DistortionType(
        "white_noise",
        "noise",
        "noise std, sRGB units (at mid grey for the sensor model)",
        (0.015, 0.03, 0.05, 0.08, 0.12),
        (noise.white_noise_rgb, noise.white_noise_luminance),
        (noise.white_noise_sensor_poisson_gaussian,),
    ),
    DistortionType(
        "chroma_noise",
        "noise",
        "noise std, Cb/Cr units (CIELAB noise scaled to match)",
        (0.015, 0.03, 0.05, 0.08, 0.12),
        (noise.chroma_noise_ycbcr, noise.chroma_noise_lab),
        (noise.chroma_noise_blotchy_bt709,),
    ),
    DistortionType(
        "impulse_noise",
        "noise",
        "fraction of pixels hit",
        (0.003, 0.01, 0.025, 0.05, 0.1),
        (noise.impulse_noise_salt_pepper_pixel, noise.impulse_noise_salt_pepper_channel),
        (noise.impulse_noise_random_valued_torch,),
    ),
    DistortionType(
        "multiplicative_noise",
        "noise",
        "std of the multiplicative factor (mean 1)",
        (0.04, 0.08, 0.14, 0.22, 0.32),
        (noise.multiplicative_noise_gaussian, noise.multiplicative_noise_gamma),
        (noise.multiplicative_noise_lognormal_torch,),
    ),
    DistortionType(
        "jpeg",
        "compression",
        "IJG quality, 1..100",
        (50.0, 30.0, 18.0, 9.0, 4.0),
        (compression.jpeg_pil_420, compression.jpeg_pil_444),
        (compression.jpeg_numpy_baseline,),
    ),
    DistortionType(
        "jpeg2000",
        "compression",
        "compression ratio of the coded payload against 24 bits per pixel",
        (20.0, 40.0, 80.0, 160.0, 320.0),
        (compression.jpeg2000_openjpeg_97, compression.jpeg2000_numpy_wavelet),
        (compression.jpeg2000_openjpeg_53,),
    ),
    DistortionType(
        "webp",
        "compression",
        "WebP quality, 0..100 (AVIF at the same file size when held out)",
        (40.0, 20.0, 10.0, 4.0, 0.0),
        (compression.webp_pil_method4, compression.webp_pil_method0),
        (compression.avif_same_size_as_webp,),
    ),
    DistortionType(
        "desaturation",
        "colour",
        "saturation factor (< 1)",
        (0.7, 0.5, 0.32, 0.16, 0.0),
        (colour.saturation_hsv, colour.saturation_lab_chroma),
        (colour.saturation_pil_enhance,),
    ),
    DistortionType(
        "oversaturation",
        "colour",
        "saturation factor (> 1)",
        (1.4, 1.8, 2.3, 2.9, 3.6),
        (colour.saturation_hsv, colour.saturation_lab_chroma),
        (colour.saturation_pil_enhance,),
    ),
    DistortionType(
        "color_shift",
        "colour",
        "red/blue misregistration, pixels",
        (1.0, 2.0, 3.0, 5.0, 8.0),
        (colour.channel_shift_bilinear, colour.channel_shift_lateral_aberration),
        (colour.channel_shift_fourier,),
    ),
    DistortionType(
        "color_quantization",
        "colour",
        "palette size, colours",
        (64.0, 32.0, 16.0, 8.0, 4.0),
        (colour.palette_pil_median_cut, colour.palette_pil_octree),
        (colour.palette_kmeans_lab,),
    ),
    DistortionType(
        "brighten",
        "brightness",
        "tone-curve exponent (< 1)",
        (0.8, 0.66, 0.52, 0.4, 0.3),
        (tone.tone_curve_srgb, tone.tone_curve_lab_lightness),
        (tone.exposure_gain_linear_light,),
    ),
    DistortionType(
        "darken",
        "brightness",
        "tone-curve exponent (> 1)",
        (1.25, 1.55, 1.95, 2.5, 3.2),
        (tone.tone_curve_srgb, tone.tone_curve_lab_lightness),
        (tone.exposure_gain_linear_light,),
    ),
    DistortionType(
        "contrast_reduction",
        "brightness",
        "contrast factor (< 1)",
        (0.75, 0.58, 0.43, 0.3, 0.18),
        (tone.contrast_about_mean_colour, tone.contrast_lab_lightness),
        (tone.contrast_haze_linear_light,),
    ),
    DistortionType(
        "contrast_increase",
        "brightness",
        "contrast factor (> 1)",
        (1.3, 1.6, 2.0, 2.5, 3.2),
        (tone.contrast_about_mean_colour, tone.contrast_s_curve),
        (tone.contrast_pil_enhance,),
    ),
    DistortionType(
        "uneven_illumination",
        "brightness",
        "fraction of light lost where darkest",
        (0.25, 0.4, 0.55, 0.7, 0.85),
        (tone.vignette_cos4_linear_light, tone.illumination_gradient_srgb),
        (tone.illumination_shadow_field_linear_light,),
    ),
    DistortionType(
        "posterization",
        "brightness",
        "bits per channel",
        (5.0, 4.0, 3.0, 2.0, 1.0),
        (tone.posterise_uniform_rounding, tone.posterise_pil_bits),
        (tone.posterise_linear_light,),
    ),
    DistortionType(
        "pixelate",
        "spatial",
        "block side, pixels",
        (2.0, 3.0, 4.0, 6.0, 9.0),
        (spatial.pixelate_pil_nearest, spatial.pixelate_block_mean),
        (spatial.pixelate_torch_area_offset,),
    ),
    DistortionType(
        "resampling",
        "spatial",
        # Not integers: an integer factor lines the nearest-neighbour grid up with the pixels, which
        # makes it milder than the factors around it.
        "downscale factor",
        (1.5, 2.2, 3.2, 4.5, 6.5),
        (spatial.resample_pil_bicubic, spatial.resample_pil_nearest_bilinear),
        (spatial.resample_skimage_spline,),
    ),
    DistortionType(
        "jitter",
        "spatial",
        "displacement std, pixels",
        (0.5, 1.0, 1.6, 2.5, 4.0),
        (spatial.jitter_pixels_nearest, spatial.jitter_smooth_field_bilinear),
        (spatial.jitter_pixels_torch_grid_sample,),
    ),
    DistortionType(
        "patch_displacement",
        "spatial",
        "displaced fraction of the image area",
        (0.03, 0.075, 0.15, 0.3, 0.6),
        (spatial.patches_copy_nearby, spatial.patches_swap_nearby, spatial.patches_copy_nearby_soft_rectangles),
        (spatial.patches_copy_nearby_discs,),
    ),
    DistortionType(
        "color_block",
        "spatial",
        "fraction of the image area covered by blocks",
        (0.015, 0.03, 0.05, 0.085, 0.14),
        (spatial.colour_blocks_squares, spatial.colour_blocks_rectangles),
        (spatial.colour_blocks_ellipses_pil,),
    ),
    DistortionType(
        "oversharpen",
        "sharpness",
        "unsharp-mask amount",
        (0.8, 1.6, 2.6, 4.0, 6.0),
        (sharpness.sharpen_unsharp_mask_scipy, sharpness.sharpen_unsharp_mask_pil),
        (sharpness.sharpen_laplacian_torch,),
    ),
)

DISTORTION_TYPES: dict[str, DistortionType] = {distortion.name: distortion for distortion in _TYPES}
