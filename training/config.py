"""`TrainingConfig`: everything a score-token fine-tuning run needs, round-tripping YAML and JSON.

Unknown keys are refused, naming where they are (``train_datasets[0].wieght``), so a typo in a
hand-written file is an error rather than a silently ignored setting. Paths are used as written:
relative ones are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qscorer_reward.config import QWEN_PROMPT_TEMPLATE

from .synthetic_shard import SyntheticSettings

DATASET_FORMATS = ("manifest", "koniq10k", "spaq", "kadid10k", "livec", "agiqa3k", "csiq")
# Generated rather than read: the samples of `SyntheticIQADataset`, cached as a shard on disk.
SYNTHETIC_FORMAT = "synthetic_iqa"
DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
METRICS = ("srcc", "plcc", "krcc", "rmse")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class DatasetConfig:
    """One dataset for training or evaluation.

    Attributes:
        name: label in logs and reports (unique within a run).
        path: a manifest file (``format: manifest``), the folder an official release was unpacked
            into (see `qscorer_reward.training.official`), or the folder of a synthetic shard
            (``format: synthetic_iqa``, written there when the run starts if it is not there yet).
        format: ``manifest`` or the official reader's name (`DATASET_FORMATS`), or ``synthetic_iqa``
            (`SYNTHETIC_FORMAT`).
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
        synthetic: ``format: synthetic_iqa`` only: the synthetic samples the shard holds
            (`SyntheticSettings`: ``length``, ``seed``, ``size``, ``distortions``...).
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
    synthetic: SyntheticSettings | None = None

    def __post_init__(self) -> None:
        formats = (*DATASET_FORMATS, SYNTHETIC_FORMAT)
        if self.format not in formats:
            raise ValueError(f"dataset {self.name!r}: format must be one of {formats}, got {self.format!r}")
        if (self.format == SYNTHETIC_FORMAT) != (self.synthetic is not None):
            raise ValueError(f"dataset {self.name!r}: format synthetic_iqa needs the synthetic settings, and only it")
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
    language model only (the released ``[q_proj, v_proj]``), or a string, a regular expression
    over the backbone's full module names (peft's semantics), e.g. to reach the vision tower too."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LossWeights:
    """Weights of the training objective's terms (formulas in `qscorer_reward.training.losses`).

    The released recipe is MSE + 0.05 x score-token cross-entropy. ``fidelity_std`` is the std
    assumed for an image whose MOS std is unknown; ``ranking_margin`` the hinge margin (MOS units).

    ``vision_probe``: weight of an auxiliary MSE of a small head on the image tokens' mean (the
    merger's output), for a vision tower trained from scratch: it gives the tower a short gradient
    path while the language model learns to read it. Training only; not part of the checkpoint.
    ``vision_probe_only``: the tower learns from the probe alone (the score losses stop at its
    output, training the language model, score token and head on top of it); the two parts'
    gradients are then clipped separately (`QScorerForTraining.gradient_groups`).
    ``local_fidelity``: weight of a dense auxiliary MSE beside the probe: a second small head
    predicts, for every image token, the local SSIM and colour fidelity of its region against the
    undistorted image (`qscorer_reward.training.local_fidelity`); needs ``vision_probe`` and a
    ``reference`` for every training record (a grouped synthetic shard has them). Training only.
    """

    mse: float = 1.0
    ce: float = 0.05
    plcc: float = 0.0
    fidelity: float = 0.0
    ranking: float = 0.0
    vision_probe: float = 0.0
    vision_probe_only: bool = False
    local_fidelity: float = 0.0
    fidelity_std: float = 1.0
    ranking_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.vision_probe_only and not self.vision_probe:
            raise ValueError("loss.vision_probe_only needs a loss.vision_probe weight > 0 (the tower learns from it)")
        if self.local_fidelity and not self.vision_probe:
            raise ValueError("loss.local_fidelity needs a loss.vision_probe weight > 0 (its head is the probe's)")


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
class TrainingConfig:
    """A score-token fine-tuning run (defaults: the released recipe, see ``docs/training.md``).

    Model: ``base_model`` (hub id or path of a Qwen-VL ``*ForConditionalGeneration``) gets
    ``num_score_tokens`` score tokens and a head; ``prompt_template`` must end with
    ``answer_text``, whose tokens and the score tokens form the answer the cross-entropy covers.
    ``dtype`` is the backbone's weight dtype; trained weights are kept in float32.
    Trained: the LoRA adapter (``lora``; ``None`` for none), the score-token rows, the head, and
    optionally the vision tower (``train_vision_tower``), its merger (``train_merger``) and the
    language model's layers as whole weights (``train_language_model``, for a base trained from
    scratch; excludes ``lora``). ``head_learning_rate`` applies to the head, ``learning_rate`` to
    everything else.

    ``vision_tower_steps`` (with ``loss.vision_probe_only``): the first this many optimizer steps
    run and train only the vision tower, its merger and the vision probe, without the language
    model (for the default model's base about 60% of a full step's cost); the language model,
    score token and head train from then on, with their own warm-up and schedule over the
    remaining steps, while the vision side's schedule spans the whole run. Single process or DDP.

    Optimisation: ``optimizer`` (``"adamw"``, or ``"muon"``: `MuonWithAdamW`, Muon for the hidden
    weight matrices and AdamW for the rest, at the same learning rates), ``lr_scheduler`` (a
    transformers schedule name) with linear warmup over ``warmup_ratio`` of the steps,
    ``num_epochs`` epochs unless ``max_steps`` is set; a step is ``per_device_batch_size x
    gradient_accumulation_steps x processes`` images.
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
    prompt_template: str = QWEN_PROMPT_TEMPLATE
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
    train_language_model: bool = False
    vision_tower_steps: int = 0
    loss: LossWeights = field(default_factory=LossWeights)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    # optimisation
    num_epochs: float = 3.0
    max_steps: int | None = None
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    optimizer: str = "adamw"
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
        if not self.prompt_template.endswith(self.answer_text):
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
                f"per_device_batch_size {self.per_device_batch_size} must be a multiple of the synthetic "
                f"group_size {group_size} (batches hold whole groups)"
            )
        if self.train_language_model and self.lora is not None:
            raise ValueError("train_language_model trains the language model's weights whole: set lora to null")
        if self.vision_tower_steps < 0:
            raise ValueError(f"vision_tower_steps must be >= 0, got {self.vision_tower_steps}")
        if self.vision_tower_steps:
            if not self.loss.vision_probe_only:
                raise ValueError(
                    "vision_tower_steps trains the vision tower from the vision probe alone: "
                    "set loss.vision_probe > 0 and loss.vision_probe_only: true"
                )
            if not (self.train_vision_tower or self.train_merger):
                raise ValueError(
                    "vision_tower_steps needs train_vision_tower or train_merger (the vision side it trains)"
                )
            if self.max_steps is not None and self.vision_tower_steps >= self.max_steps:
                raise ValueError(f"vision_tower_steps {self.vision_tower_steps} must be < max_steps {self.max_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.learning_rate <= 0 or (self.head_learning_rate is not None and self.head_learning_rate <= 0):
            raise ValueError("learning rates must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_epochs <= 0 and self.max_steps is None:
            raise ValueError("num_epochs must be > 0 unless max_steps is set")

    def training_group_size(self) -> int:
        """How many consecutive training images form a group that batches keep whole: the
        synthetic shards' ``group_size`` (1: no groups). Raises `ValueError` for a mixture."""
        sizes = {d.synthetic.group_size if d.synthetic is not None else 1 for d in self.train_datasets}
        if len(sizes) > 1:
            raise ValueError("training datasets with synthetic group_size > 1 cannot be mixed with others")
        return sizes.pop()

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        return _build(cls, data, "")

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml`` / ``.yml``) or JSON (otherwise)."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainingConfig:
        """Read a YAML or JSON file written by `save` or by hand."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # yaml.YAMLError or json.JSONDecodeError, with the position in the file
            raise ValueError(f"{path}: cannot parse ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err


def _plain(value):
    """Tuples as lists, recursively (YAML and JSON have lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, data, where: str):
    """``cls(**data)`` with nested dataclasses built from dicts and unknown keys refused."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required setting is missing
        raise ValueError(f"{where or 'config'}: {err}") from err


def _convert(hint, value, where: str):
    if value is None:
        return None
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option):
            return _build(option, value, f"{where}.")
        if (
            typing.get_origin(option) is list
            and typing.get_args(option)
            and dataclasses.is_dataclass(typing.get_args(option)[0])
        ):
            if not isinstance(value, list):
                raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
            item = typing.get_args(option)[0]
            return [_build(item, entry, f"{where}[{index}].") for index, entry in enumerate(value)]
    return value
