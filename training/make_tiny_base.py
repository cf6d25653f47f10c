"""Write the random base model that the default model `qscorer-tiny` is trained from.

A small Qwen2.5-VL-architecture ``Qwen2_5_VLForConditionalGeneration`` with random weights (seeded)
and the byte-level tokenizer of `qscorer_reward.testing`, saved as a transformers model folder that
a training config names as its ``base_model``::

    python -m qscorer_reward.training.make_tiny_base --output runs/qscorer-tiny/base

The default shape (`TINY_SHAPE`) is the one ``training/configs/qscorer_tiny.yaml`` is tuned for;
see ``docs/default_model.md``.
"""

from __future__ import annotations

import argparse
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


def write_tiny_base(output: str | Path, seed: int = 0, **shape) -> Path:
    """Save the random base of ``shape`` (default `TINY_SHAPE`), initialised from ``seed``, to ``output``."""
    from transformers import AutoModelForImageTextToText

    config, tokenizer = tiny_base_config(**{**TINY_SHAPE, **shape})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
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
