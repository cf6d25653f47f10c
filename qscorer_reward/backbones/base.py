"""The interface every backbone family implements (one file per family beside this one)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from qscorer_reward.config import QScorerConfig
from qscorer_reward.preprocessing import ImageInput, to_unit_pixels


@dataclass
class BackboneInputs:
    """One batch, ready for a single forward pass of the backbone.

    Attributes:
        input_ids: ``[B, L]`` int64, right-padded token sequences (prompt, image tokens, answer
            prefix, K score tokens).
        attention_mask: ``[B, L]`` int64 (1 = real token), or ``None`` when nothing is padded.
        score_positions: ``[B]`` int64, the position whose hidden state predicts the first score
            token (the last token of the answer prefix); the K score tokens follow it. (A family
            that scores at a token it generates, as mPLUG-Owl2 does, points at that token's row of
            what `Backbone.forward` returns.)
        model_inputs: the family's other forward arguments (pixel values, grids, position ids).
        answer_positions: training batches only (`Backbone.prepare_training`): ``[B, A]`` int64,
            the positions whose hidden states predict the A tokens that follow the prompt in the
            teacher-forced sequence (the score tokens, and whatever else the family's answer holds).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    score_positions: torch.Tensor
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    answer_positions: torch.Tensor | None = None


class Backbone(nn.Module, ABC):
    """A Hugging Face vision-language model seen as ``images -> last hidden states``.

    Subclasses set `model_types` (the transformers ``config.model_type`` values they handle) and
    implement `prepare`, `forward` and `trainable_part`; everything else (score tokens, head,
    checkpoints) is shared. A family whose reference tokenizes or decodes differently overrides
    `prompt_ids` or `to_pixels`; one whose training sequence is not its scoring sequence overrides
    `prepare_training` and `forward_training`.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, config: QScorerConfig, tokenizer):
        """``model``: the transformers ``*ForConditionalGeneration`` model; ``tokenizer``: its
        tokenizer with the score tokens (the prompt template's ids are taken with `prompt_ids`)."""
        super().__init__()
        self.model = model
        self.config = config
        self.prefix_ids, self.suffix_ids = self.prompt_ids(tokenizer, config.prompt_template)

    @classmethod
    def prompt_ids(cls, tokenizer, template: str) -> tuple[list[int], list[int]]:
        """The token ids of ``template`` before and after its ``{image}`` placeholder."""
        prefix, suffix = template.split("{image}")
        return (
            tokenizer(prefix, add_special_tokens=False)["input_ids"],
            tokenizer(suffix, add_special_tokens=False)["input_ids"],
        )

    def to_pixels(
        self,
        images: ImageInput,
        input_range: tuple[float, float],
        device: torch.device | str | None,
        max_image_pixels: int,
    ) -> torch.Tensor | list[torch.Tensor]:
        """What users pass as images -> what `prepare` takes: float RGB pixels in [0, 1] on
        ``device`` (see `qscorer_reward.preprocessing.to_unit_pixels`), files and PIL images reduced
        to `decode_pixel_budget` right after decoding."""
        return to_unit_pixels(images, input_range, device, max_image_pixels, self.decode_pixel_budget)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def min_image_side(self) -> int:
        """Smallest image side (pixels) accepted; smaller images are refused, not upsampled."""
        return self.config.patch_size

    @property
    def decode_pixel_budget(self) -> int | None:
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

    @abstractmethod
    def trainable_part(self, name: str) -> str | None:
        """The part of ``self.model`` that the parameter or module ``name`` (as ``self.model``
        names it) belongs to, for training parts whole: ``"vision_tower"``, ``"merger"`` (what
        projects the vision output into the language model), ``"language_model"`` (its decoder
        layers and final norm), or ``None`` (token embeddings, output layer, anything else)."""

    @abstractmethod
    def image_features(self, inputs: BackboneInputs):
        """Run the vision side alone on a prepared batch, as the full forward runs it, and return
        its output as the family's model returns it (for training aids that watch the tower)."""

    # ------------------------------------------------------------------ training

    def prepare_training(
        self, pixels: torch.Tensor | Sequence[torch.Tensor], score_levels: torch.Tensor | None
    ) -> BackboneInputs:
        """The teacher-forced training batch: the prompt and the answer after it, with
        ``answer_positions`` set and ``score_positions`` where the training loss reads the head.

        ``score_levels``: ``[B]`` int64 in ``0..K-1``, the score token each sample's answer names,
        for a family whose answer names one of the K (mPLUG-Owl2, as the paper trains it; may be
        ``None`` for the others). Here, where the scoring sequence already ends with all K score
        tokens, it is the scoring batch (the levels are not used): the cross-entropy covers the K
        tokens after the prompt.
        """
        inputs = self.prepare(pixels)
        offsets = torch.arange(self.config.num_score_tokens, device=inputs.score_positions.device)
        inputs.answer_positions = inputs.score_positions[:, None] + offsets
        return inputs

    def forward_training(self, inputs: BackboneInputs) -> torch.Tensor:
        """Hidden states ``[B, L, hidden_size]`` of a `prepare_training` batch in one
        teacher-forced pass; here the scoring forward, which is one already."""
        return self(inputs)
