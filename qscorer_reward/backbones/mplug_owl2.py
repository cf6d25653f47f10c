"""mPLUG-Owl2 (LLaMA-2 with modality-adaptive attention) as the paper's Q-Scorer backbone.

The model, as released (``MAGAer13/mplug-owl2-llama2-7b`` and ``2kxx/Qscorer_lora_5_1``):

- a CLIP-style ViT and a visual abstractor (`mplug_owl2_vision`) that turn the image into
  ``Q + 1`` rows (64 + 1 for the 7B model), spliced into the prompt where ``<|image|>`` stands;
- LLaMA-2 whose key and value projections and both layer norms of every decoder layer have two
  experts (``multiway.0`` for text positions, ``multiway.1`` for image positions), while the query
  and output projections and the MLP are shared.

Parameter names are the released ones, so the weights load as they are (the score head, released
as ``deepmlp.*``, becomes this package's `qscorer_reward.head.ScoreHead`).

Scoring follows the paper's evaluation (two passes): pass 1 runs the prompt and picks the greedy
next token at its end; pass 2 feeds that token and the head reads the final hidden state at its
position. Pass 2 is one extra token on pass 1's key-value cache instead of a second full forward:
the same numbers (the prefix's states do not depend on what follows, attention being causal) at
the cost of one token, and the gradient reaches the pixels through the cache.

Training follows the paper's training: the prompt with the answer ``▁ <scoreN> . </s>`` after it,
in one teacher-forced pass, the head read at ``▁`` (`MplugOwl2Backbone.prepare_training`); that is
the position the two passes read once the model emits ``▁`` after the prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from qscorer_reward.config import QScorerConfig
from qscorer_reward.preprocessing import ImageInput, to_unit_pixels

from .base import Backbone, BackboneInputs
from .mplug_owl2_images import differentiable_pixels, reference_pixels
from .mplug_owl2_vision import (
    AbstractorAttention,
    AbstractorConfig,
    VisionEmbeddings,
    VisionTower,
    VisionTowerConfig,
    VisualAbstractor,
    merge_heads,
    read_config,
    split_heads,
)

# The paper's evaluation prompt (conversation template "mplug_owl2", no system prompt).
MPLUG_OWL2_PROMPT_TEMPLATE = (
    "USER: How would you rate the quality of this image?\n{image} ASSISTANT: The quality of the image is"
)
# Stands for the image rows in token sequences, as in the reference code; never embedded.
IMAGE_TOKEN_INDEX = -200
SENTENCEPIECE_SPACE = "▁"
# The paper's training answer is "The quality of the image is <scoreN>." and the turn ends with
# the end-of-sequence token: after the prompt's "is" come `▁ <scoreN> . </s>`.
ANSWER_END = "."

# One (key, value) pair per decoder layer, each ``[B, kv_heads, T, head_dim]`` after RoPE.
KeyValueCache = list[tuple[torch.Tensor, torch.Tensor]]


class MplugOwl2Config(PreTrainedConfig):
    """The released ``config.json`` (model type ``mplug_owl2``): LLaMA-2 fields plus ``visual_config``
    with the ``visual_model`` (ViT) and ``visual_abstractor`` entries. Defaults: the 7B model."""

    model_type = "mplug_owl2"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    visual_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.visual_config is None:
            self.visual_config = {"visual_model": {}, "visual_abstractor": {}}
        super().__post_init__(**kwargs)
        if self.hidden_act != "silu" or self.attention_bias or self.tie_word_embeddings:
            raise ValueError(
                "mPLUG-Owl2 configs have hidden_act 'silu', no attention bias and untied embeddings; got "
                f"{self.hidden_act!r}, attention_bias={self.attention_bias}, "
                f"tie_word_embeddings={self.tie_word_embeddings}"
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"only plain RoPE (rope_scaling null) is supported, got rope type {rope_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def vision(self) -> VisionTowerConfig:
        return read_config(VisionTowerConfig, self.visual_config.get("visual_model"))

    @property
    def abstractor(self) -> AbstractorConfig:
        return read_config(AbstractorConfig, self.visual_config.get("visual_abstractor"))


# ---------------------------------------------------------------------------------------- language model


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, computed in float32 (or float64 for float64 input)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        wide = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(hidden.dtype)


class Multiway(nn.Module):
    """Two experts of the same shape: ``multiway[0]`` on text positions, ``multiway[1]`` on the image rows.

    ``image_span``: ``(start, end)`` of the image rows, the same in every sequence of the batch, or
    ``None`` when there are none.
    """

    def __init__(self, text: nn.Module, image: nn.Module):
        super().__init__()
        self.multiway = nn.ModuleList([text, image])

    def forward(self, hidden: torch.Tensor, image_span: tuple[int, int] | None) -> torch.Tensor:
        text, image = self.multiway
        if image_span is None:
            return text(hidden)
        start, end = image_span
        return torch.cat([text(hidden[:, :start]), image(hidden[:, start:end]), text(hidden[:, end:])], dim=1)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[T, head_dim]`` for ``positions`` ``[T]``, computed in float32 as HF LLaMA does
    (halves duplicated, not interleaved), then cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, heads, T, d]`` rotated by the tables ``[T, d]``."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with RoPE, text/image experts for keys and values, SDPA."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        width, head_dim = config.hidden_size, config.head_dim
        kv_width = self.num_kv_heads * head_dim

        def kv_expert() -> nn.Linear:
            return nn.Linear(width, kv_width, bias=False)

        self.q_proj = nn.Linear(width, self.num_heads * head_dim, bias=False)
        self.k_proj = Multiway(kv_expert(), kv_expert())
        self.v_proj = Multiway(kv_expert(), kv_expert())
        self.o_proj = nn.Linear(self.num_heads * head_dim, width, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        image_span: tuple[int, int] | None,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the attention output ``[B, T, H]`` and the keys and values including the past ones."""
        query = apply_rotary(split_heads(self.q_proj(hidden), self.num_heads), cos, sin)
        key = apply_rotary(split_heads(self.k_proj(hidden, image_span), self.num_kv_heads), cos, sin)
        value = split_heads(self.v_proj(hidden, image_span), self.num_kv_heads)
        if past_key is not None:
            key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
        repeats = self.num_heads // self.num_kv_heads
        new, total = query.shape[2], key.shape[2]
        mask = None
        if 1 < new < total:  # new tokens after cached ones: causal among themselves, all of the cache
            mask = torch.ones(new, total, dtype=torch.bool, device=query.device).tril(total - new)
        attended = F.scaled_dot_product_attention(
            query,
            key.repeat_interleave(repeats, dim=1) if repeats > 1 else key,
            value.repeat_interleave(repeats, dim=1) if repeats > 1 else value,
            attn_mask=mask,
            is_causal=new == total and new > 1,
        )
        return self.o_proj(merge_heads(attended)), key, value


