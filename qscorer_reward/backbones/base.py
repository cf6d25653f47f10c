"""The interface every backbone family implements (one file per family beside this one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import QScorerConfig


@dataclass
class BackboneInputs:
    """One batch, ready for a single forward pass of the backbone.

    Attributes:
        input_ids: ``[B, L]`` int64, right-padded token sequences (prompt, image tokens, answer
            prefix, K score tokens).
        attention_mask: ``[B, L]`` int64 (1 = real token), or ``None`` when nothing is padded.
        score_positions: ``[B]`` int64, the position whose hidden state predicts the first score
            token (the last token of the answer prefix); the K score tokens follow it.
        model_inputs: the family's other forward arguments (pixel values, grids, position ids).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    score_positions: torch.Tensor
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class Backbone(nn.Module, ABC):
    """A Hugging Face vision-language model seen as ``images -> last hidden states``.

    Subclasses set `model_types` (the transformers ``config.model_type`` values they handle) and
    implement `prepare` and `forward`; everything else (score tokens, head, checkpoints) is shared.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, config: QScorerConfig, prompt_ids: tuple[list[int], list[int]]):
        """``model``: the transformers ``*ForConditionalGeneration`` model; ``prompt_ids``: the token
        ids of the prompt template before and after its ``{image}`` placeholder."""
        super().__init__()
        self.model = model
        self.config = config
        self.prefix_ids, self.suffix_ids = prompt_ids

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def min_image_side(self) -> int:
        """Smallest image side (pixels) accepted; smaller images are refused, not upsampled."""
        return self.config.patch_size

    @property
    def decode_pixel_budget(self) -> int:
        """Images read from files or given as PIL images are reduced to about this many pixels
        right after decoding (`qscorer_reward.preprocessing.open_image`), which bounds the memory
        of each image: 4x the config's ``max_pixels``, so that `prepare`'s own antialiased resize
        still makes the last step down to the budget (at least 2x per side)."""
        return 4 * self.config.max_pixels

    @abstractmethod
    def prepare(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> BackboneInputs:
        """Build the batch from float RGB pixels in [0, 1] (``[B, 3, H, W]`` or a list of
        ``[3, H, W]``), differentiably with respect to the pixels."""

    @abstractmethod
    def forward(self, inputs: BackboneInputs) -> torch.Tensor:
        """Last-layer hidden states after the final norm, ``[B, L, hidden_size]``."""
