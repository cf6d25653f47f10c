"""mPLUG-Owl2's vision side: a CLIP-style ViT and the visual abstractor.

The ViT turns a square image of ``image_size`` pixels into ``1 + (image_size / patch_size)^2``
tokens (CLS first); the abstractor lets ``Q`` learnable queries cross-attend to all of them and
hands the language model ``Q + 1`` rows: the projected queries and a learned end row. Module and
parameter names follow the released state dict (``model.vision_model.*``,
``model.visual_abstractor.*``), so the released weights load without renaming.

Numerics follow the reference: pre-LN ViT blocks with QuickGELU and a per-head interleaved qkv
projection; abstractor blocks whose residual starts from the normalised queries, with keys taking
fixed sin-cos position embeddings and values none. The LayerNorms inside the abstractor's blocks
use torch's default epsilon (1e-5), not the configured one, as the released model was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# The abstractor's block norms were built without an epsilon argument.
TORCH_LAYER_NORM_EPS = 1e-5


@dataclass
class VisionTowerConfig:
    """The ``visual_config["visual_model"]`` entries the tower uses (defaults: the released 7B model)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.hidden_act != "quick_gelu":
            raise ValueError(f"the mPLUG-Owl2 vision tower uses quick_gelu, got hidden_act={self.hidden_act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """CLS plus one token per patch."""
        return 1 + self.grid_size**2


@dataclass
class AbstractorConfig:
    """The ``visual_config["visual_abstractor"]`` entries the abstractor uses (defaults: the released 7B model)."""

    hidden_size: int = 1024
    encoder_hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    num_learnable_queries: int = 64
    grid_size: int = 32
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.encoder_hidden_size != self.hidden_size:
            # Keys and values are computed from the queries and the vision tokens stacked together.
            raise ValueError(
                f"the abstractor needs encoder_hidden_size == hidden_size, got {self.encoder_hidden_size} "
                f"and {self.hidden_size}"
            )


def read_config(cls, values: dict | None):
    """A `VisionTowerConfig` / `AbstractorConfig` from a released config dict (other keys ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in (values or {}).items() if key in names})


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, heads * d]`` -> ``[B, heads, T, d]``."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, d]`` -> ``[B, T, heads * d]``."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


# ---------------------------------------------------------------------------------------- ViT


class VisionEmbeddings(nn.Module):
    """Pixels ``[B, 3, S, S]`` -> tokens ``[B, 1 + N, W]``: patches, CLS first, positions, pre-norm."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        width = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_tokens, width))
        self.patch_embed = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.pre_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        tokens = tokens + self.position_embedding[:, : tokens.shape[1]]
        return self.pre_layernorm(tokens)


class VisionAttention(nn.Module):
    """Full self-attention; ``query_key_value``'s output is laid out per head as ``[q | k | v]``."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, length, self.num_heads, 3, width // self.num_heads)
        query, key, value = qkv.permute(3, 0, 2, 1, 4)  # each [B, heads, T, d]
        return self.dense(merge_heads(F.scaled_dot_product_attention(query, key, value)))


class VisionMlp(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(hidden)))


class VisionLayer(GradientCheckpointingLayer):
    """A pre-LN transformer block."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMlp(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class VisionTower(nn.Module):
    """The ViT: pixels ``[B, 3, S, S]`` (CLIP-normalised) -> ``[B, 1 + N, W]``, all tokens post-normed."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


# ---------------------------------------------------------------------------------------- abstractor


