"""Training a Q-Scorer on pairwise image preferences with TRL's ``RewardTrainer`` machinery.

TRL's ``RewardTrainer`` trains text reward models (a sequence classifier over tokenised chosen /
rejected texts). `QScorerRewardTrainer` keeps its training loop, Bradley-Terry objective, metrics
and logging, and swaps what is text-specific for images: the dataset holds image pairs, the
collator turns them into pixels, the model is a `QScorer` whose regressed score is the reward, and
checkpoints are Q-Scorer checkpoints that `QScorer.from_pretrained` loads.

Dataset (a ``datasets.Dataset``), one row per comparison:

- ``chosen``, ``rejected``: the preferred and the other image (PIL, e.g. a ``datasets.Image()``
  column; a file path; an HWC numpy array; a ``[3, H, W]`` tensor).
- ``margin`` (optional): how many score points (MOS scale) ``chosen`` should be ahead by.
- ``prompt`` (optional, e.g. the text-to-image prompt of both images) and other columns are
  accepted and dropped: Q-Scorer rates image quality with its own fixed instruction.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qscorer_reward.extras import missing_extra

try:
    from datasets import Dataset, IterableDataset
    from trl import RewardConfig, RewardTrainer
    from trl.data_utils import get_dataset_column_names
    from trl.trainer.base_trainer import _BaseTrainer
    from trl.trainer.utils import disable_dropout_in_model
except ModuleNotFoundError as err:
    raise missing_extra("trl", __name__) from err

from qscorer_reward.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    HEAD_FILE,
    SCORE_TOKENS_FILE,
    has_lora,
    lasting_base,
)
from qscorer_reward.config import CONFIG_NAME
from qscorer_reward.preprocessing import to_unit_pixels
from qscorer_reward.scorer import QScorer

from .losses import fidelity as probability_fidelity
from .losses import thurstone_probability

# Checkpoint files a new save replaces; anything else in the directory (Trainer state, other
# checkpoints, a model card) is left alone.
CHECKPOINT_FILE_PATTERNS = (
    CONFIG_NAME,
    HEAD_FILE,
    SCORE_TOKENS_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
)


@dataclass
class QScorerRewardConfig(RewardConfig):
    """`RewardConfig` for `QScorerRewardTrainer`, with the terms of the pairwise loss.

    The loss on a pair with scores ``s_c`` (chosen) and ``s_r`` (rejected) on the MOS scale and
    margin ``m`` (0 without a ``margin`` column), ``d = s_c - s_r - m``::

        loss = -log sigmoid(bradley_terry_scale * d)                                 # Bradley-Terry
             + fidelity_weight * (1 - sqrt(Phi(d / (sqrt(2) * fidelity_score_std)))) # Thurstone fidelity

    Parameters:
        bradley_terry_scale: logit per score point of the Bradley-Terry model. Scores lie in the
            scorer's range (1..5), so the logit is bounded by ``4 * bradley_terry_scale``.
        fidelity_weight: weight of the Thurstone fidelity term (as in DeQA-Score's pairwise
            fidelity loss, with the chosen image preferred with probability 1); 0 turns it off.
        fidelity_score_std: standard deviation (score points) of an image's perceived quality in
            the Thurstone model (Case V: equal for both images).

    From `RewardConfig`: ``model_init_kwargs`` go to `QScorer.from_pretrained` when the trainer is
    given a checkpoint path; ``activation_checkpointing`` (default on) is applied by the trainer with
    `QScorer.gradient_checkpointing_enable`, which then clears the flag in the config (transformers'
    ``Trainer`` would call the model's method with arguments it does not take); ``bf16`` defaults to
    on only on a CUDA GPU that supports it (TRL's default, on everywhere, fails on a CPU);
    ``center_rewards_coefficient`` is refused (scores are on the MOS scale, not centred on 0); the
    text-only fields (``max_length``, ``eos_token``, ``chat_template_path``, ``pad_token``,
    ``dataset_num_proc``) do not apply to image pairs and are ignored.
    """

    bradley_terry_scale: float = field(
        default=1.0, metadata={"help": "Bradley-Terry logit per score point (MOS scale)."}
    )
    fidelity_weight: float = field(
        default=0.0, metadata={"help": "Weight of the Thurstone fidelity term; 0 turns it off."}
    )
    fidelity_score_std: float = field(
        default=1.0, metadata={"help": "Standard deviation (score points) of perceived quality in the Thurstone model."}
    )
    # TRL's default (checkpointing on) is set under transformers' deprecated name, which warns on
    # every config; the same default is given here under the current name, unless either is passed.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (default: on, as in TRL)."},
    )

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bfloat16 mixed precision (default: on a CUDA GPU that supports it, else off)."},
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.bf16 is None:  # TRL turns it on everywhere, which a CPU-only machine refuses
            self.bf16 = not (self.fp16 or self.use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        if self.bradley_terry_scale <= 0:
            raise ValueError(f"bradley_terry_scale must be > 0, got {self.bradley_terry_scale}")
        if self.fidelity_weight < 0:
            raise ValueError(f"fidelity_weight must be >= 0, got {self.fidelity_weight}")
        if self.fidelity_score_std <= 0:
            raise ValueError(f"fidelity_score_std must be > 0, got {self.fidelity_score_std}")


def bradley_terry_loss(difference: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean of ``-log sigmoid(scale * difference)`` over ``[B]`` score differences (chosen minus
    rejected, minus the margin); a scalar."""
    return -F.logsigmoid(scale * difference).mean()


def thurstone_fidelity_loss(difference: torch.Tensor, score_std: float = 1.0) -> torch.Tensor:
    """Fidelity loss of the preference probability of ``difference`` = chosen minus rejected scores
    ``[B]``, against certainty that the chosen image is better; a scalar in [0, 1].

    Thurstone case V with the same std for every image: the difference has std ``sqrt(2) * score_std``.
    """
    probability = thurstone_probability(difference, math.sqrt(2) * score_std)
    return probability_fidelity(probability, torch.ones_like(probability))


@dataclass
class ImagePairCollator:
    """Collate ``{"chosen": image, "rejected": image, "margin"?: float}`` rows into one batch.

    Returns ``{"margin": [B] float32, "images": ...}``: ``images`` holds the ``B`` chosen images
    followed by the ``B`` rejected ones, float32 RGB in [0, 1], as one ``[2B, 3, H, W]`` tensor when
    all have the same size, else as a list of ``[3, H, W]`` tensors. ``margin`` is 0 where the
    dataset has none.

    Args:
        input_range: value range of float image arrays/tensors in the dataset.
    """

    input_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, margins = [], [], []
        for index, example in enumerate(examples):
            missing = [key for key in ("chosen", "rejected") if example.get(key) is None]
            if missing:
                raise ValueError(f"example {index} has no {' / '.join(missing)} image; its keys are {sorted(example)}")
            chosen.append(self._pixels(example["chosen"], f"chosen image of example {index}"))
            rejected.append(self._pixels(example["rejected"], f"rejected image of example {index}"))
            margins.append(float(example.get("margin") or 0.0))
        images = chosen + rejected
        if len({tuple(image.shape) for image in images}) == 1:
            images = torch.stack(images)
        return {"margin": torch.tensor(margins, dtype=torch.float32), "images": images}

    def _pixels(self, image: Any, where: str) -> torch.Tensor:
        try:
            return to_unit_pixels([image], self.input_range)[0]
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err


class QScorerRewardTrainer(RewardTrainer):
    """Train a `QScorer` on pairwise image preferences (a `trl.RewardTrainer` for images).

    Example::

        from peft import LoraConfig
        from qscorer_reward import QScorer
        from qscorer_reward.training.pairwise import QScorerRewardConfig, QScorerRewardTrainer

        scorer = QScorer.from_pretrained("my-qscorer", merge_lora=False)
        trainer = QScorerRewardTrainer(
            model=scorer,
            args=QScorerRewardConfig(output_dir="qscorer-prefs", learning_rate=2e-5, fidelity_weight=0.5),
            train_dataset=pairs["train"],   # columns chosen, rejected (images), optional margin
            eval_dataset=pairs["test"],
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        trainer.save_model()                # a Q-Scorer checkpoint: QScorer.from_pretrained("qscorer-prefs")

    What is trained: given a scorer that already carries a LoRA adapter (a trained-parts checkpoint
    loaded with ``merge_lora=False``), that adapter and the score head, with or without
    ``peft_config`` (a checkpoint holds one adapter; a warning says so when ``peft_config`` differs);
    else with ``peft_config`` (a ``peft.LoraConfig``), its new LoRA adapter and the head; otherwise
    every weight of the scorer.

    Checkpoints: with a LoRA adapter, ``weights_format="trained_parts"`` on top of the scorer's base
    (`QScorer.trained_parts_base`: the whole-weights checkpoint it was loaded from, else
    ``scorer.config.base_model``); a scorer whose adapter was merged in at load, or whose base the
    checkpoints would outlive (`qscorer_reward.checkpoint.lasting_base`), is refused here, before
    training. Without an adapter, ``"full"``. Evaluation reports ``eval_accuracy``, the fraction of
    held-out pairs whose chosen image scores higher, and ``eval_margin``, the mean score difference.

    Args:
        model: a `QScorer`, or a checkpoint path / hub id loaded with `QScorer.from_pretrained`
            (``merge_lora=False``, plus ``args.model_init_kwargs``).
        args: a `QScorerRewardConfig`.
        data_collator: default `ImagePairCollator`.
        train_dataset / eval_dataset: datasets of image pairs (see the module docstring);
            ``eval_dataset`` may be a dict of them.
        compute_metrics: called with ``EvalPrediction(predictions=(chosen_scores, rejected_scores))``.
        peft_config: a ``peft.LoraConfig`` (injected into the backbone with ``peft.inject_adapter_in_model``).
        callbacks / optimizers / optimizer_cls_and_kwargs: as for `transformers.Trainer`.
    """

    _tag_names = ["trl", "reward-trainer", "qscorer"]
    _name = "Q-Scorer Reward"

    def __init__(
        self,
        model: QScorer | str | os.PathLike,
        args: QScorerRewardConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        peft_config=None,
    ):
        args = args if args is not None else QScorerRewardConfig("qscorer-reward")
        if not isinstance(args, QScorerRewardConfig):
            raise TypeError(f"args must be a QScorerRewardConfig, got {type(args).__name__}")
        if args.center_rewards_coefficient is not None:
            raise ValueError(
                "center_rewards_coefficient is not supported: Q-Scorer scores are on the MOS scale (1..5), "
                "and centring them on 0 would push every score to the bottom of the range"
            )
        if train_dataset is None:
            raise ValueError("train_dataset is required")

        if isinstance(model, (str, os.PathLike)):
            load_kwargs = {"merge_lora": False, "trust_remote_code": args.trust_remote_code}
            model = QScorer.from_pretrained(model, **{**load_kwargs, **(args.model_init_kwargs or {})})
        elif not isinstance(model, QScorer):
            raise TypeError(f"model must be a QScorer or a checkpoint path, got {type(model).__name__}")
        self.weights_format = prepare_for_training(model, peft_config)
        if self.weights_format == "trained_parts":  # a base the checkpoints cannot name: refused now, not at a save
            lasting_base(model.trained_parts_base, args.output_dir)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        if args.activation_checkpointing:
            model.gradient_checkpointing_enable()
            # Done here: transformers' Trainer would call the model's checkpointing method with
            # arguments a QScorer does not take.
            args.activation_checkpointing = args.gradient_checkpointing = False

        train_dataset = self._prepare_dataset(train_dataset, None, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {key: self._prepare_dataset(data, None, args, key) for key, data in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, None, args, "eval")

        # RewardTrainer.__init__ loads and tokenises for a text sequence classifier; its own parent
        # sets up the training loop, which is all an image scorer needs.
        _BaseTrainer.__init__(
            self,
            model=model,
            args=args,
            data_collator=data_collator if data_collator is not None else ImagePairCollator(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=None,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        # Evaluation calls compute_loss (for the accuracy) when can_return_loss is set and there
        # are no label columns.
        self.can_return_loss = True
        self.label_names = []
        self.maybe_activation_offload_context = _activation_offload_context(self.model, args)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _send_telemetry(self):
        # TRL's usage ping reads a transformers model config (model_type), which a QScorer does
        # not have; it would report this trainer as "other" anyway.
        pass

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Check that ``dataset`` holds image pairs; the images are decoded by the collator."""
        if not isinstance(dataset, (Dataset, IterableDataset)):
            raise TypeError(f"the {dataset_name} dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        columns = get_dataset_column_names(dataset)
        missing = [name for name in ("chosen", "rejected") if name not in columns]
        if missing:
            raise ValueError(
                f"the {dataset_name} dataset has no column {' / '.join(map(repr, missing))}: image preference pairs "
                f"need 'chosen' and 'rejected' image columns (and optionally 'margin'); it has {columns}"
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen", "rejected", "margin"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args = self.args
        scores = model(inputs["images"])
        chosen, rejected = scores.chunk(2)
        difference = chosen - rejected - inputs["margin"]
        loss = bradley_terry_loss(difference, args.bradley_terry_scale)
        if args.fidelity_weight > 0:
            fidelity = thurstone_fidelity_loss(difference, args.fidelity_score_std)
            loss = loss + args.fidelity_weight * fidelity

        with torch.no_grad():
            metrics = self._metrics[mode]
            # Per pair, so that the logged accuracy is exact over any number of batches.
            correct = self.accelerator.gather_for_metrics((chosen > rejected).float())
            metrics["accuracy"].extend(correct.tolist())
            for name, value in (("margin", chosen - rejected), ("chosen_score", chosen), ("rejected_score", rejected)):
                metrics[name].append(self.accelerator.gather_for_metrics(value.mean()).mean().item())
            if args.fidelity_weight > 0:
                metrics["fidelity_loss"].append(self.accelerator.gather_for_metrics(fidelity).mean().item())

        outputs = {"chosen_scores": chosen, "rejected_scores": rejected}
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Write a Q-Scorer checkpoint into ``output_dir`` (Trainer's hook for every save)."""
        if not self.args.should_save:
            return
        scorer = self.accelerator.unwrap_model(self.model)
        save_into(scorer, Path(output_dir if output_dir is not None else self.args.output_dir), self.weights_format)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Restore the weights saved by `_save` (for ``resume_from_checkpoint``)."""
        model = model if model is not None else self.model
        saved = QScorer.from_pretrained(resume_from_checkpoint, merge_lora=False, dtype=model.dtype)
        self.accelerator.unwrap_model(model).load_state_dict(saved.state_dict())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def prepare_for_training(scorer: QScorer, peft_config=None) -> str:
    """Mark what `QScorerRewardTrainer` trains as trainable (see its docstring) and return the
    checkpoint ``weights_format`` that keeps it: ``"trained_parts"`` with LoRA, else ``"full"``."""
    backbone = scorer.backbone.model
    if peft_config is not None:
        from peft import LoraConfig, inject_adapter_in_model

        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
        if peft_config.modules_to_save:
            raise ValueError(
                "peft_config.modules_to_save is not supported: Q-Scorer checkpoints keep a LoRA adapter, the "
                "score-token rows and the head (always trained); list other layers in target_modules"
            )
        if has_lora(backbone):
            _warn_if_adapter_differs(backbone, peft_config)  # the scorer's own adapter trains on
        else:
            inject_adapter_in_model(peft_config, backbone)
    if has_lora(backbone):
        if scorer.adapter_merged:
            raise ValueError(
                "this scorer's LoRA adapter was merged into its weights when it was loaded, so a LoRA checkpoint on "
                "top of its base model cannot hold it: load it with QScorer.from_pretrained(..., merge_lora=False) "
                "to go on training its adapter, or train it without peft_config (whole weights)"
            )
        if not scorer.trained_parts_base:
            raise ValueError(
                "LoRA training saves checkpoints as weights_format='trained_parts', on top of config.base_model, "
                "but this scorer has none: build it with QScorer.from_base_model(path_or_hub_id) or set "
                "scorer.config.base_model to the directory or hub id of its backbone"
            )
        for name, param in scorer.named_parameters():
            param.requires_grad_("lora_" in name)
        weights_format = "trained_parts"
    else:
        scorer.requires_grad_(True)
        weights_format = "full"
    scorer.head.requires_grad_(True)
    return weights_format


def _warn_if_adapter_differs(backbone: nn.Module, peft_config) -> None:
    """Warn when ``peft_config`` asks for another adapter than the one ``backbone`` carries (another
    rank or scale, or other modules), which is trained instead: a checkpoint holds one adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    (existing,) = backbone.peft_config.values()
    modules = dict(backbone.named_modules())
    wrapped = {name for name, module in modules.items() if isinstance(module, BaseTunerLayer)}
    inside = tuple(f"{name}." for name in wrapped)  # the adapter's own layers
    asked = {name for name in modules if not name.startswith(inside) and check_target_module_exists(peft_config, name)}
    if (existing.r, existing.lora_alpha, wrapped) == (peft_config.r, peft_config.lora_alpha, asked):
        return

    def describe(config, names):
        kinds = ", ".join(sorted({name.rpartition(".")[2] for name in names}))
        return f"r={config.r}, lora_alpha={config.lora_alpha}, on {len(names)} modules ({kinds})"

    warnings.warn(
        f"the scorer already carries a LoRA adapter ({describe(existing, wrapped)}), which is trained on; "
        f"peft_config ({describe(peft_config, asked)}) is not applied: a checkpoint holds one adapter. "
        "For a new adapter, start from a checkpoint without one",
        UserWarning,
        stacklevel=4,
    )


def save_into(scorer: QScorer, directory: Path, weights_format: str) -> None:
    """Save ``scorer`` into ``directory``, replacing an earlier checkpoint there but keeping every
    other file (a training run's ``checkpoint-*`` folders, optimizer state, model card).

    The checkpoint is written whole to a staging folder first; only then are the earlier
    checkpoint's files removed and the new ones moved in, the config last, so the directory never
    holds a config pointing at missing weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qscorer-save-", dir=directory) as staging:
        saved = Path(staging) / "checkpoint"
        scorer.save_pretrained(saved, weights_format=weights_format)
        for pattern in CHECKPOINT_FILE_PATTERNS:
            for stale in directory.glob(pattern):
                stale.unlink()
        for path in sorted(saved.iterdir(), key=lambda path: path.name == CONFIG_NAME):
            shutil.move(str(path), directory / path.name)


def _activation_offload_context(model: nn.Module, args: QScorerRewardConfig):
    """RewardTrainer's activation offloading context for ``training_step``, or a no-op one."""
    if not args.activation_offloading:
        return contextlib.nullcontext()
    from trl.models import get_act_offloading_ctx_manager

    return get_act_offloading_ctx_manager(model=model)
