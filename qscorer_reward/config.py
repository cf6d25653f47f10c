"""`QScorerConfig`: everything needed to rebuild a Q-Scorer around its backbone, as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "qscorer_config.json"
FORMAT_VERSION = 1
# Backbone weight dtypes by name, as configs and the command line give them.
DTYPES = ("float32", "bfloat16", "float16")
# CLIP's pixel statistics, used by the Qwen2-VL and Qwen2.5-VL image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# How the head's output is bounded to `score_range`: smoothly (gradient everywhere), by a hard clamp
# (as the paper's training loss), or not at all (as the paper's evaluation).
SCORE_BOUNDS = ("soft_clamp", "clamp", "none")

# Largest pixel budget accepted: 8192 x 8192, some 85,000 visual tokens at 28 px per token, far
# beyond any vision-language model's context; a larger value is a typo that would make the first
# call try to allocate terabytes.
MAX_PIXEL_BUDGET = 8192 * 8192

# Qwen chat layout; `{image}` is replaced by the vision-start token, the image tokens and the
# vision-end token. The score tokens are appended after the template.
QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>user\n{image}How would you rate the quality of this image?<|im_end|>\n"
    "<|im_start|>assistant\nThe quality of the image is"
)


@dataclass
class QScorerConfig:
    """How a Q-Scorer is built on top of a vision-language backbone.

    Round-trips through JSON (`to_json_file` / `from_json_file`); unknown keys are refused so a
    typo in a hand-written file is an error, not a silently ignored setting.

    Attributes:
        backbone_family: model type of the backbone, e.g. ``"qwen2_5_vl"``.
        base_model: hub id or local path of the backbone the trained parts apply to (``None`` for a
            whole-weights checkpoint built in code).
        prompt_template: the user turn and answer prefix; must contain ``{image}`` once.
        num_score_tokens: K, the number of IQA score tokens appended to the answer (K >= 1).
        score_token_ids: vocabulary ids of the K score tokens once added (filled in when built).
        head_hidden_sizes: widths of the head's hidden layers; ``None`` means ``[h/2, h/4]`` for a
            backbone of hidden width ``h``.
        score_range: ``(low, high)`` of the MOS scale the head regresses; scores lie within it.
        score_bound_sharpness: beta of the smooth clamp that bounds the head output (see
            `qscorer_reward.head.soft_clamp`); larger is closer to a hard clamp.
        score_bound: one of `SCORE_BOUNDS`: ``"soft_clamp"`` (scores lie within `score_range`),
            ``"clamp"`` or ``"none"`` (the raw regression output; `score_range` is then nominal).
        head_centered: the head regresses the offset from the middle of `score_range` (this
            package's heads) rather than the score itself (the released mPLUG-Owl2 head).
        min_pixels / max_pixels: pixel budget of the resized image fed to the vision tower.
        patch_size / merge_size / temporal_patch_size: the vision tower's patching (filled in from
            the backbone).
        image_mean / image_std: per-channel normalisation of pixels in [0, 1].
        weights_format: ``"full"`` (whole model in the checkpoint) or ``"trained_parts"`` (LoRA
            adapter, score-token rows and head on top of `base_model`).
        model_name: a short name shown to users (e.g. by the CLI).
        version: checkpoint format version.
    """

    backbone_family: str
    base_model: str | None = None
    prompt_template: str = QWEN_PROMPT_TEMPLATE
    num_score_tokens: int = 1
    score_token_ids: list[int] = field(default_factory=list)
    head_hidden_sizes: list[int] | None = None
    score_range: tuple[float, float] = (1.0, 5.0)
    score_bound_sharpness: float = 8.0
    score_bound: str = "soft_clamp"
    head_centered: bool = True
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    weights_format: str = "full"
    model_name: str | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.score_range = tuple(float(v) for v in self.score_range)
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.score_token_ids = [int(i) for i in self.score_token_ids]
        if self.num_score_tokens < 1:
            raise ValueError(f"num_score_tokens must be >= 1, got {self.num_score_tokens}")
        if self.prompt_template.count("{image}") != 1:
            raise ValueError("prompt_template must contain the placeholder '{image}' exactly once")
        low, high = self.score_range
        if not low < high:
            raise ValueError(f"score_range must be (low, high) with low < high, got {self.score_range}")
        if self.score_bound not in SCORE_BOUNDS:
            raise ValueError(f"score_bound must be one of {SCORE_BOUNDS}, got {self.score_bound!r}")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
            if not (whole and 0 < value <= MAX_PIXEL_BUDGET):
                raise ValueError(f"{name} must be a whole number of pixels in [1, {MAX_PIXEL_BUDGET}], got {value!r}")
            setattr(self, name, int(value))
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"pixel budget must satisfy 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        if self.weights_format not in ("full", "trained_parts"):
            raise ValueError(f"weights_format must be 'full' or 'trained_parts', got {self.weights_format!r}")
        if self.version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {self.version} is newer than this qscorer-reward understands "
                f"({FORMAT_VERSION}); upgrade the package"
            )

    @property
    def score_tokens(self) -> list[str]:
        """The K score-token strings, ``<score1>`` ... ``<scoreK>``."""
        return [f"<score{i + 1}>" for i in range(self.num_score_tokens)]

    @property
    def resize_factor(self) -> int:
        """Image sides are resized to multiples of this (patch size times merge size)."""
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["score_range"] = list(self.score_range)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> QScorerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QScorerConfig keys: {unknown}")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> QScorerConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a Q-Scorer checkpoint directory must contain {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except TypeError as err:  # a required key is missing
            raise ValueError(f"{path}: {err}") from err