class Mlp(nn.Module):
    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        norm = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = Mlp(config)
        self.input_layernorm = Multiway(RMSNorm(*norm), RMSNorm(*norm))
        self.post_attention_layernorm = Multiway(RMSNorm(*norm), RMSNorm(*norm))

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        image_span: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = self.input_layernorm(hidden, image_span)
        attended, key, value = self.self_attn(normed, cos, sin, image_span, past_key, past_value)
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden, image_span))
        return hidden, key, value


class MplugOwl2Model(nn.Module):
    """The language model with the vision tower and abstractor attached (``model.*`` in the state dict)."""

    def __init__(self, config: MplugOwl2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        vision = config.vision
        self.vision_model = VisionTower(vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, vision.num_tokens, config.hidden_size)

    def image_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels ``[B, 3, S, S]`` -> the rows spliced into the prompt, ``[B, Q + 1, H]``."""
        return self.visual_abstractor(self.vision_model(pixel_values))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        image_span: tuple[int, int] | None = None,
        cache: KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, KeyValueCache]:
        """Run the decoder over ``inputs_embeds`` ``[B, T, H]`` (after ``cache``'s tokens, if given).

        Returns the final hidden states after the last norm, ``[B, T, H]``, and the cache extended
        by these T tokens. ``image_span`` is where the image rows are within ``inputs_embeds``.
        """
        start = 0 if cache is None else cache[0][0].shape[2]
        positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        hidden, extended = inputs_embeds, []
        for index, layer in enumerate(self.layers):
            past = cache[index] if cache is not None else (None, None)
            hidden, key, value = layer(hidden, cos, sin, *past, image_span=image_span)
            extended.append((key, value))
        return self.norm(hidden), extended


class MplugOwl2ForCausalLM(PreTrainedModel):
    """mPLUG-Owl2: ``model`` (`MplugOwl2Model`) and the untied ``lm_head``.

    ``forward`` runs the language model over spliced input embeddings (see `MplugOwl2Model.forward`)
    and returns ``(hidden_states, cache)``; `MplugOwl2Backbone` builds those inputs and scores.
    """

    config_class = MplugOwl2Config
    base_model_prefix = "model"
    main_input_name = "inputs_embeds"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer", "VisionLayer", "AbstractorLayer"]

    def __init__(self, config: MplugOwl2Config):
        super().__init__(config)
        self.model = MplugOwl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, VisualAbstractor):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, AbstractorAttention):
            queries, keys = module.sincos_tables()
            init.copy_(module.q_pos_embed, queries)
            init.copy_(module.k_pos_embed, keys)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        image_span: tuple[int, int] | None = None,
        cache: KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, KeyValueCache]:
        return self.model(inputs_embeds, image_span, cache)


AutoConfig.register(MplugOwl2Config.model_type, MplugOwl2Config, exist_ok=True)
AutoModelForImageTextToText.register(MplugOwl2Config, MplugOwl2ForCausalLM, exist_ok=True)


# ---------------------------------------------------------------------------------------- backbone


@dataclass
class TwoPassOutput:
    """What `MplugOwl2Backbone.two_pass` computes for a batch of B prompts of length L.

    Attributes:
        hidden_states: ``[B, L + 1, H]``: pass 1's final hidden states, then the appended token's.
        greedy_tokens: ``[B]`` int64, pass 1's greedy next token (the one appended).
        greedy_logits: ``[B, vocab]``, pass 1's logits at its last position (no graph).
    """

    hidden_states: torch.Tensor
    greedy_tokens: torch.Tensor
    greedy_logits: torch.Tensor


class MplugOwl2Backbone(Backbone):
    """mPLUG-Owl2 as a Q-Scorer backbone, scoring as the paper's evaluation does.

    ``prepare`` lays out ``BOS prefix | image rows | suffix`` for every image (one length for all:
    every image becomes the same number of rows, so nothing is padded); ``forward`` runs the two
    passes and returns ``[B, L + 1, H]``, whose row ``L`` (``score_positions``) is the state of the
    greedy token pass 1 emits, the one the head reads.

    8-bit inputs (files, PIL images, uint8 arrays and tensors) are prepared exactly as the
    reference prepares them; float tensors take a differentiable torch path
    (`qscorer_reward.backbones.mplug_owl2_images`).
    """

    model_types = ("mplug_owl2",)

    def __init__(self, model: MplugOwl2ForCausalLM, config: QScorerConfig, tokenizer):
        super().__init__(model, config, tokenizer)
        self.image_size = model.config.vision.image_size
        self.num_image_rows = model.model.visual_abstractor.num_rows
        # What follows the prompt in a training sequence, around the score token (`prepare_training`).
        self.answer_ids = (
            tokenizer.convert_tokens_to_ids(SENTENCEPIECE_SPACE),
            tokenizer.convert_tokens_to_ids(ANSWER_END),
            tokenizer.eos_token_id,
        )

    @classmethod
    def prompt_ids(cls, tokenizer, template: str) -> tuple[list[int], list[int]]:
        """The reference's tokenization: BOS, then each side of ``{image}`` as SentencePiece encodes
        it on its own, with its dummy prefix: a side starting with a space gets a lone ``▁`` token
        first. (transformers' LLaMA tokenizer skips the dummy prefix before a leading space.)"""
        space_id = tokenizer.convert_tokens_to_ids(SENTENCEPIECE_SPACE)

        def encode(text: str) -> list[int]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return [space_id, *ids] if text.startswith(" ") else ids

        prefix, suffix = template.split("{image}")
        return [tokenizer.bos_token_id, *encode(prefix)], encode(suffix)

    @property
    def min_image_side(self) -> int:
        return 1  # any image is padded to a square and resized

    @property
    def decode_pixel_budget(self) -> None:
        """``None``: files and PIL images are decoded whole, never reduced first, so that their
        pixels are exactly the reference's (its PIL resize reads the whole padded image). Memory
        per image is then bounded by ``max_image_pixels`` only; each image is brought down to the
        model's square on its own before the batch is stacked."""
        return None

    def to_pixels(
        self,
        images: ImageInput,
        input_range: tuple[float, float],
        device: torch.device | str | None,
        max_image_pixels: int,
    ) -> torch.Tensor | list[torch.Tensor]:
        """As `Backbone.to_pixels`, except that 8-bit images stay uint8 ``[3, H, W]`` on the CPU,
        for the reference's PIL path."""
        pixels = to_unit_pixels(images, input_range, None, max_image_pixels, self.decode_pixel_budget)  # validates
        eight_bit = _eight_bit_flags(images)
        if isinstance(pixels, torch.Tensor):  # one batched tensor or array
            return _to_uint8(pixels) if eight_bit[0] else pixels.to(device)
        return [_to_uint8(p) if flag else p.to(device) for p, flag in zip(pixels, eight_bit)]

    def prepare(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> BackboneInputs:
        """``pixels``: float ``[B, 3, H, W]`` in [0, 1] or a list of ``[3, H, W]`` (float in [0, 1],
        or uint8 for the reference path)."""
        device = self.model.get_input_embeddings().weight.device
        dtype = self.model.get_input_embeddings().weight.dtype
        pixel_values = self._pixel_values(pixels, device, dtype)
        batch = pixel_values.shape[0]
        ids = self.prefix_ids + [IMAGE_TOKEN_INDEX] * self.num_image_rows + self.suffix_ids
        input_ids = torch.tensor(ids, dtype=torch.long, device=device).expand(batch, -1)
        return BackboneInputs(
            input_ids=input_ids,
            attention_mask=None,
            score_positions=torch.full((batch,), len(ids), dtype=torch.long, device=device),
            model_inputs={"pixel_values": pixel_values},
        )

    def _pixel_values(
        self, pixels: torch.Tensor | Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``[B, 3, S, S]`` CLIP-normalised pixel values of ``dtype`` on ``device``."""
        cfg, size = self.config, self.image_size
        if isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
            return differentiable_pixels(pixels.to(device), size, cfg.image_mean, cfg.image_std).to(dtype)
        prepared = []
        for image in pixels:
            if image.dtype == torch.uint8:
                values = reference_pixels(image, size, cfg.image_mean, cfg.image_std)
            else:
                values = differentiable_pixels(image[None].to(device), size, cfg.image_mean, cfg.image_std)[0]
            prepared.append(values.to(device=device, dtype=dtype))
        return torch.stack(prepared)

    def embed(self, input_ids: torch.Tensor, image_rows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Token embeddings with the image rows spliced in at their placeholders: ``[B, L, H]`` and
        the image rows' span."""
        start = len(self.prefix_ids)
        end = start + image_rows.shape[1]
        embed = self.model.get_input_embeddings()
        pieces = [embed(input_ids[:, :start]), image_rows.to(embed.weight.dtype), embed(input_ids[:, end:])]
        return torch.cat(pieces, dim=1), (start, end)

    def one_pass(self, inputs: BackboneInputs) -> tuple[torch.Tensor, KeyValueCache]:
        """The vision side and the language model over ``inputs.input_ids`` as they are: final
        hidden states ``[B, L, H]`` and the key-value cache."""
        causal_lm = self.model
        embeds, image_span = self.embed(inputs.input_ids, self.image_features(inputs))
        return causal_lm(embeds, image_span)

    def two_pass(self, inputs: BackboneInputs) -> TwoPassOutput:
        """Pass 1 over the prompt, its greedy token, then that token on pass 1's cache."""
        causal_lm = self.model
        hidden, cache = self.one_pass(inputs)
        with torch.no_grad():
            logits = causal_lm.lm_head(hidden[:, -1])
            tokens = logits.argmax(dim=-1)
        appended, _ = causal_lm(causal_lm.get_input_embeddings()(tokens)[:, None], None, cache)
        return TwoPassOutput(torch.cat([hidden, appended], dim=1), tokens, logits)

    def forward(self, inputs: BackboneInputs) -> torch.Tensor:
        return self.two_pass(inputs).hidden_states

    def image_features(self, inputs: BackboneInputs) -> torch.Tensor:
        """The image rows spliced into the prompt, ``[B, Q + 1, H]``."""
        return self.model.model.image_rows(inputs.model_inputs["pixel_values"])

    def trainable_part(self, name: str) -> str | None:
        if name.startswith("model.vision_model."):
            return "vision_tower"
        if name.startswith("model.visual_abstractor."):
            return "merger"  # the abstractor projects the tower's output into the language model
        if name.startswith(("model.layers.", "model.norm.")):
            return "language_model"
        return None

    # ------------------------------------------------------------------ training

    def prepare_training(
        self, pixels: torch.Tensor | Sequence[torch.Tensor], score_levels: torch.Tensor | None
    ) -> BackboneInputs:
        """The sequence the paper trains on: the prompt, then ``▁ <scoreN> . </s>`` (the answer
        "... the image is <scoreN>." and the end of the turn), N = ``score_levels + 1``.

        ``score_positions`` is the ``▁`` position, whose hidden state predicts the score token:
        where the paper's training loss reads the head. Scoring (`forward`) reads the position of
        the token pass 1 generates after the prompt instead; the two are the same position when
        that token is ``▁``, which the cross-entropy over this answer teaches (docs/training.md).
        """
        if score_levels is None:
            raise ValueError(
                "an mPLUG-Owl2 training sequence names the score token of each image's level: pass score_levels"
            )
        if None in self.answer_ids:
            raise ValueError(
                f"the tokenizer lacks one of {SENTENCEPIECE_SPACE!r}, {ANSWER_END!r} or an end-of-sequence token, "
                "which the training answer is made of"
            )
        inputs = self.prepare(pixels)
        batch, prompt_length = inputs.input_ids.shape
        device = inputs.input_ids.device
        score_ids = torch.tensor(self.config.score_token_ids, device=device)[score_levels.to(device)]
        space, end, eos = (torch.full((batch,), token, device=device) for token in self.answer_ids)
        answer = torch.stack([space, score_ids, end, eos], dim=1)
        inputs.input_ids = torch.cat([inputs.input_ids, answer], dim=1)
        inputs.score_positions = torch.full((batch,), prompt_length, dtype=torch.long, device=device)
        positions = prompt_length - 1 + torch.arange(answer.shape[1], device=device)
        inputs.answer_positions = positions.expand(batch, -1)
        return inputs

    def forward_training(self, inputs: BackboneInputs) -> torch.Tensor:
        """The whole teacher-forced sequence in one pass (no generated token)."""
        return self.one_pass(inputs)[0]


def _eight_bit_flags(images: ImageInput) -> list[bool]:
    """Per image, whether it comes as 8-bit data (a file, a PIL image, uint8 array or tensor)."""

    def is_eight_bit(item) -> bool:
        if isinstance(item, (str, os.PathLike, Image.Image)):
            return True
        return isinstance(item, (np.ndarray, torch.Tensor)) and item.dtype in (np.uint8, torch.uint8)

    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return [is_eight_bit(images)] * len(images)
    if isinstance(images, (torch.Tensor, np.ndarray, Image.Image, str, os.PathLike)):
        return [is_eight_bit(images)]
    return [is_eight_bit(item) for item in images]


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] that came from 8-bit data -> those 8-bit values (exact: ``x = u / 255``
    in float32 rounds back to ``u``), on the CPU."""
    return pixels.detach().cpu().mul(255).round_().to(torch.uint8)
