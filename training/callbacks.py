"""`TrainerCallback`: code that extends a `ScoreTokenTrainer` run, e.g. with a training aid.

A callback attaches what a particular recipe needs (an auxiliary head and its loss, a forward pass
that stops early for some steps) without the trainer growing an option for it::

    class TowerFirst(TrainerCallback):
        def on_model_built(self, model):
            model.add_training_aid("probe", Probe(...))      # trains with the model, never exported
        def forward_kwargs(self, step):
            return {"vision_only": step < 500}                # the vision tower alone at first
        def loss_terms(self, outputs, mos, mos_std):
            return {"probe": (1.0, score_mse_loss(outputs["probe_scores"], mos))}

    ScoreTokenTrainer(config, callbacks=[TowerFirst()]).train()

The parameters' own schedules are the config's `ParameterGroup` s (e.g. the language model's
group starting at step 500).
"""

from __future__ import annotations

from typing import Any

import torch


class TrainerCallback:
    """Hooks that `ScoreTokenTrainer` calls; override the ones you need (each default changes nothing).

    `on_model_built` is called once, after the model is built and before the optimizer; then, for
    every micro-batch, `forward_kwargs` before the model's forward pass and `loss_terms` after it.
    """

    def on_model_built(self, model) -> None:
        """Change the training model (`QScorerForTraining`) before training starts, e.g. attach a
        training aid (`QScorerForTraining.add_training_aid`)."""

    def forward_kwargs(self, step: int) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward (`QScorerForTraining.forward`) in the
        micro-batches of optimizer step ``step`` (counted from 0), e.g. ``{"vision_only": True}``."""
        return {}

    def loss_terms(
        self, outputs: dict[str, torch.Tensor], mos: torch.Tensor, mos_std: torch.Tensor
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms to add to the objective, ``{name: (weight, value)}`` with 0-dim ``value`` s, from
        the model's outputs and the batch's MOS ``[B]`` and MOS std ``[B]`` (NaN if unknown);
        each is logged unweighted under ``name``."""
        return {}
