"""Quality labels for synthetic distortions: a 1..5 MOS from the distortion level and a
full-reference fidelity between the pristine and the distorted image.

The level alone ranks versions of one type but says nothing across types (is level-3 JPEG worse
than level-3 desaturation?); a full-reference measure alone is blind to how objectionable a change
is. The label averages the two::

    fidelity = max(0, SSIM(luma_ref, luma_dist)) * exp(-mean_dE / 30)
    mos      = 1 + 4 * (0.5 * (1 - level / 5) + 0.5 * fidelity)

``SSIM`` is the structural similarity of BT.601 luma (Gaussian window, sigma 1.5, data range 1; Wang
et al.'s settings), which sees structure: blur, noise, blocking, displacement. ``mean_dE`` is the mean
CIELAB colour difference (CIE76, D65) per pixel, which sees what SSIM of luma misses: colour and
global tone changes. Their product is 1 for identical images and falls towards 0. The level is
0 for a pristine image (so pristine scores 5) and 1..5, possibly fractional, for distorted ones. With
these weights the mean label of a type at level 1 is 3.9..4.5 and at level 5 1.2..2.2 (over
training content), about the spread of KADID-10k's DMOS; single images vary with their content.
"""

from __future__ import annotations

import numpy as np
from skimage import color
from skimage.metrics import structural_similarity

from .image_ops import luma

# Mean CIELAB difference at which the colour term is 1/e.
COLOUR_DIFFERENCE_SCALE = 30.0
# Share of the label taken by the level; the rest comes from the fidelity.
LEVEL_WEIGHT = 0.5
MAX_LEVEL = 5.0


def fidelity(reference: np.ndarray, distorted: np.ndarray) -> float:
    """Full-reference fidelity in [0, 1] (1 = identical) of two unit images (float32 ``[H, W, 3]``
    in [0, 1], same shape, sides >= 7 for the SSIM window)."""
    if reference.shape != distorted.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {distorted.shape}")
    structure = structural_similarity(
        luma(reference),
        luma(distorted),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    colour_difference = np.linalg.norm(color.rgb2lab(reference) - color.rgb2lab(distorted), axis=-1).mean()
    return float(max(0.0, structure) * np.exp(-colour_difference / COLOUR_DIFFERENCE_SCALE))


def mos_label(level: float, fidelity_value: float) -> float:
    """The 1..5 label (higher is better) of a distortion at ``level`` (0 = pristine .. 5) whose
    image has ``fidelity_value`` (from `fidelity`, in [0, 1]) against its pristine version."""
    if not 0.0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be within [0, {MAX_LEVEL}], got {level}")
    if not 0.0 <= fidelity_value <= 1.0:
        raise ValueError(f"fidelity must be within [0, 1], got {fidelity_value}")
    quality = LEVEL_WEIGHT * (1.0 - level / MAX_LEVEL) + (1.0 - LEVEL_WEIGHT) * fidelity_value
    return 1.0 + 4.0 * quality
