"""`TrainingConfig`: everything a score-token fine-tuning run needs, round-tripping YAML and JSON.

Read and written by `qscorer_reward.config_files` (unknown keys refused, naming where they are, e.g.
``train_datasets[0].wieght``; ``KEY=VALUE`` overrides). Paths are used as written: relative ones
are relative to the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qscorer_reward.config import DTYPES, QWEN_PROMPT_TEMPLATE
from qscorer_reward.config_files import config_from_dict, config_to_dict, load_config, save_config

DATASET_FORMATS = ("manifest", "koniq10k", "spaq", "kadid10k", "livec", "agiqa3k", "csiq")
MIXED_PRECISION = ("no", "bf16", "fp16")
METRICS = ("srcc", "plcc", "krcc", "rmse")


@dataclass
class DatasetConfig:
    """One dataset for training or evaluation.

    Attributes:
        name: label in logs and reports (unique within a run).
        path: a manifest file (``format: manifest``) or the folder an official release was unpacked
            into (see `qscorer_reward.training.official`).
        format: ``manifest`` or the official reader's name (`DATASET_FORMATS`).
        split: keep only the records of this split (``train``, ``val``, ``test``); ``None`` keeps all.
        weight: sampling weight among the training datasets (see `MixtureSampler`); give it to all
            training datasets or to none (then every image is seen once per epoch).
        image_root: manifests only: the folder relative image paths start from (default: the
            manifest's folder).
        mos_range: manifests only: ``[low, high]`` of the MOS scale to rescale to 1..5 (default:
            already 1..5).
        test_fraction: for a dataset without an official split, the fraction labelled ``test``
            by a seeded, content-grouped random split (then select it with ``split``).
        split_seed: seed of that random split.
        group_size: training only: every ``group_size`` consecutive records form a group that
            batches keep whole (e.g. an undistorted image and its distorted versions, which the
            ranking losses then compare); the dataset's size must be a multiple of it.
    """

    name: str
    path: str
    format: str = "manifest"
    split: str | None = None
    weight: float | None = None
    image_root: str | None = None
    mos_range: tuple[float, float] | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.format not in DATASET_FORMATS:
            raise ValueError(f"dataset {self.name!r}: format must be one of {DATASET_FORMATS}, got {self.format!r}")
        if self.group_size < 1:
            raise ValueError(f"dataset {self.name!r}: group_size must be >= 1, got {self.group_size}")
        if self.weight is not None and self.weight < 0:
            raise ValueError(f"dataset {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.mos_range is not None:
            self.mos_range = tuple(float(v) for v in self.mos_range)
            if len(self.mos_range) != 2 or not self.mos_range[0] < self.mos_range[1]:
                raise ValueError(f"dataset {self.name!r}: mos_range must be [low, high], got {self.mos_range}")
            if self.format != "manifest":
                raise ValueError(f"dataset {self.name!r}: mos_range is for manifests; official readers know theirs")
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"dataset {self.name!r}: test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class LoraSettings:
    """The LoRA adapter (peft). ``target_modules``: a list of module names matched inside the
    language model's layers only, as the ends of their full names (the released ``[q_proj,
    v_proj]`` for Qwen-VL, ``[q_proj, v_proj.multiway.1]`` for mPLUG-Owl2: its image-modality value
    projection), or a string, a regular expression over the backbone's full module names (peft's
    semantics), e.g. to reach the vision tower too."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LossWeights:
    """Weights of the training objective's terms (formulas in `qscorer_reward.training.losses`).

    The released recipe is MSE + 0.05 x score-token cross-entropy. ``fidelity_std`` is the std
    assumed for an image whose MOS std is unknown; ``ranking_margin`` the hinge margin (MOS units).
    Code can add terms of its own (`qscorer_reward.training.callbacks.TrainerCallback.loss_terms`).
    """

    mse: float = 1.0
    ce: float = 0.05
    plcc: float = 0.0
    fidelity: float = 0.0
    ranking: float = 0.0
    fidelity_std: float = 1.0
    ranking_margin: float = 0.1


