"""Tiny random models built offline from configs in code, for tests, examples and benchmarks.

This module builds Q-Scorers; its siblings build other tiny models the integrations need.

Nothing is downloaded: the backbone is a transformers Qwen-VL model with a few small layers and
random weights, and the tokenizer a byte-level BPE (no merges) built with the ``tokenizers`` library
plus the special tokens of the Qwen chat and vision layout.
"""

from __future__ import annotations

import torch

from qscorer_reward.scorer import QScorer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + the Qwen special tokens), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tokenizer


def tiny_backbone_config(
    family: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, vision_width: int = 32
):
    """A transformers config for a tiny ``family`` model (Qwen-VL layout, mrope sections scaled down)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    heads = 4
    head_dim = hidden_size // heads
    # Rotary frequencies split over (time, height, width) in the real models' 2:3:3 ratio.
    spatial = 3 * (head_dim // 2) // 8
    mrope_section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=None,
        eos_token_id=None,
    )
    ids = _special_token_ids()
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=vision_width, hidden_size=hidden_size, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=hidden_size,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3_vl":
        text = dict(text, head_dim=head_dim)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(
            depth=2,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=hidden_size,
            num_heads=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _special_token_ids() -> dict[str, int]:
    offset = 256 + SPECIAL_TOKENS.index("<|vision_start|>")
    return dict(
        vision_start_token_id=offset,
        vision_end_token_id=offset + 1,
        image_token_id=offset + 2,
        video_token_id=offset + 3,
    )


def tiny_base_model(family: str = "qwen2_5_vl", seed: int = 0, **config_overrides):
    """A tiny random transformers ``*ForConditionalGeneration`` model of ``family`` and its tokenizer,
    as a base model before any score token is added. The embedding matrix keeps two spare rows
    beyond the tokenizer, so K = 1 uses spare rows and K = 5 exercises the resize path.
    ``config_overrides`` go to `tiny_backbone_config`."""
    from transformers import AutoModelForImageTextToText

    tokenizer = tiny_tokenizer()
    config = tiny_backbone_config(family, vocab_size=len(tokenizer) + 2, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    return model, tokenizer


def tiny_scorer(
    family: str = "qwen2_5_vl",
    num_score_tokens: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_pixels: int = 112 * 112,
    **config_overrides,
) -> QScorer:
    """A tiny random Q-Scorer of ``family`` (frozen, eval mode), reproducible from ``seed``."""
    model, tokenizer = tiny_base_model(family, seed, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        scorer = QScorer.from_base_model(
            model, tokenizer, num_score_tokens=num_score_tokens, max_pixels=max_pixels, dtype=dtype
        )
    return scorer.requires_grad_(False).eval()
