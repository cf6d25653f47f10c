"""Write a trained model as a Q-Scorer checkpoint that `QScorer.from_pretrained` loads.

The trained-parts form is written from a state dict of the training model, so it works alike
whether the weights were gathered from DDP, FSDP or DeepSpeed; the merged whole-weights form is
that checkpoint loaded with the adapter merged and saved again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qscorer_reward.checkpoint import lora_adapter, write_checkpoint
from qscorer_reward.scorer import QScorer

from .model import QScorerForTraining

BACKBONE_PREFIX = "scorer.backbone.model."
HEAD_PREFIX = "scorer.head."


def save_trained_parts(
    model: QScorerForTraining,
    state: dict[str, torch.Tensor],
    directory: str | Path,
    model_name: str | None = None,
) -> Path:
    """Write ``directory`` (atomically) in the ``trained_parts`` form: head, score-token rows, LoRA
    adapter (peft format) and any fully trained backbone tensors, on top of ``config.base_model``.

    Args:
        model: the training model (unwrapped; its config, tokenizer and adapter config are used).
        state: ``model``'s full state dict with the current weights (e.g. from
            ``accelerator.get_state_dict``), on any device.
        directory: the checkpoint directory to create or replace.
        model_name: stored as ``QScorerConfig.model_name``.
    """
    scorer = model.scorer
    config = dataclasses.replace(scorer.config, weights_format="trained_parts", model_name=model_name)
    trained = set(model.trainable_parameter_names())
    input_rows = state["score_token_rows.input_rows"]
    backbone_state = {
        name.removeprefix(BACKBONE_PREFIX): t for name, t in state.items() if name.startswith(BACKBONE_PREFIX)
    }
    return write_checkpoint(
        directory,
        config,
        {name.removeprefix(HEAD_PREFIX): t for name, t in state.items() if name.startswith(HEAD_PREFIX)},
        scorer.tokenizer,
        score_token_rows={
            "input_embeddings": input_rows,
            "output_embeddings": state.get("score_token_rows.output_rows", input_rows),
        },
        adapter=lora_adapter(scorer.backbone.model, {k: v for k, v in backbone_state.items() if "lora_" in k}),
        trained_modules={
            name.removeprefix(BACKBONE_PREFIX): state[name]
            for name in sorted(trained)
            if name.startswith(BACKBONE_PREFIX) and "lora_" not in name
        },
    )


def save_merged(trained_parts_directory: str | Path, directory: str | Path) -> Path:
    """Load a trained-parts checkpoint with its LoRA adapter merged and save it in the ``full``
    (whole weights) form, which needs no base model to load."""
    scorer = QScorer.from_pretrained(trained_parts_directory, merge_lora=True)
    scorer.save_pretrained(directory, weights_format="full")
    return Path(directory)
