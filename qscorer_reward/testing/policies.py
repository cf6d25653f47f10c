"""Tiny random causal-LM policies, built offline, for TRL trainer tests and examples.

A policy here is a transformers ``Qwen2ForCausalLM`` with a few small layers and random weights,
paired with the byte-level `tiny_tokenizer`: it writes short byte strings, enough for a real
GRPOTrainer / RLOOTrainer loop to generate, score and update.
"""

from __future__ import annotations

import torch

from . import tiny_tokenizer


def tiny_policy(seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random ``Qwen2ForCausalLM`` and its tokenizer, reproducible from ``seed``.

    The tokenizer is `tiny_tokenizer` (256 byte tokens plus the Qwen special tokens); generation
    stops at its end-of-turn token ``<|im_end|>`` and pads with ``<|endoftext|>``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