@dataclass
class AugmentSettings:
    """Augmentation that leaves quality as it is (off by default, as in the released recipe).

    ``hflip``: mirror half of the images. ``min_crop_side``: crop a random window whose sides are
    at least this fraction of the image's (1.0: no crop); a crop never drops below the backbone's
    pixel budget, so it is never upsampled more than the whole image would be.
    """

    hflip: bool = False
    min_crop_side: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_side <= 1.0:
            raise ValueError(f"min_crop_side must be in (0, 1], got {self.min_crop_side}")


@dataclass
class ParameterGroup:
    """A named part of the trained parameters with its own learning-rate schedule and clipping.

    ``parameters``: shell-style patterns (`fnmatch`) over the names of the training model's
    parameters (`QScorerForTraining.named_parameters`, e.g. ``"scorer.head.*"``,
    ``"*.visual.*"``); a trained parameter belongs to the first group with a matching pattern, and
    a group with no patterns takes every trained parameter no other group takes.
    ``start_step``: the group is frozen for the first ``start_step`` optimizer steps (its
    parameters get no update and no optimizer state), then follows the run's schedule (warm-up and
    decay) over the steps that remain; 0 starts with the run.
    """

    name: str
    parameters: list[str] = field(default_factory=list)
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.start_step < 0:
            raise ValueError(f"parameter group {self.name!r}: start_step must be >= 0, got {self.start_step}")


