"""Compression implementations: JPEG, JPEG 2000 and WebP-class intra codecs.

Every function maps ``(image, strength, rng) -> image`` on unit images (float32 ``[H, W, 3]``, sRGB
in [0, 1], see `image_ops`); ``strength`` is read the same way by all implementations of a type.
Besides the Pillow codecs there are two independent numpy encoders, a baseline JPEG and a wavelet
codec, so the artefacts of one library are not the only ones a model sees or is judged on.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from scipy import fft

from .image_ops import from_pil, from_uint8, rgb_to_ycbcr, to_pil, to_uint8, ycbcr_to_rgb


def _pil_round_trip(image: np.ndarray, image_format: str, **options) -> tuple[np.ndarray, int]:
    """Encode with Pillow and decode again: (decoded unit image, encoded size in bytes)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, image_format, **options)
    size = buffer.tell()
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return from_pil(decoded), size


# ---------------------------------------------------------------- JPEG (strength: IJG quality 1..100)

# The example quantisation tables of the JPEG standard (ITU-T T.81, Annex K), which the IJG quality
# scale multiplies.
_ANNEX_K_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
_ANNEX_K_CHROMINANCE = np.full((8, 8), 99.0)
_ANNEX_K_CHROMINANCE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def ijg_quantisation_table(base_table: np.ndarray, quality: float) -> np.ndarray:
    """``base_table`` [8, 8] scaled by the IJG quality formula (quality 1..100), entries in 1..255."""
    quality = int(np.clip(round(quality), 1, 100))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base_table * scale + 50) / 100), 1, 255)