def sincos_embedding_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE's 1D sin-cos embedding ``[len(positions), dim]``: sines then cosines, float32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2))
    angles = positions.float().reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_embedding_2d(dim: int, grid_size: int) -> torch.Tensor:
    """``[1 + grid^2, dim]``: a zero row for CLS, then patches row-major; the first half of each
    row encodes the patch's column, the second half its row."""
    rows, columns = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    patches = torch.cat(
        [sincos_embedding_1d(dim // 2, columns.reshape(-1)), sincos_embedding_1d(dim // 2, rows.reshape(-1))], dim=1
    )
    return torch.cat([torch.zeros(1, dim), patches])


class AbstractorAttention(nn.Module):
    """Queries attend to themselves and the vision tokens; keys carry fixed sin-cos positions
    (``q_pos_embed`` for the queries, ``k_pos_embed`` for the vision tokens), values none."""

    def __init__(self, config: AbstractorConfig, num_vision_tokens: int):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        # Stored in the released checkpoint (persistent buffers); a fresh model gets `sincos_tables`.
        self.register_buffer("q_pos_embed", torch.zeros(config.num_learnable_queries, width))
        self.register_buffer("k_pos_embed", torch.zeros(num_vision_tokens, width))
        self.grid_size = config.grid_size

    def sincos_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values ``q_pos_embed`` and ``k_pos_embed`` were made with (float32, on the CPU)."""
        num_queries, width = self.q_pos_embed.shape
        return sincos_embedding_1d(width, torch.arange(num_queries)), sincos_embedding_2d(width, self.grid_size)

    def forward(self, queries: torch.Tensor, keys_and_values: torch.Tensor) -> torch.Tensor:
        """``queries`` ``[B, Q, D]`` (normalised), ``keys_and_values`` ``[B, Q + 1 + N, D]`` -> ``[B, Q, D]``."""
        positions = torch.cat([self.q_pos_embed, self.k_pos_embed]).to(queries.dtype)
        query = split_heads(self.query(queries + self.q_pos_embed.to(queries.dtype)), self.num_heads)
        key = split_heads(self.key(keys_and_values + positions), self.num_heads)
        value = split_heads(self.value(keys_and_values), self.num_heads)
        return merge_heads(F.scaled_dot_product_attention(query, key, value))


class AbstractorMlp(nn.Module):
    """SwiGLU with a LayerNorm on the gated activations: ``w2(ffn_ln(silu(w1 x) * w3 x))``."""

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(hidden)) * self.w3(hidden)))


class AbstractorOutput(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=TORCH_LAYER_NORM_EPS)
        self.mlp = AbstractorMlp(config)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = residual + self.out_proj(attended)
        return hidden + self.mlp(self.norm2(hidden))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, config: AbstractorConfig, num_vision_tokens: int):
        super().__init__()
        self.attention = AbstractorAttention(config, num_vision_tokens)
        self.output = AbstractorOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=TORCH_LAYER_NORM_EPS)
        self.normk = nn.LayerNorm(config.hidden_size, eps=TORCH_LAYER_NORM_EPS)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(queries)
        keys_and_values = torch.cat([normed, self.normk(vision)], dim=1)
        # The residual is the normalised queries, as in the released model.
        return self.output(self.attention(normed, keys_and_values), normed)


class AbstractorLayer(GradientCheckpointingLayer):
    def __init__(self, config: AbstractorConfig, num_vision_tokens: int):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(config, num_vision_tokens)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, vision)


class AbstractorEncoder(nn.Module):
    def __init__(self, config: AbstractorConfig, num_vision_tokens: int):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(config, num_vision_tokens) for _ in range(config.num_hidden_layers))

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, vision)
        return queries


class VisualAbstractor(nn.Module):
    """Vision tokens ``[B, 1 + N, D]`` -> language-model rows ``[B, Q + 1, H]``."""

    def __init__(self, config: AbstractorConfig, num_vision_tokens: int, language_hidden_size: int):
        super().__init__()
        if num_vision_tokens != 1 + config.grid_size**2:
            raise ValueError(
                f"the abstractor's grid_size {config.grid_size} does not match the vision tower's "
                f"{num_vision_tokens - 1} patches"
            )
        self.config = config
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_learnable_queries, config.hidden_size))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.encoder = AbstractorEncoder(config, num_vision_tokens)

    @property
    def num_rows(self) -> int:
        """Rows handed to the language model per image: the queries and the end row."""
        return self.config.num_learnable_queries + 1

    def forward(self, vision: torch.Tensor) -> torch.Tensor:
        queries = self.encoder(self.query_embeds.expand(vision.shape[0], -1, -1), vision)
        rows = self.visual_fc(queries)
        return torch.cat([rows, self.vit_eos.expand(rows.shape[0], -1, -1)], dim=1)