@dataclass
class TrainingConfig:
    """A score-token fine-tuning run (defaults: the released recipe, see ``docs/training.md``).

    Model: ``base_model`` (hub id or path of a Qwen-VL ``*ForConditionalGeneration``, or the
    paper's mPLUG-Owl2 base as released) gets ``num_score_tokens`` score tokens and a head;
    ``prompt_template`` (default: the family's, see `QScorer.from_base_model`) must end with
    ``answer_text``, whose tokens and the score tokens form the answer the cross-entropy covers.
    ``dtype`` is the backbone's weight dtype; trained weights are kept in float32.
    Trained: the LoRA adapter (``lora``; ``None`` for none), the score-token rows, the head, and
    optionally the vision tower (``train_vision_tower``), its merger (``train_merger``; the visual
    abstractor of mPLUG-Owl2), the output layer (``train_lm_head``) and the language model's layers
    as whole weights (``train_language_model``, for a base trained from scratch; excludes
    ``lora``). ``head_learning_rate`` applies to the head, ``learning_rate`` to everything else.

    ``parameter_groups`` (`ParameterGroup`) split the trained parameters into named groups, each
    clipped to ``max_grad_norm`` on its own and each with its own start: e.g. the head alone
    first, the LoRA adapter from step 500 on. None: one group, clipped as a whole.

    Optimisation: AdamW, ``lr_scheduler`` (a transformers schedule name) with linear warmup over
    ``warmup_ratio`` of the steps, ``num_epochs`` epochs unless ``max_steps`` is set; a step is
    ``per_device_batch_size x gradient_accumulation_steps x processes`` images.
    ``mixed_precision`` (``no`` / ``bf16`` / ``fp16``): ``None`` takes ``accelerate launch``'s.

    Evaluation every ``eval_steps`` optimizer steps (``None``: at each epoch's end) on
    ``eval_datasets``; the best checkpoint by ``metric_for_best`` on ``best_dataset`` (``None``: the
    mean over eval datasets) is kept in ``output_dir/best``. Training state for resuming is saved
    every ``save_steps`` steps to ``output_dir/checkpoints`` (the last ``save_total_limit`` kept).
    """

    base_model: str
    output_dir: str
    train_datasets: list[DatasetConfig]
    eval_datasets: list[DatasetConfig] = field(default_factory=list)
    # model
    num_score_tokens: int = 5
    prompt_template: str | None = None
    answer_text: str = "The quality of the image is"
    min_pixels: int | None = None
    max_pixels: int = 448 * 448
    head_hidden_sizes: list[int] | None = None
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    model_name: str | None = None
    # what is trained, and how
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    train_vision_tower: bool = False
    train_merger: bool = False
    train_lm_head: bool = False
    train_language_model: bool = False
    parameter_groups: list[ParameterGroup] = field(default_factory=list)
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    # optimisation
    num_epochs: float = 3.0
    max_steps: int | None = None
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    head_learning_rate: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None
    gradient_checkpointing: bool = True
    seed: int = 0
    samples_per_epoch: int | None = None
    # data loading
    num_workers: int = 4
    verify_images: bool = True
    # evaluation, checkpoints, logging
    eval_steps: int | None = None
    eval_batch_size: int | None = None
    metric_for_best: str = "srcc"
    best_dataset: str | None = None
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    save_merged: bool = False
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train_datasets:
            raise ValueError("train_datasets must list at least one dataset")
        for group in (self.train_datasets, self.eval_datasets):
            duplicates = sorted({n for n in (d.name for d in group) if [d.name for d in group].count(n) > 1})
            if duplicates:
                raise ValueError(f"dataset names must be unique, repeated: {duplicates}")
        weighted = [spec.weight is not None for spec in self.train_datasets]
        if any(weighted) and not all(weighted):
            raise ValueError("give a sampling weight to every training dataset or to none")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION} or null, got {self.mixed_precision!r}")
        if self.metric_for_best not in METRICS:
            raise ValueError(f"metric_for_best must be one of {METRICS}, got {self.metric_for_best!r}")
        eval_names = [d.name for d in self.eval_datasets]
        if self.best_dataset is not None and self.best_dataset not in eval_names:
            raise ValueError(f"best_dataset {self.best_dataset!r} is not among the eval_datasets {eval_names}")
        # Every family's default prompt ends as the Qwen one does ("... The quality of the image is").
        if not (self.prompt_template or QWEN_PROMPT_TEMPLATE).endswith(self.answer_text):
            raise ValueError(f"prompt_template must end with answer_text {self.answer_text!r}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "num_score_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
        group_size = self.training_group_size()
        if self.per_device_batch_size % group_size:
            raise ValueError(
                f"per_device_batch_size {self.per_device_batch_size} must be a multiple of the training "
                f"datasets' group_size {group_size} (batches hold whole groups)"
            )
        if self.train_language_model and self.lora is not None:
            raise ValueError("train_language_model trains the language model's weights whole: set lora to null")
        self._check_parameter_groups()
        if self.learning_rate <= 0 or (self.head_learning_rate is not None and self.head_learning_rate <= 0):
            raise ValueError("learning rates must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise ValueError("num_epochs must be > 0 unless max_steps is set")

    def training_group_size(self) -> int:
        """How many consecutive training images form a group that batches keep whole (the
        datasets' ``group_size``; 1: no groups). Raises `ValueError` for datasets that differ."""
        sizes = {d.group_size for d in self.train_datasets}
        if len(sizes) > 1:
            raise ValueError(f"training datasets with different group_size {sorted(sizes)} cannot be mixed")
        return sizes.pop()

    def _check_parameter_groups(self) -> None:
        names = [group.name for group in self.parameter_groups]
        if len(set(names)) < len(names):
            raise ValueError(f"parameter group names must be unique, got {names}")
        if sum(not group.parameters for group in self.parameter_groups) > 1:
            raise ValueError("at most one parameter group may leave out its parameters (it takes the rest)")
        if self.parameter_groups and min(group.start_step for group in self.parameter_groups) > 0:
            raise ValueError("some parameter group must start at step 0 (else the first steps train nothing)")
        for group in self.parameter_groups:
            if self.max_steps is not None and group.start_step >= self.max_steps:
                raise ValueError(
                    f"parameter group {group.name!r}: start_step {group.start_step} must be < max_steps "
                    f"{self.max_steps}"
                )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        return config_from_dict(cls, data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (``.yaml`` / ``.yml``) or JSON (otherwise)."""
        save_config(self, path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict | None = None) -> TrainingConfig:
        """Read a YAML or JSON file written by `save` or by hand, with ``overrides`` applied
        (``{"max_steps": 10, "loss.mse": 0.5}``; see `qscorer_reward.config_files`)."""
        return load_config(cls, path, overrides)
