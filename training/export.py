"""Write a trained model as a Q-Scorer checkpoint that `QScorer.from_pretrained` loads.

The trained-parts form is written from a state dict of the training model, so it works alike
whether the weights were gathered from DDP, FSDP or DeepSpeed; the merged whole-weights form is
that checkpoint loaded with the adapter merged and saved again.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from qscorer_reward.checkpoint import (
    ADAPTER_WEIGHTS_FILE,
    HEAD_FILE,
    PEFT_KEY_PREFIX,
    SCORE_TOKENS_FILE,
    TRAINED_MODULES_FILE,
    replace_directory,
)
from qscorer_reward.config import CONFIG_NAME

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
    if not config.base_model:
        raise ValueError("the scorer's config has no base_model, which a trained-parts checkpoint is applied to")
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    backbone = scorer.backbone.model
    trained = set(model.trainable_parameter_names())

    input_rows = cpu["score_token_rows.input_rows"]
    output_rows = cpu.get("score_token_rows.output_rows", input_rows)
    head = {name.removeprefix(HEAD_PREFIX): tensor for name, tensor in cpu.items() if name.startswith(HEAD_PREFIX)}
    modules = {
        name.removeprefix(BACKBONE_PREFIX): cpu[name]
        for name in sorted(trained)
        if name.startswith(BACKBONE_PREFIX) and "lora_" not in name
    }

    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        save_file({"input_embeddings": input_rows, "output_embeddings": output_rows}, staging / SCORE_TOKENS_FILE)
        save_file(head, staging / HEAD_FILE)
        if modules:
            save_file(modules, staging / TRAINED_MODULES_FILE)
        if getattr(backbone, "peft_config", None):
            from peft import get_peft_model_state_dict

            lora_state = {
                name.removeprefix(BACKBONE_PREFIX): tensor
                for name, tensor in cpu.items()
                if name.startswith(BACKBONE_PREFIX) and "lora_" in name
            }
            adapter = get_peft_model_state_dict(backbone, state_dict=lora_state)
            backbone.peft_config["default"].save_pretrained(staging)
            save_file({PEFT_KEY_PREFIX + k: v for k, v in adapter.items()}, staging / ADAPTER_WEIGHTS_FILE)
        scorer.tokenizer.save_pretrained(staging)
        config.to_json_file(staging / CONFIG_NAME)
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def save_merged(trained_parts_directory: str | Path, directory: str | Path) -> Path:
    """Load a trained-parts checkpoint with its LoRA adapter merged and save it in the ``full``
    (whole weights) form, which needs no base model to load."""
    from qscorer_reward.scorer import QScorer

    scorer = QScorer.from_pretrained(trained_parts_directory, merge_lora=True)
    scorer.save_pretrained(directory, weights_format="full")
    return Path(directory)
