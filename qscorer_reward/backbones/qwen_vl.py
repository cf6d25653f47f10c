"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (the transformers-native classes) as a Q-Scorer backbone.

Pixels reach the vision tower the way the Qwen-VL image processors prepare them: each image is
resized (bicubic, antialiased) so both sides are multiples of ``patch * merge`` and its pixel count
lies in the budget, normalised, duplicated along time to the temporal patch size and cut into
flat patches; ``image_grid_thw`` records each image's patch grid. Here this runs in torch on the
model's device, so the score is differentiable with respect to the pixels.

The token sequence of sample i, right-padded to the longest in the batch::

    prompt prefix | <vision_start> <image_pad> x n_i <vision_end> | prompt suffix | <score1..K>

with multimodal rotary positions (temporal, height, width) computed here on the host from the
known grids, the same values the model's ``get_rope_index`` derives, without its per-sample
device round trips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qscorer_reward.config import QScorerConfig
from qscorer_reward.preprocessing import normalize, resize_antialiased

from .base import Backbone, BackboneInputs

MAX_ASPECT_RATIO = 200  # the Qwen-VL processors refuse anything more elongated


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as those allow (the Qwen-VL processors' rule)."""
    target_h = round(height / factor) * factor
    target_w = round(width / factor) * factor
    if target_h * target_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        target_h = max(factor, math.floor(height / scale / factor) * factor)
        target_w = max(factor, math.floor(width / scale / factor) * factor)
    elif target_h * target_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        target_h = math.ceil(height * scale / factor) * factor
        target_w = math.ceil(width * scale / factor) * factor
    return target_h, target_w


def patchify(pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N * (H/p) * (W/p), C * T * p * p]`` in the Qwen-VL patch order.

    Patches are ordered by merge window (row-major over windows, then row-major inside a window),
    each flattened as (channel, time, row, column) with the single frame repeated ``T`` times.
    """
    n, channels, height, width = pixels.shape
    p, m = patch_size, merge_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(n, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> (n, windows_h, windows_w, m_h, m_w, C, p_h, p_w)
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches.unsqueeze(6).expand(*patches.shape[:6], temporal_patch_size, p, p)
    return patches.reshape(n * grid_h * grid_w, channels * temporal_patch_size * p * p)


class PatchProjection(nn.Conv3d):
    """The Qwen-VL patch embedding's projection: a ``Conv3d`` whose kernel is one whole patch, so
    on its input ``[patches, in_channels, temporal_patch_size, patch_size, patch_size]`` it is a
    matrix product, computed as one (output ``[patches, embed_dim, 1, 1, 1]``). Same parameters
    and, up to float rounding, the same result as the convolution, at less than half its cost for
    forward and backward on CPU. Inputs of other shapes go through the convolution.
    """

    @staticmethod
    def can_replace(convolution: nn.Module) -> bool:
        """Whether ``convolution`` is a plain ``Conv3d`` that, on one-patch inputs, is a matrix
        product: stride = kernel, no padding, no dilation, one group."""
        return (
            type(convolution) is nn.Conv3d
            and convolution.stride == convolution.kernel_size
            and convolution.padding == (0, 0, 0)
            and convolution.dilation == (1, 1, 1)
            and convolution.groups == 1
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[2:]) != tuple(self.kernel_size):
            return super().forward(patches)
        return F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None, None]


class QwenVLBackbone(Backbone):
    """Qwen-VL models as a Q-Scorer backbone.

    A vision tower set to transformers' ``"sdpa"`` attention is switched to `PACKED_SDPA`, the same
    attention with the images' (or windows') segments batched into a few calls instead of one
    call per segment; other attention implementations are left as they are. The patch embedding
    projection runs as the matrix product it is (`PatchProjection`).
    """

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

    def __init__(self, model: nn.Module, config: QScorerConfig, tokenizer):
        super().__init__(model, config, tokenizer)
        # Imported here, not with the package: registering the attention loads transformers'
        # modeling code, seconds that `import qscorer_reward` alone should not cost.
        from .vision_attention import PACKED_SDPA

        vision_config = model.model.visual.config
        if vision_config._attn_implementation == "sdpa":
            vision_config._attn_implementation = PACKED_SDPA
        projection = model.model.visual.patch_embed.proj
        if PatchProjection.can_replace(projection):
            projection.__class__ = PatchProjection  # same module, same state dict; faster forward

    def prepare(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> BackboneInputs:
        cfg = self.config
        factor = cfg.resize_factor
        sizes = [tuple(image.shape[-2:]) for image in pixels]
        for index, (height, width) in enumerate(sizes):
            if min(height, width) < self.min_image_side:
                raise ValueError(
                    f"images[{index}] is {height}x{width}; this backbone needs both sides >= "
                    f"{self.min_image_side} px (one vision patch). Upsample it yourself if a score of "
                    "such a small image is really wanted."
                )
            if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
                raise ValueError(
                    f"images[{index}] is {height}x{width}; aspect ratios above {MAX_ASPECT_RATIO} are not supported"
                )
        targets = [smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels) for h, w in sizes]

        # Resize, normalise and patchify each group of equal input and target size in one call.
        groups: dict[tuple, list[int]] = {}
        for index, key in enumerate(zip(sizes, targets)):
            groups.setdefault(key, []).append(index)
        if len(groups) == 1:
            # The common case (one batched tensor in a reward loop): no regrouping copies.
            batch = pixels if isinstance(pixels, torch.Tensor) else torch.stack(list(pixels))
            pixel_values = self._patches(batch, *targets[0])
        else:
            patches_per_image: list[torch.Tensor] = [None] * len(sizes)
            for (_, (target_h, target_w)), indices in groups.items():
                patches = self._patches(torch.stack([pixels[i] for i in indices]), target_h, target_w)
                for i, chunk in zip(indices, patches.chunk(len(indices))):
                    patches_per_image[i] = chunk
            pixel_values = torch.cat(patches_per_image)

        grids = [(1, h // cfg.patch_size, w // cfg.patch_size) for h, w in targets]
        input_ids, attention_mask, position_ids, score_positions = self._token_layout(grids)
        device = pixel_values.device
        dtype = self.model.get_input_embeddings().weight.dtype
        return BackboneInputs(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            score_positions=score_positions.to(device),
            model_inputs={
                "pixel_values": pixel_values.to(dtype),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=device),
                "position_ids": position_ids.to(device),
            },
        )

    def _patches(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels in [0, 1] -> ``[N * patches, patch_dim]`` normalised patches."""
        cfg = self.config
        pixels = normalize(resize_antialiased(pixels, height, width), cfg.image_mean, cfg.image_std)
        return patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)

    def _token_layout(self, grids: list[tuple[int, int, int]]):
        """Token ids, padding mask, rotary positions ``[3, B, L]`` and score positions, on the host."""
        model_config = self.model.config
        merge = self.config.merge_size
        score_ids = self.config.score_token_ids
        prefix = [*self.prefix_ids, model_config.vision_start_token_id]
        suffix = [model_config.vision_end_token_id, *self.suffix_ids, *score_ids]
        rows = []
        for _, grid_h, grid_w in grids:
            llm_h, llm_w = grid_h // merge, grid_w // merge
            ids = torch.tensor(prefix + [model_config.image_token_id] * (llm_h * llm_w) + suffix, dtype=torch.long)
            # Text before the image counts up from 0; the image tokens take (t, row, column)
            # offsets from the next position; text after it resumes past the image's extent.
            text_before = torch.arange(len(prefix)).expand(3, -1)
            start = len(prefix)
            rows_idx, cols_idx = torch.meshgrid(torch.arange(llm_h), torch.arange(llm_w), indexing="ij")
            image_pos = torch.stack(
                [torch.zeros(llm_h * llm_w, dtype=torch.long), rows_idx.reshape(-1), cols_idx.reshape(-1)]
            )
            resume = start + max(llm_h, llm_w)
            text_after = (resume + torch.arange(len(suffix))).expand(3, -1)
            positions = torch.cat([text_before, image_pos + start, text_after], dim=1)
            rows.append((ids, positions))

        lengths = [len(ids) for ids, _ in rows]
        longest = max(lengths)
        batch = len(rows)
        input_ids = torch.zeros(batch, longest, dtype=torch.long)
        position_ids = torch.zeros(3, batch, longest, dtype=torch.long)
        attention_mask = torch.zeros(batch, longest, dtype=torch.long)
        for b, (ids, positions) in enumerate(rows):
            input_ids[b, : len(ids)] = ids
            position_ids[:, b, : len(ids)] = positions
            attention_mask[b, : len(ids)] = 1
        score_positions = torch.tensor(lengths, dtype=torch.long) - len(score_ids) - 1
        padded = min(lengths) != longest
        return input_ids, attention_mask if padded else None, position_ids, score_positions

    def forward(self, inputs: BackboneInputs) -> torch.Tensor:
        outputs = self.model.model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            use_cache=False,
            **inputs.model_inputs,
        )
        return outputs.last_hidden_state

    def trainable_part(self, name: str) -> str | None:
        dotted = f".{name}"
        if ".visual." in dotted:
            # The merger (and Qwen3-VL's deepstack mergers) project the tower into the language model.
            return "merger" if "merger" in name else "vision_tower"
        if ".language_model." in dotted and "embed_tokens" not in name:
            return "language_model"
        return None

    def image_features(self, inputs: BackboneInputs):
        model_inputs = inputs.model_inputs
        return self.model.model.get_image_features(
            model_inputs["pixel_values"], image_grid_thw=model_inputs["image_grid_thw"]
        )
