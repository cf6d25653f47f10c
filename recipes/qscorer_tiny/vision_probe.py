"""The vision probe: how qscorer-tiny's vision tower, trained from scratch, learns.

A random language model passes a random vision tower too little signal early on, so the tower
learns from a probe of its own instead: a small head on the mean of each image's tokens as the
tower hands them to the language model. `VisionTowerFirst` attaches it to a `ScoreTokenTrainer`
run as a training aid (trained with the model, never exported) and trains the vision side alone
first::

    trainer = ScoreTokenTrainer(config, callbacks=[VisionTowerFirst(steps=5600, weight=1.0)])

with the config's parameter groups ``vision`` (``["*.visual.*", "training_aids.*"]``, from step 0)
and ``language`` (the rest, from step 5600): for 5600 steps only the tower, its merger and the
probe run and train (about 60% of a full step's cost), then the language model, score token and
head train too, with their own warm-up and schedule, each group's gradients clipped on its own.
The language model receives the tower's output detached, so the tower learns from the probe alone
and the score losses train what reads it.
"""

from __future__ import annotations

import torch
from torch import nn

from qscorer_reward.backbones import BackboneInputs
from qscorer_reward.training.callbacks import TrainerCallback
from qscorer_reward.training.losses import score_mse_loss


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
    how much (an experiment, `vision_probe_experiment.py`).
    """

    def __init__(
        self,
        visual: nn.Module,
        hidden_size: int,
        midpoint: float,
        detach_language_model_input: bool,
        local_fidelity: bool = False,
        merge_size: int = 2,
    ):
        super().__init__()
        self.detach_language_model_input = detach_language_model_input
        self.layers = self._head(hidden_size, 1)
        self.local_fidelity_layers = self._head(hidden_size, 2) if local_fidelity else None
        self.midpoint = midpoint
        self.merge_size = merge_size
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

    def forward(self, inputs: BackboneInputs) -> dict[str, torch.Tensor]:
        """As a training aid (`QScorerForTraining.add_training_aid`): ``vision_probe_scores``
        ``[B]`` of the batch whose tower forward just ran."""
        grid = inputs.model_inputs["image_grid_thw"]
        return {"vision_probe_scores": self.scores((grid.prod(-1) // self.merge_size**2).tolist())}


class VisionTowerFirst(TrainerCallback):
    """Attach a `VisionProbe` (its MSE against the MOS weighted ``weight``) whose tower learns
    from it alone, and run only the vision tower for the first ``steps`` optimizer steps (the
    config's language-side parameter group starts at ``steps``)."""

    def __init__(self, steps: int, weight: float = 1.0):
        self.steps = steps
        self.weight = weight

    def on_model_built(self, model) -> None:
        backbone = model.scorer.backbone.model
        low, high = model.scorer.head.score_range
        probe = VisionProbe(
            backbone.model.visual,
            backbone.config.text_config.hidden_size,
            (low + high) / 2,
            detach_language_model_input=True,
            merge_size=model.scorer.config.merge_size,
        )
        model.add_training_aid("vision_probe", probe)

    def forward_kwargs(self, step: int) -> dict:
        return {"vision_only": step < self.steps}

    def loss_terms(self, outputs, mos, mos_std) -> dict:
        return {"vision_probe": (self.weight, score_mse_loss(outputs["vision_probe_scores"], mos))}
