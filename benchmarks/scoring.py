"""What the benchmark scripts run: a scoring pass in each gradient mode, the bare backbone forward,
its parts, and Q-Align-style scoring on the same backbone.

Modes of a scoring pass on float pixels ``[B, 3, H, W]`` in [0, 1]:

- ``no_grad``: ``scorer(pixels)`` under ``torch.no_grad()`` (filtering, evaluation, RL rewards).
- ``grad_to_input``: ``scorer(pixels)`` and the gradient of the summed scores with respect to the
  pixels (reward backpropagation into a generator); the weights stay frozen.
- ``grad_checkpointing``: the same after ``scorer.gradient_checkpointing_enable()``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timing import interleaved_median_ms, peak_memory_bytes, tensor_bytes

from qscorer_reward.backbones import BackboneInputs

MODES = ("no_grad", "grad_to_input", "grad_checkpointing")

# Q-Align's five level words and their weights, best first.
QALIGN_LEVELS = ("excellent", "good", "fair", "poor", "bad")
QALIGN_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)


def set_gradient_checkpointing(scorer, enabled: bool) -> None:
    """Turn gradient checkpointing of ``scorer`` on or off (nothing to do if it already is)."""
    if scorer.is_gradient_checkpointing != enabled:
        if enabled:
            scorer.gradient_checkpointing_enable()
        else:
            scorer.gradient_checkpointing_disable()


def scoring_pass(scorer, pixels: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """A zero-argument callable that scores ``pixels`` once in ``mode`` and returns the scores
    (``no_grad``) or the gradient with respect to the pixels (the other modes). Checkpointing is
    the scorer's state: turn it on (`set_gradient_checkpointing`) before ``grad_checkpointing``
    passes."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "no_grad":

        def score() -> torch.Tensor:
            with torch.no_grad():
                return scorer(pixels)

        return score
    leaf = pixels.detach().clone().requires_grad_(True)

    def score_and_backward() -> torch.Tensor:
        return torch.autograd.grad(scorer(leaf).sum(), leaf)[0]

    return score_and_backward


def measure_modes(
    scorer,
    pixels: torch.Tensor,
    modes: tuple[str, ...],
    *,
    device: torch.device | str,
    warmup: int,
    repeats: int,
    time_budget_s: float | None = None,
    references: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict[str, float]]:
    """Time scoring passes of ``pixels`` in ``modes`` (and the zero-argument ``references``, to
    compare with), interleaved by `timing.interleaved_median_ms`, then the peak memory of each
    mode's pass in a separate, untimed call.

    Returns ``{name: {"ms_per_call": ..., "peak_memory_bytes": ...}}`` for each mode (peak memory
    counts the weights and inputs, see `timing.peak_memory_bytes`) and ``{name: {"ms_per_call":
    ...}}`` for each reference. Gradient checkpointing is switched untimed before each pass and is
    off afterwards.
    """
    passes = {mode: scoring_pass(scorer, pixels, mode) for mode in modes}
    setup = {mode: partial(set_gradient_checkpointing, scorer, mode == "grad_checkpointing") for mode in modes}
    for name in references or {}:
        setup[name] = partial(set_gradient_checkpointing, scorer, False)
    try:
        times_ms = interleaved_median_ms(
            {**passes, **(references or {})}, warmup, repeats, device, time_budget_s, setup=setup
        )
        results: dict[str, dict[str, float]] = {name: {"ms_per_call": ms} for name, ms in times_ms.items()}
        resident = tensor_bytes(scorer, pixels)
        for mode, score in passes.items():
            setup[mode]()
            # the grad modes score a copy of the pixels that requires grad
            copies = 0 if mode == "no_grad" else pixels.nbytes
            results[mode]["peak_memory_bytes"] = peak_memory_bytes(score, device, resident + copies)
    finally:
        set_gradient_checkpointing(scorer, False)
    return results


def bare_forward(scorer, inputs: BackboneInputs) -> torch.Tensor:
    """The transformers model's last hidden state ``[B, L, D]`` on tensors already prepared by
    ``scorer.backbone.prepare``: the backbone forward with nothing of the scorer around it."""
    return scorer.backbone.model.model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False, **inputs.model_inputs
    ).last_hidden_state


def vision_tower(scorer, inputs: BackboneInputs) -> torch.Tensor:
    """The vision tower alone: merged image features ``[tokens, D]`` of the prepared batch."""
    model_inputs = inputs.model_inputs
    return scorer.backbone.model.model.visual(
        model_inputs["pixel_values"], grid_thw=model_inputs["image_grid_thw"]
    ).pooler_output


def language_model_inputs(scorer, inputs: BackboneInputs, image_features: torch.Tensor) -> torch.Tensor:
    """The token embeddings ``[B, L, D]`` with the image features in the image-token slots, as
    the transformers model builds them before its language model."""
    model = scorer.backbone.model.model
    embeddings = model.get_input_embeddings()(inputs.input_ids)
    image_slots = (inputs.input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeddings.masked_scatter(image_slots, image_features.to(embeddings.dtype))


def language_model(scorer, inputs: BackboneInputs, embeddings: torch.Tensor) -> torch.Tensor:
    """The language model alone on prepared embeddings: last hidden state ``[B, L, D]``."""
    return scorer.backbone.model.model.language_model(
        inputs_embeds=embeddings,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.model_inputs["position_ids"],
        use_cache=False,
    ).last_hidden_state


def qalign_level_ids(tokenizer) -> list[int]:
    """Vocabulary ids read for the five levels: the first token of each level word. With the
    Qwen tokenizers each word is one token; with the tiny byte-level test tokenizer it is the first
    letter, which costs the same."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in QALIGN_LEVELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the level words share first tokens: {ids}")
    return ids


def qalign_scores(scorer, inputs: BackboneInputs, level_ids: list[int]) -> torch.Tensor:
    """Q-Align-style scores ``[B]`` float32 in [1, 5] on the same backbone and prepared batch:
    the softmax over the five level tokens' logits at the position that predicts the answer,
    weighted by 5..1. Same forward as Q-Scorer; ``lm_head`` rows of the five levels instead of the
    regression head."""
    hidden = scorer.backbone(inputs)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    answer_hidden = hidden[rows, inputs.score_positions]
    level_weights = scorer.backbone.model.get_output_embeddings().weight[level_ids]
    probabilities = (answer_hidden @ level_weights.T).float().softmax(dim=-1)
    return probabilities @ torch.tensor(QALIGN_WEIGHTS, device=probabilities.device)


def qalign_scores_from_all_logits(scorer, inputs: BackboneInputs, level_ids: list[int]) -> torch.Tensor:
    """Q-Align-style scores as usually computed: the full ``*ForConditionalGeneration`` forward,
    which applies ``lm_head`` at every position over the whole vocabulary, then the same softmax
    over the five levels at the answer position."""
    logits = scorer.backbone.model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=False, **inputs.model_inputs
    ).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    probabilities = logits[rows, inputs.score_positions][:, level_ids].float().softmax(dim=-1)
    return probabilities @ torch.tensor(QALIGN_WEIGHTS, device=probabilities.device)
