"""Write a trained model as a Q-Scorer checkpoint that `QScorer.from_pretrained` loads.

Both forms are written from a state dict of the training model, so they work alike whether the
weights were gathered from DDP, FSDP or DeepSpeed: the trained parts on top of the base model
(`save_trained_parts`), or the whole weights with the adapter merged (`save_whole`, for a base that
this package's checkpoints cannot refer to). `save_merged` turns a trained-parts checkpoint into
the whole-weights form.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

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


def save_whole(
    model: QScorerForTraining,
    state: dict[str, torch.Tensor],
    directory: str | Path,
    model_name: str | None = None,
) -> Path:
    """Write ``directory`` (atomically) in the ``full`` form, which loads without a base model: the
    backbone with the LoRA adapter merged (``W + (B @ A) * scale``, computed in float32) and the
    score-token rows written into its embedding matrices, all in the backbone's dtype, and the head.

    Args and ``state``: as `save_trained_parts`.
    """
    scorer = model.scorer
    config = dataclasses.replace(scorer.config, weights_format="full", model_name=model_name)
    backbone = scorer.backbone.model
    weights = merged_backbone_state(
        backbone,
        {name.removeprefix(BACKBONE_PREFIX): t for name, t in state.items() if name.startswith(BACKBONE_PREFIX)},
    )
    names = {id(param): name.replace(".base_layer.", ".") for name, param in backbone.named_parameters()}
    token_ids = torch.tensor(config.score_token_ids)
    rows = [(backbone.get_input_embeddings().weight, state["score_token_rows.input_rows"])]
    if "score_token_rows.output_rows" in state:  # separate output rows (else the output layer holds them)
        rows.append((backbone.get_output_embeddings().weight, state["score_token_rows.output_rows"]))
    for matrix, trained_rows in rows:
        name = names[id(matrix)]
        weights[name] = weights[name].clone()
        weights[name][token_ids.to(weights[name].device)] = trained_rows.to(weights[name])
    dtype = scorer.dtype
    weights = {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}
    # A blank model to carry the weights, from a copy of the config (the live one may name the
    # backbone's own attention functions, as QwenVLBackbone's vision tower does).
    config_copy = type(backbone.config).from_dict(backbone.config.to_dict())
    with torch.device("meta"):
        whole = type(backbone)(config_copy)
    whole.load_state_dict(weights, strict=True, assign=True)
    head = {name.removeprefix(HEAD_PREFIX): t for name, t in state.items() if name.startswith(HEAD_PREFIX)}
    return write_checkpoint(directory, config, head, scorer.tokenizer, backbone=whole)


def merged_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (the backbone's, LoRA layers injected) with every LoRA pair merged into its base
    weight and the adapter's names gone: the state dict of the backbone without the adapter."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = dict(state)
    for name, module in backbone.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLinear) or module.fan_in_fan_out:
            raise ValueError(f"{name}: only LoRA on linear layers can be merged here, not {type(module).__name__}")
        weight = f"{name}.base_layer.weight"
        for adapter in module.active_adapters:
            down, up = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
            delta = (up.float() @ down.float()) * module.scaling[adapter]
            state[weight] = state[weight].float() + delta
    return {name.replace(".base_layer.", "."): t for name, t in state.items() if ".lora_" not in name}


def save_merged(trained_parts_directory: str | Path, directory: str | Path) -> Path:
    """Load a trained-parts checkpoint with its LoRA adapter merged and save it in the ``full``
    (whole weights) form, which needs no base model to load."""
    scorer = QScorer.from_pretrained(trained_parts_directory, merge_lora=True)
    scorer.save_pretrained(directory, weights_format="full")
    return Path(directory)