def jpeg_pil_420(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """libjpeg through Pillow, 4:2:0 chroma subsampling (the common camera and web setting)."""
    return _pil_round_trip(image, "JPEG", quality=int(round(quality)), subsampling=2)[0]


def jpeg_pil_444(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """libjpeg through Pillow, no chroma subsampling."""
    return _pil_round_trip(image, "JPEG", quality=int(round(quality)), subsampling=0)[0]


def jpeg_numpy_baseline(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """An independent baseline JPEG in numpy: JFIF YCbCr, 2x2 box-averaged chroma, 8x8 DCT quantised
    with the Annex K tables at IJG quality, chroma upsampled by pixel replication (libjpeg
    interpolates instead), decoded to 8 bits."""
    ycbcr = rgb_to_ycbcr(image) * 255.0
    height, width = image.shape[:2]
    luma = _dct_quantise(ycbcr[..., 0], ijg_quantisation_table(_ANNEX_K_LUMINANCE, quality))
    chroma_table = ijg_quantisation_table(_ANNEX_K_CHROMINANCE, quality)
    chroma = []
    for channel in (1, 2):
        plane = np.pad(ycbcr[..., channel], ((0, height % 2), (0, width % 2)), mode="edge")
        half = plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).mean(axis=(1, 3))
        decoded = _dct_quantise(half, chroma_table)
        chroma.append(decoded.repeat(2, axis=0).repeat(2, axis=1)[:height, :width])
    decoded = np.stack([luma, *chroma], axis=-1) / 255.0
    return from_uint8(to_uint8(ycbcr_to_rgb(decoded.astype(np.float32))))


def _dct_quantise(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """A plane of 0..255 values [H, W] through 8x8 DCT, quantisation by ``table`` and inverse DCT."""
    height, width = plane.shape
    padded = np.pad(plane, ((0, -height % 8), (0, -width % 8)), mode="edge") - 128.0
    rows, cols = padded.shape[0] // 8, padded.shape[1] // 8
    blocks = padded.reshape(rows, 8, cols, 8).transpose(0, 2, 1, 3)
    # The orthonormal 2-D DCT-II on 8x8 blocks is exactly the JPEG forward DCT.
    coefficients = fft.dctn(blocks, type=2, norm="ortho", axes=(2, 3))
    quantised = np.round(coefficients / table) * table
    decoded = fft.idctn(quantised, type=2, norm="ortho", axes=(2, 3)).transpose(0, 2, 1, 3)
    return decoded.reshape(rows * 8, cols * 8)[:height, :width] + 128.0


# ---------------------------------------------------------------- JPEG 2000 (strength: compression ratio of the
# coded payload against 24 bits per pixel)


# The smallest codestream OpenJPEG writes for a three-component 8-bit image (main header and empty
# packets; measured 160..185 bytes at 64..448 pixels a side). The compression ratio is applied to
# the bytes beyond it, so that a level means the same at every image size.
_OPENJPEG_OVERHEAD_BYTES = 180


def _openjpeg_options(image: np.ndarray, payload_ratio: float) -> dict:
    """Pillow JPEG 2000 options: a raw codestream whose size is the payload at ``payload_ratio`` plus
    the fixed overhead, and as many resolution levels as the image allows (at most 6)."""
    raw_bytes = 3 * image.shape[0] * image.shape[1]
    return dict(
        quality_mode="rates",
        quality_layers=[raw_bytes / (raw_bytes / payload_ratio + _OPENJPEG_OVERHEAD_BYTES)],
        no_jp2=True,
        # Every resolution level must keep at least one pixel per side.
        num_resolutions=max(1, min(6, int(math.log2(min(image.shape[:2]))) - 1)),
    )


def jpeg2000_openjpeg_97(image: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """OpenJPEG through Pillow: irreversible CDF 9/7 wavelet, rate set by the compression ratio."""
    return _pil_round_trip(image, "JPEG2000", irreversible=True, **_openjpeg_options(image, ratio))[0]


def jpeg2000_openjpeg_53(image: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """OpenJPEG through Pillow: LeGall 5/3 wavelet truncated to the rate of the compression ratio,
    with 32x32 code blocks instead of the default 64x64."""
    options = _openjpeg_options(image, ratio)
    return _pil_round_trip(image, "JPEG2000", irreversible=False, codeblock_size=(32, 32), **options)[0]


# At one compression ratio, OpenJPEG (through Pillow) reaches the PSNR that this codec reaches when
# its zeroth-order entropy estimate is about 60% of OpenJPEG's payload (measured on crops of five
# skimage photos, 64 and 224 pixels a side, ratios 20..320: mean PSNR within 2 dB). Scaling the
# budget by this factor makes a level about equally severe in both implementations.
_BUDGET_FRACTION_MATCHING_OPENJPEG = 0.6


def jpeg2000_numpy_wavelet(image: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """An independent wavelet codec in numpy: YCbCr, LeGall 5/3 lifting wavelet over up to 5 levels,
    dead-zone scalar quantisation with one step size (weighted by each subband's synthesis gain)
    chosen by bisection so the estimated coded size meets the compression ratio."""
    height, width = image.shape[:2]
    levels = max(1, min(5, int(math.log2(min(height, width))) - 3))
    block = 2**levels
    padded = np.pad(rgb_to_ycbcr(image), ((0, -height % block), (0, -width % block), (0, 0)), mode="symmetric")
    subbands = [band for channel in range(3) for band in _dwt_53(padded[..., channel].astype(np.float64), levels)]
    budget_bits = _BUDGET_FRACTION_MATCHING_OPENJPEG * 24.0 * height * width / ratio

    def estimated_bits(step: float) -> float:
        return sum(_entropy_bits(_dead_zone_quantise(values, step / gain)) for values, gain in subbands)

    # Bisection on the log step size; 16 halvings of this range pin the step to within 0.1%.
    low, high = math.log(1e-4), math.log(4.0)
    for _ in range(16):
        middle = (low + high) / 2
        if estimated_bits(math.exp(middle)) > budget_bits:
            low = middle
        else:
            high = middle
    step = math.exp(high)
    decoded = [
        _dead_zone_reconstruct(_dead_zone_quantise(values, step / gain), step / gain) for values, gain in subbands
    ]
    bands_per_channel = 3 * levels + 1
    channels = [
        _idwt_53(decoded[channel * bands_per_channel : (channel + 1) * bands_per_channel], levels)
        for channel in range(3)
    ]
    return ycbcr_to_rgb(np.stack(channels, axis=-1)[:height, :width].astype(np.float32))


def _lift_53(signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One LeGall 5/3 analysis step along axis 0 (even length) with symmetric extension:
    (low-pass [N/2, ...], high-pass [N/2, ...])."""
    even, odd = signal[0::2], signal[1::2]
    next_even = np.concatenate([even[1:], even[-1:]])
    high = odd - 0.5 * (even + next_even)
    previous_high = np.concatenate([high[:1], high[:-1]])
    return even + 0.25 * (previous_high + high), high


def _unlift_53(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Inverse of `_lift_53`."""
    previous_high = np.concatenate([high[:1], high[:-1]])
    even = low - 0.25 * (previous_high + high)
    next_even = np.concatenate([even[1:], even[-1:]])
    signal = np.empty((2 * len(low),) + low.shape[1:], dtype=low.dtype)
    signal[0::2], signal[1::2] = even, high + 0.5 * (even + next_even)
    return signal


# Squared norms of the 5/3 synthesis filters, low-pass (1/2, 1, 1/2) and high-pass
# (-1/8, -1/4, 3/4, -1/4, -1/8): how much a unit error in a coefficient costs in pixels.
_SYNTHESIS_ENERGY_LOW = 1.5
_SYNTHESIS_ENERGY_HIGH = 0.71875


def _dwt_53(plane: np.ndarray, levels: int) -> list[tuple[np.ndarray, float]]:
    """2-D 5/3 wavelet of ``plane`` [H, W] (sides divisible by 2**levels): subbands as
    (coefficients, synthesis gain), finest level first, per level the bands that are low-pass
    vertically and high-pass horizontally, the reverse, and high-pass both ways; the low-pass band last."""
    subbands = []
    low_band = plane
    for level in range(levels):
        vertical_low, vertical_high = _lift_53(low_band)
        ll, lh = (band.T for band in _lift_53(vertical_low.T))
        hl, hh = (band.T for band in _lift_53(vertical_high.T))
        # Gains multiply over the two axes and over the coarser levels each band has gone through.
        coarse = _SYNTHESIS_ENERGY_LOW ** (2 * level)
        subbands += [
            (lh, math.sqrt(coarse * _SYNTHESIS_ENERGY_LOW * _SYNTHESIS_ENERGY_HIGH)),
            (hl, math.sqrt(coarse * _SYNTHESIS_ENERGY_HIGH * _SYNTHESIS_ENERGY_LOW)),
            (hh, math.sqrt(coarse * _SYNTHESIS_ENERGY_HIGH**2)),
        ]
        low_band = ll
    subbands.append((low_band, math.sqrt(_SYNTHESIS_ENERGY_LOW ** (2 * levels))))
    return subbands


def _idwt_53(bands: list[np.ndarray], levels: int) -> np.ndarray:
    """Inverse of `_dwt_53` from the bands alone (same order)."""
    low_band = bands[-1]
    for level in reversed(range(levels)):
        lh, hl, hh = bands[3 * level : 3 * level + 3]
        vertical_low = _unlift_53(low_band.T, lh.T).T
        vertical_high = _unlift_53(hl.T, hh.T).T
        low_band = _unlift_53(vertical_low, vertical_high)
    return low_band


def _dead_zone_quantise(values: np.ndarray, step: float) -> np.ndarray:
    return (np.sign(values) * np.floor(np.abs(values) / step)).astype(np.int64)


def _dead_zone_reconstruct(indices: np.ndarray, step: float) -> np.ndarray:
    # Mid-point reconstruction of non-zero bins; the zero bin (twice as wide) decodes to 0.
    return np.sign(indices) * (np.abs(indices) + 0.5) * step


def _entropy_bits(indices: np.ndarray) -> float:
    """Zeroth-order entropy of the quantisation indices times their count (an estimate of coded bits)."""
    counts = np.bincount((indices - indices.min()).ravel())
    counts = counts[counts > 0]
    probabilities = counts / indices.size
    return float(-(counts * np.log2(probabilities)).sum())


# ---------------------------------------------------------------- WebP-class intra codecs (strength: WebP quality)


def webp_pil_method4(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """libwebp (VP8 intra) lossy through Pillow, default encoder effort."""
    return _pil_round_trip(image, "WEBP", quality=int(round(quality)), method=4)[0]


def webp_pil_method0(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """libwebp with the fastest encoder effort, whose mode decisions and filtering differ."""
    return _pil_round_trip(image, "WEBP", quality=int(round(quality)), method=0)[0]


def avif_same_size_as_webp(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """AV1 intra (AVIF through Pillow) at the highest AVIF quality whose file is no larger than WebP's
    at ``quality``: another codec family's artefacts at the same bit budget."""
    webp_size = _pil_round_trip(image, "WEBP", quality=int(round(quality)), method=4)[1]
    low, high = 0, 100
    best = _pil_round_trip(image, "AVIF", quality=low, speed=8)[0]
    while low < high:
        middle = (low + high + 1) // 2
        decoded, size = _pil_round_trip(image, "AVIF", quality=middle, speed=8)
        if size <= webp_size:
            low, best = middle, decoded
        else:
            high = middle - 1
    return best
