"""`QScorerForTraining`: a `QScorer` with its trainable parts set up, computing what the loss needs.

Trained: a LoRA adapter (peft, injected into the backbone), the K score tokens' embedding rows,
the head, and optionally the vision tower, its merger (mPLUG-Owl2: the visual abstractor), the
output layer (``lm_head``) and the language model's layers as whole weights (for a base trained
from scratch); everything else is frozen. The score tokens' rows are trained as separate
``[K, hidden]`` parameters rather than by unfreezing the embedding matrices, whose optimizer state
would cost as much as the matrices themselves: a forward hook on the input embeddings substitutes
the rows at the score tokens' positions, and the output logits of the score tokens are computed
from them (unless the output layer is trained whole, which then holds them).

Where backbone families differ, the backbone says it (`qscorer_reward.backbones.Backbone`): which
parameters form the vision tower, merger and language model (``trainable_part``), and the
teacher-forced training sequence (``prepare_training`` / ``forward_training``: where the head
reads and which positions the cross-entropy covers).

Training aids (`QScorerForTraining.add_training_aid`) are modules that train with the model and are
never exported: e.g. an auxiliary head on the vision tower's output for a tower trained from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qscorer_reward.backbones import Backbone, BackboneInputs
from qscorer_reward.score_tokens import get_score_token_rows
from qscorer_reward.scorer import QScorer

from .data import MOS_SCALE
from .losses import score_token_ce_loss


@dataclass
class TrainableParts:
    """What to train besides the head and the score-token rows (always trained)."""

    lora: object | None  # a peft LoraConfig, or None
    vision_tower: bool = False
    merger: bool = False
    language_model: bool = False  # its decoder layers and final norm, whole (not the token embeddings)
    lm_head: bool = False  # the output layer, whole (then it holds the score tokens' output rows)
    output_rows: bool = True  # the score tokens' output rows (only the cross-entropy uses them)


class ScoreTokenRows(nn.Module):
    """Trainable input and output embedding rows of the K score tokens, float32 ``[K, hidden]`` each.

    While alive it substitutes ``input_rows`` for the score tokens' input embeddings (a forward
    hook on ``model.get_input_embeddings()``). With tied embeddings there is one set of rows; with
    ``separate_output_rows`` False (an output layer trained whole) no output rows: the output
    layer's own rows give the score tokens' logits.
    """

    def __init__(
        self, model: nn.Module, token_ids: list[int], train_output_rows: bool, separate_output_rows: bool = True
    ):
        super().__init__()
        rows = get_score_token_rows(model, token_ids)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.input_rows = nn.Parameter(rows["input_embeddings"].float())
        self.tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        self.output_rows = (
            nn.Parameter(rows["output_embeddings"].float(), requires_grad=train_output_rows)
            if separate_output_rows and not self.tied
            else None
        )
        self._hook = model.get_input_embeddings().register_forward_hook(self._substitute_input_rows)

    def _substitute_input_rows(self, module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]
        matches = input_ids.unsqueeze(-1) == self.token_ids  # [B, L, K]
        which = matches.float().argmax(-1)
        rows = self.input_rows.to(output.dtype)[which]
        return torch.where(matches.any(-1, keepdim=True), rows, output)

    @property
    def output_weight(self) -> torch.Tensor | None:
        """``[K, hidden]`` rows that give the score tokens' logits, or ``None`` when the output
        layer's own rows do."""
        return self.input_rows if self.tied else self.output_rows

    def remove_hook(self) -> None:
        self._hook.remove()


