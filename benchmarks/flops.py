"""FLOPs of one Q-Scorer scoring pass on a Qwen2.5-VL backbone, counted from the model config.

Counted as `torch.utils.flop_counter.FlopCounterMode` counts them (`count_flops` runs it, to check
these formulas against the real model): 2 FLOPs per multiply-add of the matrix products, that is
linear layers, the patch-embedding convolution and attention's two products (``Q K^T`` and the
attention-weighted sum of ``V``). Norms, activations, rotary embeddings and softmax are not
counted (well under 1% here). Attention counts every query-key pair of a segment, also for the
causal language model, where a kernel may skip the masked half (under 1% of the total at these
sequence lengths).

For one image whose resized grid is ``h x w`` patches (``N = h w``; ``N / 4`` tokens after the
2 x 2 merge) in a sequence of ``S`` tokens, with ``C`` the vision width, ``I_v`` its MLP width,
``D`` the text width, ``H_kv d`` the key/value width, ``I`` the text MLP width:

- vision tower: patch embedding ``2 N (3 T p^2) C``; per block ``2 N (3C) C`` (qkv) + ``2 N C C``
  (output projection) + ``3 * 2 N C I_v`` (gated MLP) + attention ``4 n^2 C`` summed over its
  segments of ``n`` patches (one segment of ``N`` in full-attention blocks; windows of up to
  ``(window_size / p)^2`` patches in the others); merger ``2 (N/4) (4C)^2 + 2 (N/4) (4C) D``.
- language model, per layer: ``2 S D D`` (q) + ``2 * 2 S D (H_kv d)`` (k, v) + ``2 S D D`` (o)
  + ``4 S^2 D`` (attention) + ``3 * 2 S D I`` (gated MLP). Q-Scorer reads the last hidden state,
  so there is no ``lm_head``.
- head: ``2 (D h_1 + h_1 h_2 + h_2)`` for hidden widths ``h_1, h_2``.

The backward pass to the input pixels (weights frozen) computes one input gradient per matrix
product, as many FLOPs as its forward, and attention's backward recomputes the scores and takes
four products: 2.5 times its forward. Model FLOPs of a scoring pass with gradients are forward plus
that backward; the recomputation under gradient checkpointing is not counted (the usual model
FLOPs utilisation convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ATTENTION_BACKWARD_FACTOR = 2.5
FAMILY = "qwen2_5_vl"


def window_sizes(grid_h: int, grid_w: int, merge_size: int, window_merged: int) -> list[int]:
    """Patches per attention window of one image in Qwen2.5-VL's window blocks.

    The merged grid (``grid / merge_size``) is tiled by windows of ``window_merged`` merged tokens
    a side from the top-left corner; windows on the bottom and right edges are cut short.
    """
    merged_h, merged_w = grid_h // merge_size, grid_w // merge_size
    rows = [min(window_merged, merged_h - start) for start in range(0, merged_h, window_merged)]
    columns = [min(window_merged, merged_w - start) for start in range(0, merged_w, window_merged)]
    return [r * c * merge_size**2 for r in rows for c in columns]


def vision_tower_flops(vision_config, grid_h: int, grid_w: int) -> dict[str, int]:
    """Forward FLOPs of the Qwen2.5-VL vision tower on one image of ``grid_h x grid_w`` patches."""
    cfg = vision_config
    patches = grid_h * grid_w
    width = cfg.hidden_size
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    full_blocks = len(cfg.fullatt_block_indexes)
    window_blocks = cfg.depth - full_blocks
    windows = window_sizes(
        grid_h, grid_w, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    )
    merged_tokens = patches // cfg.spatial_merge_size**2
    merged_width = width * cfg.spatial_merge_size**2
    return {
        "patch_embedding": 2 * patches * patch_dim * width,
        "attention_projections": cfg.depth * (2 * patches * 3 * width * width + 2 * patches * width * width),
        "attention_full_blocks": full_blocks * 4 * patches**2 * width,
        "attention_window_blocks": window_blocks * sum(4 * size**2 * width for size in windows),
        "mlp": cfg.depth * 3 * 2 * patches * width * cfg.intermediate_size,
        "merger": 2 * merged_tokens * merged_width * merged_width
        + 2 * merged_tokens * merged_width * cfg.out_hidden_size,
    }


def language_model_flops(text_config, sequence_length: int) -> dict[str, int]:
    """Forward FLOPs of the Qwen2.5-VL text decoder on one sequence of ``sequence_length`` tokens."""
    cfg = text_config
    tokens, width = sequence_length, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or width // cfg.num_attention_heads
    query_width, key_value_width = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    projections = 2 * tokens * width * query_width + 2 * 2 * tokens * width * key_value_width
    projections += 2 * tokens * query_width * width
    return {
        "attention_projections": cfg.num_hidden_layers * projections,
        "attention": cfg.num_hidden_layers * 4 * tokens**2 * query_width,
        "mlp": cfg.num_hidden_layers * 3 * 2 * tokens * width * cfg.intermediate_size,
    }


def head_flops(hidden_size: int, head_hidden_sizes: list[int]) -> int:
    """Forward FLOPs of the score head on one hidden state."""
    widths = [hidden_size, *head_hidden_sizes, 1]
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def scoring_flops(scorer, image_height: int, image_width: int) -> dict:
    """Forward FLOPs per image of ``scorer`` (a Q-Scorer on a Qwen2.5-VL backbone) on images
    resized to ``image_height x image_width``, by part, plus the totals of a forward pass and of
    a pass with gradients to the input (forward + backward).

    Returns ``{"vision_tower": {...}, "language_model": {...}, "head": int, "forward": int,
    "forward_and_backward_to_input": int, "sequence_length": int}``.
    """
    model_config = scorer.backbone.model.config
    if model_config.model_type != FAMILY:
        raise ValueError(f"FLOPs are counted for {FAMILY} backbones, not {model_config.model_type}")
    patch = scorer.config.patch_size
    grid_h, grid_w = image_height // patch, image_width // patch
    sequence_length = scorer.backbone.prepare(torch.zeros(1, 3, image_height, image_width)).input_ids.shape[1]
    vision = vision_tower_flops(model_config.vision_config, grid_h, grid_w)
    language = language_model_flops(model_config.text_config, sequence_length)
    head = head_flops(scorer.backbone.hidden_size, scorer.head.hidden_sizes)
    forward = sum(vision.values()) + sum(language.values()) + head
    attention = vision["attention_full_blocks"] + vision["attention_window_blocks"] + language["attention"]
    backward = forward - attention + ATTENTION_BACKWARD_FACTOR * attention
    return {
        "vision_tower": vision,
        "language_model": language,
        "head": head,
        "sequence_length": sequence_length,
        "forward": forward,
        "forward_and_backward_to_input": int(forward + backward),
    }


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs that `torch.utils.flop_counter.FlopCounterMode` counts while ``call()`` runs, with
    formulas added for the CPU flash-attention operators (which it does not know)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_attention(query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
        },
    )
    with counter:
        call()
    return counter.get_total_flops()


def flops_per_second(flops: float, milliseconds: float) -> float:
    """TFLOP/s of ``flops`` done in ``milliseconds``."""
    return flops / (milliseconds * 1e-3) / 1e12 if milliseconds > 0 else math.nan
