"""Local full-reference quality maps of distorted images against their pristine versions, in torch.

The training labels (`quality_labels`) judge a whole image by the SSIM of its luma and its mean
CIELAB difference. The same two measures taken per region give a dense target: where in the image
the structure was damaged and where the colour changed. A vision tower that has to predict them for
every token learns local artefact detectors (noise, blur, blocking at this place) rather than which
content its few training photos show, the lesson a single score per image leaves open.

    maps = local_fidelity_maps(pristine, distorted, region=28)   # [B, 2, H/28, W/28]
    maps[:, 0]   # mean SSIM of the luma over each region, clipped to [0, 1]
    maps[:, 1]   # exp(-mean CIE76 difference / 30) over each region, in (0, 1]

Both are 1 for identical images. SSIM follows `quality_labels.fidelity` (BT.601 luma, Gaussian
window of sigma 1.5 and radius 5, data range 1, population covariances, borders mirrored), pixel
for pixel as scikit-image's SSIM map.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .quality_labels import COLOUR_DIFFERENCE_SCALE

_BT601_LUMA = (0.299, 0.587, 0.114)
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # scikit-image's for sigma 1.5: int(3.5 * sigma + 0.5)
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2
# sRGB (D65) to CIE XYZ, and the D65 white point.
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def unit_rgb_to_lab(pixels: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) ``[B, 3, H, W]`` of unit sRGB pixels ``[B, 3, H, W]`` (float, in [0, 1]): L* in
    [0, 100], a* and b* about [-128, 127]; as `skimage.color.rgb2lab`."""
    linear = torch.where(pixels <= 0.04045, pixels / 12.92, ((pixels + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=pixels.dtype, device=pixels.device)
    white = torch.tensor(_D65_WHITE, dtype=pixels.dtype, device=pixels.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white[:, None, None]
    epsilon = (6 / 29) ** 3
    f = torch.where(xyz > epsilon, xyz.clamp_min(epsilon) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


@functools.lru_cache(maxsize=8)  # one per image side, dtype and device: built once, not per batch
def _gaussian_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[size, size]`` matrix ``G`` with ``G @ v`` the Gaussian filter (sigma 1.5, radius 5) of a
    length-``size`` signal ``v`` with its borders reflected (``size`` > 5)."""
    offsets = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * _SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    rows = torch.arange(size)
    for offset, weight in zip(range(-_SSIM_RADIUS, _SSIM_RADIUS + 1), kernel):
        columns = rows + offset
        # Mirrored about the border, edge pixel repeated (scipy.ndimage's "reflect", as scikit-image).
        columns = torch.where(columns < 0, -columns - 1, columns)
        columns = torch.where(columns >= size, 2 * size - 1 - columns, columns)
        matrix.index_put_((rows, columns), weight.expand(size), accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def _gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter (sigma 1.5, radius 5) of ``[..., H, W]``, borders reflected; as
    two matrix products, which on CPU cost a fraction of a one-channel convolution."""
    height, width = images.shape[-2:]
    rows = _gaussian_matrix(height, images.dtype, images.device)
    columns = rows if width == height else _gaussian_matrix(width, images.dtype, images.device)
    return rows @ images @ columns.T


def _luma(pixels: torch.Tensor) -> torch.Tensor:
    """BT.601 luma ``[B, H, W]`` of unit RGB ``[B, 3, H, W]``."""
    return torch.einsum("c,bchw->bhw", torch.tensor(_BT601_LUMA, dtype=pixels.dtype, device=pixels.device), pixels)


def _reference_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's part of SSIM: luma ``x``, its local mean and local mean of squares."""
    mean, mean_of_squares = _gaussian_blur(torch.stack([x, x * x])).unbind(0)
    return x, mean, mean_of_squares


def _ssim_from_reference_statistics(statistics, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM ``[B, H, W]`` of luma ``y`` against the reference of ``statistics``."""
    x, mu_x, xx = statistics
    mu_y, yy, xy = _gaussian_blur(torch.stack([y, y * y, x * y])).unbind(0)
    var_x, var_y, covariance = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _SSIM_C1) * (2 * covariance + _SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return numerator / denominator


@torch.no_grad()
def local_fidelity_maps(
    references: torch.Tensor,
    distorted: torch.Tensor,
    region: int,
    reference_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local structure and colour fidelity ``[B, 2, H // region, W // region]`` float32 in [0, 1].

    Args:
        references: the pristine images, unit RGB ``[R, 3, H, W]`` (any float dtype; computed in
            float32); ``H`` and ``W`` multiples of ``region``.
        distorted: the images judged, unit RGB ``[B, 3, H, W]`` (a pristine image against itself
            gives 1s).
        region: side in pixels of the square regions averaged over (28 for tokens of 14 px patches
            merged 2 x 2).
        reference_index: int64 ``[B]``, the row of ``references`` each image is compared with
            (default: row i for image i, ``R = B``). Images sharing a reference share its share
            of the work.

    Channel 0: the region's mean luma SSIM, clipped to [0, 1]; channel 1: exp(-the region's mean
    CIE76 difference / 30), the colour term of `quality_labels.fidelity`.
    """
    if references.dim() != 4 or references.shape[1] != 3 or references.shape[1:] != distorted.shape[1:]:
        raise ValueError(
            f"expected [R, 3, H, W] references and [B, 3, H, W] images, got {references.shape} and {distorted.shape}"
        )
    if reference_index is None:
        if len(references) != len(distorted):
            raise ValueError(f"{len(references)} references for {len(distorted)} images: give reference_index")
        reference_index = torch.arange(len(distorted), device=distorted.device)
    height, width = distorted.shape[-2:]
    if height % region or width % region:
        raise ValueError(f"image sides {height} x {width} are not multiples of the region side {region}")
    references, distorted = references.float(), distorted.float()
    x, mu_x, xx = _reference_statistics(_luma(references))
    statistics = (x[reference_index], mu_x[reference_index], xx[reference_index])
    structure = F.avg_pool2d(_ssim_from_reference_statistics(statistics, _luma(distorted)).unsqueeze(1), region)
    lab_difference = unit_rgb_to_lab(references)[reference_index] - unit_rgb_to_lab(distorted)
    # The sum of squares, not `Tensor.norm` over the channel axis, which is ten times slower on CPU.
    difference = (lab_difference**2).sum(1, keepdim=True).sqrt()
    colour = torch.exp(-F.avg_pool2d(difference, region) / COLOUR_DIFFERENCE_SCALE)
    return torch.cat([structure.clamp(0, 1), colour], dim=1)
