"""IQA score tokens: new special tokens whose embedding rows start at the mean of the existing ones."""

from __future__ import annotations

import torch
from torch import nn


def add_score_tokens(model: nn.Module, tokenizer, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens and give them embedding rows in ``model``.

    The embedding matrices grow only if the tokenizer outgrows them (Qwen checkpoints keep spare
    rows). The new tokens' input and output rows are set to the mean of the rows of the tokens the
    tokenizer had before (the paper's initialisation for the output rows; the input rows likewise,
    so that they are not random). Returns the tokens' ids, in order.
    """
    existing = len(tokenizer)
    already = [t for t in tokens if t in tokenizer.get_vocab()]
    if already:
        raise ValueError(f"the tokenizer already has the score tokens {already}")
    tokenizer.add_tokens(tokens, special_tokens=True)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for embedding in _embedding_matrices(model):
            embedding[token_ids] = embedding[:existing].mean(dim=0, keepdim=True).to(embedding.dtype)
    return token_ids


def get_score_token_rows(model: nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The score tokens' input and output embedding rows, ``[K, hidden]`` each."""
    input_rows = model.get_input_embeddings().weight[token_ids]
    output_rows = model.get_output_embeddings().weight[token_ids]
    return {"input_embeddings": input_rows.detach().clone(), "output_embeddings": output_rows.detach().clone()}


def set_score_token_rows(model: nn.Module, token_ids: list[int], rows: dict[str, torch.Tensor]) -> None:
    """Write rows saved by `get_score_token_rows` back into ``model``."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token_ids] = rows["input_embeddings"].to(
            model.get_input_embeddings().weight.dtype
        )
        model.get_output_embeddings().weight[token_ids] = rows["output_embeddings"].to(
            model.get_output_embeddings().weight.dtype
        )


def _embedding_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The input and (if not tied to it) output embedding weights."""
    input_weight = model.get_input_embeddings().weight
    output_weight = model.get_output_embeddings().weight
    return [input_weight] if output_weight is input_weight else [input_weight, output_weight]
