"""`QScorer`: images in, differentiable quality scores out."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, BackboneInputs, backbone_class
from .checkpoint import backbone_tensors, load_checkpoint, lora_adapter, write_checkpoint
from .config import CLIP_MEAN, CLIP_STD, QWEN_PROMPT_TEMPLATE, SCORE_BOUNDS, QScorerConfig
from .head import ScoreHead
from .official_checkpoint import is_released_base, is_released_layout, load_official, load_official_base
from .preprocessing import DEFAULT_MAX_IMAGE_PIXELS, ImageInput
from .score_tokens import add_score_tokens, get_score_token_rows


class QScorer(nn.Module):
    """Q-Scorer image-quality model: a vision-language backbone, IQA score tokens and a regression head.

    Call it on images to get one score per image::

        scorer = QScorer.from_pretrained()            # the bundled default checkpoint
        scores = scorer(images)                       # [B] float32, higher is better

    ``images``: a float tensor ``[B, 3, H, W]`` or ``[3, H, W]`` in [0, 1] (or ``input_range``), a
    uint8 tensor, PIL image(s), path(s), numpy HWC arrays, or a list mixing them. Paths and PIL
    images are read upright (EXIF orientation), by their mode's real range and reduced to
    ``backbone.decode_pixel_budget`` right after decoding (see `preprocessing.open_image`).
    Scores lie in `score_range` (MOS scale, 1..5). With grad enabled and a float tensor input, the
    scores are differentiable with respect to the pixels; without anything to differentiate (frozen
    weights and no input requiring grad) the call runs without building a graph.

    After `from_pretrained` all weights are frozen and the model is in eval mode (a reward model);
    training code unfreezes what it trains.
    """

    lower_better = False
    # Scores carry gradients to tensor pixels (a `RemoteQScorer`'s do not; see `require_gradients`).
    differentiable = True

    def __init__(self, config: QScorerConfig, backbone: Backbone, head: ScoreHead, tokenizer=None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
        # Set when a LoRA adapter was merged into the base weights at load: the trained parts can
        # then no longer be saved apart from the base model.
        self.adapter_merged = False
        # Set at load, for trained-parts saves: the backbone tensors the checkpoint held whole (saved
        # again), and the whole-weights checkpoint the backbone came from (the base of such a save).
        self.trained_module_names: tuple[str, ...] = ()
        self.whole_weights_source: str | None = None
        self._gradient_checkpointing = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base_model(
        cls,
        model: str | os.PathLike | nn.Module,
        tokenizer=None,
        *,
        num_score_tokens: int = 1,
        prompt_template: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        head_hidden_sizes: list[int] | None = None,
        score_range: tuple[float, float] = (1.0, 5.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
    ) -> QScorer:
        """A new, untrained Q-Scorer on a vision-language model (a hub id, a local path, or a loaded
        transformers ``*ForConditionalGeneration`` with its ``tokenizer``).

        Adds the K score tokens (input and output rows at the mean of the existing rows) and a fresh
        head. Pixel budget and normalisation default to the model's ``preprocessor_config.json``
        when loading from a path, else to the Qwen2-VL processor's values, with ``max_pixels`` at
        448 x 448 as in the paper's recipe. ``prompt_template`` defaults to `QWEN_PROMPT_TEMPLATE`.

        The paper's base, ``MAGAer13/mplug-owl2-llama2-7b`` (or a local copy), is read as released
        (`qscorer_reward.official_checkpoint.load_official_base`): its prompt defaults to the
        paper's evaluation prompt, its images have the vision tower's fixed size (the pixel
        arguments do not apply), and the head is the release's (unbounded, uncentred).
        """
        if isinstance(model, (str, os.PathLike)) and is_released_base(model):
            loaded = load_official_base(
                model,
                num_score_tokens=num_score_tokens,
                prompt_template=prompt_template,
                head_hidden_sizes=head_hidden_sizes,
                dtype=dtype,
            )
            scorer = cls.assemble(loaded.config, loaded.model, loaded.tokenizer, loaded.head)
            return scorer.to(device) if device is not None else scorer
        processor_config: dict = {}
        base_model = None
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForImageTextToText, AutoTokenizer

            base_model = str(model)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                base_model, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
            processor_config = _read_processor_config(base_model)
        elif tokenizer is None:
            raise ValueError("a tokenizer is required when passing a model object")
        elif dtype is not None:
            model = model.to(dtype)

        family = model.config.model_type
        vision = model.config.vision_config
        budget = processor_config.get("size", {})
        config = QScorerConfig(
            backbone_family=family,
            base_model=base_model or getattr(model.config, "_name_or_path", None) or None,
            prompt_template=prompt_template or QWEN_PROMPT_TEMPLATE,
            num_score_tokens=num_score_tokens,
            score_range=score_range,
            min_pixels=min_pixels or processor_config.get("min_pixels") or budget.get("shortest_edge") or 56 * 56,
            max_pixels=max_pixels or 448 * 448,
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
            image_mean=image_mean or processor_config.get("image_mean") or CLIP_MEAN,
            image_std=image_std or processor_config.get("image_std") or CLIP_STD,
        )
        config.score_token_ids = add_score_tokens(model, tokenizer, config.score_tokens)
        hidden_size = model.get_input_embeddings().weight.shape[1]
        config.head_hidden_sizes = head_hidden_sizes
        head = ScoreHead.from_config(hidden_size, config)
        config.head_hidden_sizes = head.hidden_sizes
        scorer = cls.assemble(config, model, tokenizer, head)
        return scorer.to(device) if device is not None else scorer

    @classmethod
    def assemble(cls, config: QScorerConfig, model: nn.Module, tokenizer, head: ScoreHead) -> QScorer:
        """Wire a loaded backbone model, its tokenizer (with score tokens) and a head together."""
        if model.config.model_type != config.backbone_family:
            raise ValueError(
                f"backbone model type {model.config.model_type!r} does not match the config's "
                f"backbone_family {config.backbone_family!r}"
            )
        ids = tokenizer.convert_tokens_to_ids(config.score_tokens)
        if ids != config.score_token_ids:
            raise ValueError(
                f"the tokenizer maps the score tokens {config.score_tokens} to ids {ids}, but the "
                f"checkpoint was trained with ids {config.score_token_ids}"
            )
        family = backbone_class(config.backbone_family)
        backbone = family(model, config, tokenizer)
        return cls(config, backbone, head, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        merge_lora: bool = True,
        base_model: str | os.PathLike | None = None,
        score_bound: str | None = None,
    ) -> QScorer:
        """Load a Q-Scorer checkpoint (see `qscorer_reward.checkpoint`); no ``path`` loads the
        bundled default. Weights come back frozen, the model in eval mode.

        Args:
            path: checkpoint directory or hub id.
            device: where to put the model (default CPU).
            dtype: backbone weight dtype, e.g. ``torch.bfloat16``; the head stays float32.
            attn_implementation: transformers attention backend (``"sdpa"``, ``"flash_attention_2"``...).
            trust_remote_code: only for base models that need it; never set implicitly.
            merge_lora: merge a LoRA adapter into the base weights (fastest for scoring).
            base_model: with a checkpoint in the paper's released layout (``2kxx/Qscorer_lora_5_1``
                or a local copy), its base model (``MAGAer13/mplug-owl2-llama2-7b`` or a local copy);
                see `qscorer_reward.official_checkpoint`. Its LoRA is always merged.
            score_bound: override the checkpoint's `QScorerConfig.score_bound`, e.g.
                ``"soft_clamp"`` to keep an unbounded model's rewards within `score_range`.
        """
        if base_model is not None or is_released_layout(path):
            loaded = load_official(path, base_model, dtype=dtype)
        else:
            loaded = load_checkpoint(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                merge_lora=merge_lora,
            )
        scorer = cls.assemble(loaded.config, loaded.model, loaded.tokenizer, loaded.head)
        scorer.adapter_merged = loaded.adapter_merged
        scorer.trained_module_names = loaded.trained_module_names
        scorer.whole_weights_source = loaded.whole_weights_source
        if score_bound is not None:
            scorer.set_score_bound(score_bound)
        scorer.requires_grad_(False).eval()
        return scorer.to(device) if device is not None else scorer

    def save_pretrained(self, path: str | os.PathLike, weights_format: str | None = None) -> None:
        """Write a checkpoint directory; ``weights_format`` ``"full"`` or ``"trained_parts"``
        (default: the config's). Loading it back gives the same scores; see `qscorer_reward.checkpoint`.

        ``"trained_parts"`` of a scorer loaded from a whole-weights checkpoint names that checkpoint
        as its base; of one loaded from trained parts, it keeps the tensors those held whole."""
        config = dataclasses.replace(self.config, weights_format=weights_format or self.config.weights_format)
        model = self.backbone.model
        if config.weights_format == "full":
            parts = {"backbone": model}
        else:
            if self.adapter_merged:
                raise ValueError(
                    "this scorer's LoRA adapter was merged into the base weights when it was loaded, so the trained "
                    "parts can no longer be told apart: save weights_format='full', or load with merge_lora=False"
                )
            config.base_model = self.trained_parts_base
            parts = {
                "score_token_rows": get_score_token_rows(model, config.score_token_ids),
                "adapter": lora_adapter(model),
                "trained_modules": backbone_tensors(model, self.trained_module_names),
            }
        write_checkpoint(path, config, self.head.state_dict(), self.tokenizer, **parts)

    def set_score_bound(self, score_bound: str) -> None:
        """How scores are bounded from now on: ``"soft_clamp"``, ``"clamp"`` or ``"none"``
        (`QScorerConfig.score_bound`; saved with the checkpoint)."""
        if score_bound not in SCORE_BOUNDS:
            raise ValueError(f"score_bound must be one of {SCORE_BOUNDS}, got {score_bound!r}")
        self.config.score_bound = self.head.bound = score_bound

    # ------------------------------------------------------------------ properties

    @property
    def trained_parts_base(self) -> str | None:
        """The base a ``"trained_parts"`` save names: the whole-weights checkpoint this scorer was
        loaded from, else `QScorerConfig.base_model`."""
        return self.whole_weights_source or self.config.base_model

    @property
    def score_range(self) -> tuple[float, float]:
        """``(low, high)``: scores lie within it (nominal when `QScorerConfig.score_bound` is ``"none"``)."""
        return self.config.score_range

    @property
    def device(self) -> torch.device:
        return self.head.mlp[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's weight dtype (scores are float32 regardless)."""
        return self.backbone.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ scoring

    def forward(
        self,
        images: ImageInput,
        *,
        input_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Score images: returns ``[B]`` float32 on `device`, within `score_range`.

        Args:
            images: see the class docstring. Any size with both sides >= the vision patch size;
                larger images are resized to the pixel budget of the config.
            input_range: the value range of float input, ``(0, 1)`` or ``(-1, 1)``; values up to
                10% of the range width outside it are clamped, values further out are an error.
            batch_size: score at most this many images per forward pass (default: all at once).
                Images are loaded per chunk, so a long list of paths is never all in memory.
        """
        weights_need_grad = any(p.requires_grad for p in self.parameters())
        scores = []
        for chunk in _chunks(images, batch_size):
            pixels = self.backbone.to_pixels(chunk, input_range, self.device, self.max_image_pixels)
            pixels_need_grad = (
                pixels.requires_grad if isinstance(pixels, torch.Tensor) else any(p.requires_grad for p in pixels)
            )
            with torch.set_grad_enabled(torch.is_grad_enabled() and (weights_need_grad or pixels_need_grad)):
                scores.append(self.score_inputs(self.backbone.prepare(pixels)))
        return scores[0] if len(scores) == 1 else torch.cat(scores)

    def score_inputs(self, inputs: BackboneInputs) -> torch.Tensor:
        """Scores ``[B]`` float32 for a batch already prepared by ``self.backbone.prepare``."""
        hidden = self.backbone(inputs)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, inputs.score_positions])

    # ------------------------------------------------------------------ memory

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the backbone's layer activations in the backward pass instead of storing them.

        For reward use with gradients to the pixels. Works in eval mode too: transformers only
        checkpoints layers whose ``training`` flag is set, so that flag (and only that flag, not
        their submodules', so dropout stays off) is raised on the checkpointed layers.
        """
        model = self.backbone.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:  # the older name, which is all that earlier transformers 5 releases (5.17 for one) have
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if getattr(model, "_require_grads_hook", None) is not None:
            # Only needed for reentrant checkpointing with frozen embeddings; it would make every
            # call build a graph.
            model.disable_input_require_grads()
        self._gradient_checkpointing = True
        self._sync_checkpointed_layers()

    def gradient_checkpointing_disable(self) -> None:
        model = self.backbone.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        self._gradient_checkpointing = False
        self._sync_checkpointed_layers()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    def train(self, mode: bool = True) -> QScorer:
        super().train(mode)
        self._sync_checkpointed_layers()
        return self

    def _sync_checkpointed_layers(self) -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in self.backbone.model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.training = self.training or self._gradient_checkpointing


def require_gradients(scorer, user: str) -> None:
    """Refuse, for ``user`` (what needs the gradients), a scorer whose scores carry none
    (``scorer.differentiable`` false, e.g. a `RemoteQScorer`)."""
    if not getattr(scorer, "differentiable", True):
        raise TypeError(
            f"{user} needs the gradient of the score with respect to the pixels, but {type(scorer).__name__} "
            "gives scores without gradients; use a QScorer in this process (QScorer.from_pretrained(...))"
        )


def _chunks(images: ImageInput, batch_size: int | None) -> Iterator[ImageInput]:
    """Split ``images`` into consecutive pieces of at most ``batch_size`` images, unconverted."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
    if batch_size is None or not (batched or isinstance(images, (list, tuple))) or len(images) <= batch_size:
        yield images
        return
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def _read_processor_config(base_model: str) -> dict:
    """The base model's ``preprocessor_config.json`` as a dict (empty if it has none)."""
    from transformers.utils import cached_file

    path = cached_file(base_model, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return {}
    return json.loads(Path(path).read_text())
