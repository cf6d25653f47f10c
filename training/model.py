"""`QScorerForTraining`: a `QScorer` with its trainable parts set up, computing what the loss needs.

Trained: a LoRA adapter (peft, injected into the backbone), the K score tokens' embedding rows,
the head, and optionally the vision tower, its merger and the language model's layers as whole
weights (for a base trained from scratch); everything else is frozen. The score
tokens' rows are trained as separate ``[K, hidden]`` parameters rather than by unfreezing the
embedding matrices, whose optimizer state would cost as much as the matrices themselves: a forward
hook on the input embeddings substitutes the rows at the score tokens' positions, and the output
logits of the score tokens are computed from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qscorer_reward.head import soft_clamp
from qscorer_reward.preprocessing import resize_antialiased
from qscorer_reward.score_tokens import get_score_token_rows
from qscorer_reward.scorer import QScorer

from .local_fidelity import local_fidelity_maps
from .losses import score_token_ce_loss


@dataclass
class TrainableParts:
    """What to train besides the head and the score-token rows (always trained)."""

    lora: object | None  # a peft LoraConfig, or None
    vision_tower: bool = False
    merger: bool = False
    language_model: bool = False  # its decoder layers and final norm, whole (not the token embeddings)
    output_rows: bool = True  # the score tokens' output rows (only the cross-entropy uses them)
    vision_probe: bool = False  # an auxiliary head on the mean image token (`VisionProbe`)
    vision_learns_from_probe_only: bool = False  # the score losses stop at the vision tower's output
    local_fidelity: bool = False  # the probe also predicts each token's local fidelity (`VisionProbe`)


class VisionProbe(nn.Module):
    """Auxiliary score head on the mean of each image's tokens as the vision tower hands them to
    the language model (its merger's output ``[tokens, hidden]``), float32.

    Training aid for a vision tower trained from scratch: its loss reaches the tower without
    passing through the language model. It watches the tower with a forward hook and is not saved.
    With ``detach_language_model_input`` the language model receives the tower's output detached,
    so the tower learns from the probe alone and the score losses train what reads it.

    With ``local_fidelity`` a second head predicts, for every token, the local structure and
    colour fidelity of the image region it covers (`local_fidelity.local_fidelity_maps`, on the
    1..5 scale): a dense full-reference target that asks the tower where the damage is, not only
    how much.
    """

    def __init__(
        self,
        visual: nn.Module,
        hidden_size: int,
        midpoint: float,
        detach_language_model_input: bool,
        local_fidelity: bool = False,
    ):
        super().__init__()
        self.detach_language_model_input = detach_language_model_input
        self.layers = self._head(hidden_size, 1)
        self.local_fidelity_layers = self._head(hidden_size, 2) if local_fidelity else None
        self.midpoint = midpoint
        self.features: torch.Tensor | None = None
        self._hook = visual.register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self.features = output
            return output.detach() if self.detach_language_model_input else output
        self.features = output.pooler_output  # transformers 5: the merged tokens
        if self.detach_language_model_input:
            output.pooler_output = output.pooler_output.detach()
        return output

    @staticmethod
    def _head(hidden_size: int, outputs: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(hidden_size, hidden_size // 2), nn.GELU(), nn.Linear(hidden_size // 2, outputs))

    def token_fidelity(self) -> torch.Tensor:
        """``[tokens, 2]`` float32 local fidelity predictions (structure, colour; 1..5 scale) of
        every token of the last forward of the vision tower; call before `scores`."""
        return self.local_fidelity_layers(self.features.float()) + self.midpoint

    def scores(self, tokens_per_image: list[int]) -> torch.Tensor:
        """``[B]`` float32 scores from the features of the last forward of the vision tower."""
        means = torch.stack([chunk.float().mean(0) for chunk in self.features.split(tokens_per_image)])
        self.features = None
        return self.layers(means).squeeze(-1) + self.midpoint


class ScoreTokenRows(nn.Module):
    """Trainable input and output embedding rows of the K score tokens, float32 ``[K, hidden]`` each.

    While alive it substitutes ``input_rows`` for the score tokens' input embeddings (a forward
    hook on ``model.get_input_embeddings()``). With tied embeddings there is one set of rows.
    """

    def __init__(self, model: nn.Module, token_ids: list[int], train_output_rows: bool):
        super().__init__()
        rows = get_score_token_rows(model, token_ids)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.input_rows = nn.Parameter(rows["input_embeddings"].float())
        self.tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        self.output_rows = (
            None if self.tied else nn.Parameter(rows["output_embeddings"].float(), requires_grad=train_output_rows)
        )
        self._hook = model.get_input_embeddings().register_forward_hook(self._substitute_input_rows)

    def _substitute_input_rows(self, module, args, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0]
        matches = input_ids.unsqueeze(-1) == self.token_ids  # [B, L, K]
        which = matches.float().argmax(-1)
        rows = self.input_rows.to(output.dtype)[which]
        return torch.where(matches.any(-1, keepdim=True), rows, output)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.input_rows if self.output_rows is None else self.output_rows

    def remove_hook(self) -> None:
        self._hook.remove()


class QScorerForTraining(nn.Module):
    """The trainable model: ``forward(pixels)`` returns the scores and the score-token cross-entropy.

    Args:
        scorer: a `QScorer` (its backbone is modified in place: LoRA injected, flags set).
        parts: what to train (`TrainableParts`).
        answer_length: how many tokens at the end of the prompt belong to the answer (the answer
            prefix, e.g. "The quality of the image is"); the cross-entropy covers them and the K
            score tokens.
        gradient_checkpointing: recompute layer activations in the backward pass.
    """

    def __init__(self, scorer: QScorer, parts: TrainableParts, answer_length: int, gradient_checkpointing: bool):
        super().__init__()
        self.scorer = scorer
        self.answer_length = answer_length
        model = scorer.backbone.model
        scorer.requires_grad_(False)
        if parts.lora is not None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(parts.lora, model)
        for name, param in model.named_parameters():
            in_vision = ".visual." in f".{name}"
            is_merger = "merger" in name
            in_language_layers = ".language_model." in f".{name}" and "embed_tokens" not in name
            param.requires_grad = (
                "lora_" in name
                or (parts.vision_tower and in_vision and not is_merger)
                or (parts.merger and in_vision and is_merger)
                or (parts.language_model and in_language_layers)
            )
        scorer.head.requires_grad_(True)
        self.score_token_rows = ScoreTokenRows(model, scorer.config.score_token_ids, parts.output_rows)
        low, high = scorer.head.score_range
        self.vision_probe = (
            VisionProbe(
                model.model.visual,
                model.config.text_config.hidden_size,
                (low + high) / 2,
                parts.vision_learns_from_probe_only,
                parts.local_fidelity,
            )
            if parts.vision_probe
            else None
        )
        # Master weights of everything trained in float32 (optimizer updates at 2e-5 vanish in bf16);
        # the frozen backbone keeps its dtype and autocast runs the matmuls in low precision.
        for param in self.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if gradient_checkpointing:
            scorer.gradient_checkpointing_enable()

    def trainable_parameter_names(self) -> list[str]:
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def vision_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the vision tower, its merger and the `VisionProbe`: those
        the probe's loss trains (with ``vision_probe_only``, the only loss that reaches them)."""
        return [
            param
            for name, param in self.named_parameters()
            if param.requires_grad and (".visual." in f".{name}" or name.startswith("vision_probe."))
        ]

    def gradient_groups(self) -> list[list[nn.Parameter]]:
        """The trainable parameters split by the losses that reach them, for gradient clipping.

        With the vision tower learning from the probe alone, two groups: `vision_parameters` (the
        probe loss only) and everything else (the score losses only); otherwise one. Clipped
        together, the language model's gradients (about 200 times the tower's at the start of
        training from scratch) would set the clipping factor of the tower's updates too.
        """
        trainable = [param for param in self.parameters() if param.requires_grad]
        if self.vision_probe is None or not self.vision_probe.detach_language_model_input:
            return [trainable]
        vision = {id(param) for param in self.vision_parameters()}
        groups = [[p for p in trainable if id(p) in vision], [p for p in trainable if id(p) not in vision]]
        return [group for group in groups if group]

    def forward(
        self,
        pixels: torch.Tensor | list[torch.Tensor],
        compute_ce: bool = True,
        vision_only: bool = False,
        references: torch.Tensor | list[torch.Tensor] | None = None,
        reference_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score a batch and (optionally) compute the answer's cross-entropy.

        Args:
            pixels: float RGB pixels in [0, 1] on the model's device, ``[B, 3, H, W]`` or a list
                of ``[3, H, W]`` (as `qscorer_reward.preprocessing.to_unit_pixels` returns them).
            compute_ce: also compute ``ce_loss`` (training); off for evaluation.
            vision_only: run the vision tower and the `VisionProbe` alone, not the language model
                (a phase that trains only the tower; needs the probe).
            references: with a local-fidelity probe (``TrainableParts.local_fidelity``), the
                undistorted images the ``pixels`` were made from, in the same form (``[R, 3, H, W]``
                or a list of R), each the size of the images it serves.
            reference_index: int64 ``[B]``: which reference each image was made from (default:
                the i-th for image i).

        Returns a dict: ``raw_scores`` (``[B]`` float32, the unbounded regression output the score
        losses read), ``scores`` (``[B]`` float32 in the score range, what inference returns),
        with ``compute_ce`` ``ce_loss`` (0-dim float32), and with a `VisionProbe`
        ``vision_probe_scores`` (``[B]`` float32); with ``vision_only`` only the last. With
        ``references`` also ``local_fidelity`` and ``local_fidelity_target`` (``[tokens, 2]``
        float32, 1..5 scale, every token of every image in order).
        """
        backbone = self.scorer.backbone
        inputs = backbone.prepare(pixels)
        grid = inputs.model_inputs["image_grid_thw"]
        fidelity = {}
        if references is not None:
            if self.vision_probe is None or self.vision_probe.local_fidelity_layers is None:
                raise ValueError("references are for the local-fidelity probe (loss.local_fidelity > 0)")
            fidelity["local_fidelity_target"] = self._local_fidelity_target(pixels, references, reference_index, grid)
        if vision_only:
            if self.vision_probe is None:
                raise ValueError("vision_only needs the vision probe (loss.vision_probe > 0)")
            # The tower as the full forward runs it (dtype cast included); the probe's hook sees it.
            backbone.model.model.get_image_features(inputs.model_inputs["pixel_values"], image_grid_thw=grid)
            if fidelity:
                fidelity["local_fidelity"] = self.vision_probe.token_fidelity()
            return {"vision_probe_scores": self.vision_probe.scores(self._tokens_per_image(grid))} | fidelity
        hidden = backbone(inputs)
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        head = self.scorer.head
        # The head stays in float32 even under autocast: its output is the score.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            raw = head.raw_score(hidden[batch, inputs.score_positions].float())
        low, high = head.score_range
        outputs = {"raw_scores": raw, "scores": soft_clamp(raw, low, high, head.sharpness)}
        if compute_ce:
            outputs["ce_loss"] = self._answer_cross_entropy(hidden, inputs.input_ids, inputs.score_positions)
        if self.vision_probe is not None:
            if fidelity:
                fidelity["local_fidelity"] = self.vision_probe.token_fidelity()
            outputs["vision_probe_scores"] = self.vision_probe.scores(self._tokens_per_image(grid))
        return outputs | fidelity

    def _local_fidelity_target(self, pixels, references, reference_index, grid: torch.Tensor) -> torch.Tensor:
        """``[tokens, 2]`` float32: each token's region's local fidelity (1..5 scale) of the images
        as the tower sees them (resized to the backbone's input size where they are not at it)."""
        config = self.scorer.backbone.config
        region = config.patch_size * config.merge_size
        sizes = [(int(h) * config.patch_size, int(w) * config.patch_size) for _, h, w in grid.tolist()]
        if reference_index is None:
            reference_index = torch.arange(len(sizes))
        if len(set(sizes)) == 1 and all(tuple(image.shape[-2:]) == sizes[0] for image in pixels):
            # All at the input size (the common case): one batched computation.
            images = pixels if isinstance(pixels, torch.Tensor) else torch.stack(list(pixels))
            references = references if isinstance(references, torch.Tensor) else torch.stack(list(references))
            maps = local_fidelity_maps(references, images, region, reference_index.to(images.device))
        else:  # mixed sizes, or resized by the backbone: image by image
            maps = []
            for image, (height, width), which in zip(pixels, sizes, reference_index.tolist()):
                pair = torch.stack([references[which], image])
                if tuple(image.shape[-2:]) != (height, width):
                    pair = resize_antialiased(pair, height, width)
                maps.append(local_fidelity_maps(pair[:1], pair[1:], region)[0])
        # Tokens run row-major over each image's grid of merged regions.
        return torch.cat([1 + 4 * image_maps.flatten(1).T for image_maps in maps])

    def _tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        """How many merged tokens the tower hands the language model per image."""
        return (image_grid_thw.prod(-1) // self.scorer.backbone.config.merge_size**2).tolist()

    def _answer_cross_entropy(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, score_positions: torch.Tensor
    ) -> torch.Tensor:
        """Next-token cross-entropy over the answer prefix's tokens and the K score tokens.

        The token at position t is predicted by the hidden state at t - 1; the answer occupies
        ``score_position - answer_length + 1 .. score_position + K`` in every sample.
        """
        num_score_tokens = self.scorer.config.num_score_tokens
        offsets = torch.arange(-self.answer_length, num_score_tokens, device=hidden.device)
        positions = score_positions.unsqueeze(1) + offsets  # [B, T], the predicting positions
        targets = input_ids.gather(1, positions + 1)
        states = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        logits = self.scorer.backbone.model.get_output_embeddings()(states)
        rows = self.score_token_rows
        score_logits = states @ rows.output_weight.to(states.dtype).T
        logits = logits.index_copy(-1, rows.token_ids, score_logits.to(logits.dtype))
        return score_token_ce_loss(logits, targets)


def answer_token_count(scorer: QScorer, answer_text: str) -> int:
    """How many of the prompt's last tokens are ``answer_text`` (which the template must end with).

    Found by tokenizing the template's text after the image without the answer, which must be a
    prefix of the prompt's tokens: then the rest is the answer, however the tokenizer splits it.
    """
    template_after_image = scorer.config.prompt_template.split("{image}")[1]
    if not template_after_image.endswith(answer_text):
        raise ValueError(f"the prompt template does not end with the answer text {answer_text!r}")
    before = template_after_image[: len(template_after_image) - len(answer_text)]
    before_ids = scorer.tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    suffix_ids = list(scorer.backbone.suffix_ids)
    if suffix_ids[: len(before_ids)] != before_ids:
        raise ValueError(
            f"cannot locate the answer {answer_text!r} in the tokenized prompt: the tokenizer merges it "
            "with the text before it; start answer_text at a word boundary"
        )
    return len(suffix_ids) - len(before_ids)
