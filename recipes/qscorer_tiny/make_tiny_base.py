"""Write the random base model that the default model `qscorer-tiny` is trained from.

A small Qwen2.5-VL-architecture ``Qwen2_5_VLForConditionalGeneration`` with random weights (seeded)
and the byte-level tokenizer of `qscorer_reward.testing`, saved as a transformers model folder that
a training config names as its ``base_model``::

    python -m recipes.qscorer_tiny.make_tiny_base --output runs/qscorer-tiny/base

The default shape (`TINY_SHAPE`) is the one ``qscorer_tiny.yaml`` is tuned for (README.md);
``reproduce`` writes it when the run starts.

The vision patch embedding starts as a whitened 2-D DCT filter bank (`init_patch_embedding_dct_`)
instead of random weights: a random projection of a 14 x 14 patch sees mostly its low-frequency
content, so noise, blur and compression artefacts, which live in the high frequencies, stay
invisible to the first layers for thousands of steps. The filters are trained like every other
weight; only their starting point is fixed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

# Language model: hidden size, decoder layers. Vision tower: width, blocks, heads, the blocks with
# full (not windowed) attention and the attention window in pixels. Patches of 14 px, merged 2 x 2.
# At 224 px a vision block sees only 256 patches, so all blocks attend fully (the windowed path
# splits the batch into many small attention calls, slower on CPU).
TINY_SHAPE = dict(
    hidden_size=192,
    num_layers=4,
    vision_width=96,
    vision_depth=4,
    vision_heads=4,
    fullatt_block_indexes=[0, 1, 2, 3],
    window_size=112,
)


def tiny_base_config(
    hidden_size: int,
    num_layers: int,
    vision_width: int,
    vision_depth: int,
    vision_heads: int,
    fullatt_block_indexes: list[int],
    window_size: int,
):
    """The transformers ``Qwen2_5_VLConfig`` of the tiny base and its tokenizer."""
    from qscorer_reward.testing import tiny_backbone_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = tiny_backbone_config(
        "qwen2_5_vl",
        vocab_size=len(tokenizer) + 2,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vision_width=vision_width,
    )
    vision = config.vision_config
    vision.depth = vision_depth
    vision.num_heads = vision_heads
    vision.fullatt_block_indexes = list(fullatt_block_indexes)
    vision.window_size = window_size
    return config, tokenizer


# Luma DCT frequencies (cycles per 2 patches along each axis) of the first filters, and the
# colour-opponent ones: 8 x 8 luma + 2 x 4 x 4 chroma = 96 filters, the default vision width.
LUMA_FREQUENCIES = (0, 1, 2, 3, 5, 7, 10, 13)
CHROMA_FREQUENCIES = (0, 1, 2, 3)


def dct_basis(size: int) -> torch.Tensor:
    """The orthonormal DCT-II basis, float64 ``[size, size]``: row ``u`` is frequency ``u``."""
    x = torch.arange(size, dtype=torch.float64)
    u = torch.arange(size, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (2 * x + 1) * u / (2 * size)) * math.sqrt(2 / size)
    basis[0] /= math.sqrt(2)
    return basis


@torch.no_grad()
def init_patch_embedding_dct_(weight: torch.Tensor) -> None:
    """Set a vision patch embedding ``[out, 3, T, P, P]`` (a Conv3d's weight) to a DCT filter bank.

    Filter ``i`` is a 2-D DCT basis function on luma ((R + G + B) / sqrt 3) at the frequencies of
    `LUMA_FREQUENCIES`, then on the opponent colours (R - G) / sqrt 2 and (R + G - 2B) / sqrt 6
    at `CHROMA_FREQUENCIES`, spread evenly over the T frames. Each is scaled by
    ``1 + |frequency|``, which whitens the ~1/f amplitude spectrum of natural images, so that after
    the blocks' RMS normalisation the high-frequency coefficients (where noise, blur and blocking
    show) weigh as much as the content. Filters beyond the bank (``out`` > 96) keep their values.
    """
    out_channels, channels, frames, size, _ = weight.shape
    if channels != 3:
        raise ValueError(f"expected an RGB patch embedding, got {channels} input channels")
    basis = dct_basis(size)
    luma = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3)
    red_green = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    yellow_blue = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64) / math.sqrt(6)
    filters = [(luma, u, v) for u in LUMA_FREQUENCIES for v in LUMA_FREQUENCIES if max(u, v) < size]
    filters += [(c, u, v) for c in (red_green, yellow_blue) for u in CHROMA_FREQUENCIES for v in CHROMA_FREQUENCIES]
    for index, (colour, u, v) in enumerate(filters[:out_channels]):
        spatial = torch.outer(basis[u], basis[v]) * (1 + math.hypot(u, v))
        kernel = colour[:, None, None, None] * spatial / math.sqrt(frames)  # [3, 1, P, P]
        weight[index] = kernel.expand(channels, frames, size, size).to(weight.dtype)


def write_tiny_base(output: str | Path, seed: int = 0, **shape) -> Path:
    """Save the random base of ``shape`` (default `TINY_SHAPE`), initialised from ``seed``, to ``output``."""
    from transformers import AutoModelForImageTextToText

    config, tokenizer = tiny_base_config(**{**TINY_SHAPE, **shape})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    init_patch_embedding_dct_(model.model.visual.patch_embed.proj.weight)
    output = Path(output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder to write the base model to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args()
    path = write_tiny_base(args.output, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