class QScorerForTraining(nn.Module):
    """The trainable model: ``forward(pixels)`` returns the scores and the score-token cross-entropy.

    Args:
        scorer: a `QScorer` (its backbone is modified in place: LoRA injected, flags set).
        parts: what to train (`TrainableParts`).
        answer_length: how many tokens at the end of the prompt belong to the answer (the answer
            prefix, e.g. "The quality of the image is"); the cross-entropy covers them and the
            tokens the backbone's training sequence puts after the prompt (the K score tokens).
        gradient_checkpointing: recompute layer activations in the backward pass.
    """

    def __init__(self, scorer: QScorer, parts: TrainableParts, answer_length: int, gradient_checkpointing: bool):
        super().__init__()
        self.scorer = scorer
        self.answer_length = answer_length
        backbone = scorer.backbone
        model = backbone.model
        output_weight = model.get_output_embeddings().weight
        if parts.lm_head and output_weight is model.get_input_embeddings().weight:
            raise ValueError("this backbone ties its output layer to the input embeddings: it cannot be trained apart")
        scorer.requires_grad_(False)
        if parts.lora is not None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(parts.lora, model)
        whole = {"vision_tower": parts.vision_tower, "merger": parts.merger, "language_model": parts.language_model}
        for name, param in model.named_parameters():
            param.requires_grad = (
                "lora_" in name
                or whole.get(backbone.trainable_part(name), False)
                or (parts.lm_head and param is output_weight)
            )
        scorer.head.requires_grad_(True)
        self.score_token_rows = ScoreTokenRows(
            model, scorer.config.score_token_ids, parts.output_rows, separate_output_rows=not parts.lm_head
        )
        self.training_aids = nn.ModuleDict()
        # Master weights of everything trained in float32 (optimizer updates at 2e-5 vanish in bf16);
        # the frozen backbone keeps its dtype and autocast runs the matmuls in low precision.
        for param in self.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if gradient_checkpointing:
            scorer.gradient_checkpointing_enable()

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def add_training_aid(self, name: str, aid: nn.Module) -> None:
        """Attach ``aid``, a module that trains with the model (its trainable parameters join the
        optimizer when added before it is built) and is never exported. Each forward pass calls
        ``aid(inputs)`` last, with the batch's `BackboneInputs`, and adds the dict of tensors it
        returns to the outputs; an aid may watch the backbone with hooks of its own. Its trained
        weights are kept in float32, as the model's."""
        for param in aid.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        self.training_aids[name] = aid

    def forward(
        self,
        pixels: torch.Tensor | list[torch.Tensor],
        compute_ce: bool = True,
        vision_only: bool = False,
        mos: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score a batch and (optionally) compute the answer's cross-entropy.

        Args:
            pixels: float RGB pixels in [0, 1] on the model's device, ``[B, 3, H, W]`` or a list
                of ``[3, H, W]`` (as `qscorer_reward.preprocessing.to_unit_pixels` returns them).
            compute_ce: also compute ``ce_loss`` (training); off for evaluation.
            vision_only: run the vision tower alone, not the language model: a step that trains
                only the vision side from what training aids compute on it (needs one).
            mos: ``[B]`` MOS on 1..5, for a backbone whose training answer names the score token
                of the image's level (`score_levels`; mPLUG-Owl2).

        With ``compute_ce`` or ``mos`` the batch is the backbone's teacher-forced training
        sequence (`Backbone.prepare_training`) and the head reads where the training loss reads;
        otherwise it is scored as inference scores it.

        Returns a dict: ``raw_scores`` (``[B]`` float32, the unbounded regression output the score
        losses read), ``scores`` (``[B]`` float32, bounded as inference bounds them), with
        ``compute_ce`` ``ce_loss`` (0-dim float32), and the training aids' outputs; with
        ``vision_only`` the aids' outputs alone.
        """
        backbone = self.scorer.backbone
        if vision_only:
            inputs = backbone.prepare(pixels)
            if not self.training_aids:
                raise ValueError("vision_only needs a training aid that reads the vision tower (nothing else learns)")
            backbone.image_features(inputs)  # the aids' hooks see the tower
            return self._training_aid_outputs(inputs)
        if compute_ce or mos is not None:
            levels = None if mos is None else score_levels(mos, self.scorer.config.num_score_tokens)
            inputs = backbone.prepare_training(pixels, levels)
            hidden = backbone.forward_training(inputs)
        else:
            inputs = backbone.prepare(pixels)
            hidden = backbone(inputs)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        head = self.scorer.head
        # The head stays in float32 even under autocast: its output is the score.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            raw = head.raw_score(hidden[batch, inputs.score_positions].float())
        outputs = {"raw_scores": raw, "scores": head.bounded(raw)}
        if compute_ce:
            outputs["ce_loss"] = self._answer_cross_entropy(hidden, inputs)
        return outputs | self._training_aid_outputs(inputs)

    def _training_aid_outputs(self, inputs: BackboneInputs) -> dict[str, torch.Tensor]:
        outputs = {}
        for aid in self.training_aids.values():
            outputs |= aid(inputs)
        return outputs

    def _answer_cross_entropy(self, hidden: torch.Tensor, inputs: BackboneInputs) -> torch.Tensor:
        """Next-token cross-entropy over the answer: the prompt's last ``answer_length`` tokens
        and the tokens after the prompt (``inputs.answer_positions`` predict those).

        The token at position t is predicted by the hidden state at t - 1.
        """
        after_prompt = inputs.answer_positions
        in_prompt = after_prompt[:, :1] + torch.arange(-self.answer_length, 0, device=hidden.device)
        positions = torch.cat([in_prompt, after_prompt], dim=1)  # [B, T], the predicting positions
        targets = inputs.input_ids.gather(1, positions + 1)
        states = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = self.scorer.backbone.model.get_output_embeddings()(states)
        rows = self.score_token_rows
        if rows.output_weight is not None:
            score_logits = states @ rows.output_weight.to(states.dtype).T
            logits = logits.index_copy(-1, rows.token_ids, score_logits.to(logits.dtype))
        return score_token_ce_loss(logits, targets)


def score_levels(mos: torch.Tensor, num_score_tokens: int) -> torch.Tensor:
    """``[B]`` int64 in ``0..K-1``: the level of each MOS (on 1..5), the scale cut into K equal
    bins, lowest first; the training answer of a family that names one score token names
    ``<score{level + 1}>``."""
    low, high = MOS_SCALE
    levels = ((mos.float() - low) / (high - low) * num_score_tokens).floor()
    return levels.clamp(0, num_score_tokens - 1).long()


def answer_token_count(scorer: QScorer, answer_text: str) -> int:
    """How many of the prompt's last tokens are ``answer_text`` (which the template must end with).

    Found by tokenizing the template without the answer as the backbone tokenizes prompts
    (`Backbone.prompt_ids`): its text after the image must be a prefix of the prompt's tokens,
    and the rest is the answer, however the tokenizer splits it. A space before the answer
    belongs to the answer (SentencePiece joins it to the answer's first word).
    """
    template = scorer.config.prompt_template
    if not template.split("{image}")[1].endswith(answer_text):
        raise ValueError(f"the prompt template does not end with the answer text {answer_text!r}")
    backbone = scorer.backbone
    before = template[: len(template) - len(answer_text)]
    before_ids = backbone.prompt_ids(scorer.tokenizer, before.rstrip(" "))[1]
    suffix_ids = list(backbone.suffix_ids)
    if suffix_ids[: len(before_ids)] != before_ids:
        raise ValueError(
            f"cannot locate the answer {answer_text!r} in the tokenized prompt: the tokenizer merges it "
            "with the text before it; start answer_text at a word boundary"
        )
    return len(suffix_ids) - len(before_ids)


def language_model_modules(backbone: Backbone, names: list[str]) -> list[str]:
    """Full names of the modules in ``backbone``'s language model (`Backbone.trainable_part`)
    whose names are or end with one of ``names`` (``"q_proj"``, ``"v_proj.multiway.1"``), for a
    LoRA adapter on them alone."""
    found = [
        full_name
        for full_name, _ in backbone.model.named_modules()
        if backbone.trainable_part(full_name) == "language_model"
        and any(full_name == name or full_name.endswith(f".{name}") for name in names)
    ]
    if not found:
        raise ValueError(f"lora.target_modules {names} name no module of the language model")
    return found
