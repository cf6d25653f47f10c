"""Q-Scorer as a reward function for TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``).

TRL calls each entry of ``reward_funcs`` as ``func(prompts=..., completions=..., **kwargs)`` once
per generation batch, with every dataset column (and any extra field of a ``rollout_func``) as a
keyword argument holding one value per completion, plus ``trainer_state``, ``log_metric`` and
``log_extra``. It expects one float per completion back, ``None`` where a function has no opinion.
A callable whose ``__call__`` is a coroutine function is awaited on TRL's event loop, concurrently
with the other asynchronous reward functions.

Where the images come from:

- a dataset column: ``images`` (a list of images per sample), ``image`` (one image per sample), or
  the column named by ``image_key``. Note that GRPOTrainer also feeds the ``image`` / ``images``
  columns to the policy as vision input (a vision-language policy); with a text-only policy, name
  the column something else and pass it as ``image_key``.
- a render function: the policy writes text (for example prompts for a text-to-image model) and
  ``render_fn(prompts, completions)`` turns it into images (for example a diffusers pipeline).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
from PIL import Image

from qscorer_reward.extras import require_extra
from qscorer_reward.preprocessing import ImageInput
from qscorer_reward.scorer import QScorer

from .normalization import check_normalization, normalize_scores

require_extra("trl", __name__)

# Images the policy's text became: a batch tensor [B, 3, H, W], or one entry per completion (None
# where nothing could be rendered).
RenderedImages = torch.Tensor | Sequence[ImageInput | None]
RenderFunc = Callable[[list[str], list[str]], RenderedImages]

# The dataset columns searched for images, in this order, when no image_key is given.
DEFAULT_IMAGE_KEYS = ("images", "image")


class QScorerRewardFunc:
    """A TRL ``reward_funcs`` entry that scores images with a `QScorer`.

    Example::

        from trl import GRPOConfig, GRPOTrainer
        from qscorer_reward import QScorer
        from qscorer_reward.integrations.trl import QScorerRewardFunc

        scorer = QScorer.from_pretrained(device="cuda", dtype=torch.bfloat16)
        pipe = ...  # a diffusers text-to-image pipeline
        reward = QScorerRewardFunc(
            scorer, render_fn=lambda prompts, completions: pipe(completions, output_type="pt").images
        )
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward, other_reward], args=GRPOConfig(...), ...)

    Args:
        scorer: the Q-Scorer (frozen; it is only run without gradients).
        image_key: the keyword argument (dataset column) holding the images; default: ``images``,
            else ``image``. Each value is an image (PIL, path, ``[3, H, W]`` tensor, HWC numpy
            array), a list of images or an ``[N, 3, H, W]`` batch (scored together: the reward is
            the mean of their scores), or ``None`` / an empty list (reward ``None``).
        render_fn: ``render_fn(prompts, completions) -> images`` instead of a column, called with
            the texts of the prompts and completions (for chat messages, the text of the last
            message) and returning one image or ``None`` per completion, or a float tensor
            ``[B, 3, H, W]``. Exclusive with ``image_key``.
        batch_size: score at most this many images per forward pass (default: all at once).
        input_range: value range of float image tensors, ``(0, 1)`` (diffusers ``output_type="pt"``)
            or ``(-1, 1)``.
        normalize: ``None`` (rewards are the scores, on the MOS scale `QScorer.score_range`),
            ``"unit"`` (mapped to [0, 1]) or ``"group_zscore"`` (standardised over the completions
            whose prompts have the same text, message by message for chat prompts; with several
            processes, over this process's share of each group). See `qscorer_reward.integrations.normalization`.
        name: the name TRL logs the reward under (``rewards/<name>/mean``); the mean and standard
            deviation of the raw scores go to ``<name>/score_mean`` and ``<name>/score_std``.

    Returns (on call): ``list[float | None]``, one reward per completion.
    """

    def __init__(
        self,
        scorer: QScorer,
        *,
        image_key: str | None = None,
        render_fn: RenderFunc | None = None,
        batch_size: int | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
        normalize: str | None = None,
        name: str = "qscorer",
    ) -> None:
        if image_key is not None and render_fn is not None:
            raise ValueError("pass either image_key (images from a dataset column) or render_fn, not both")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_normalization(normalize)
        self.scorer = scorer
        self.image_key = image_key
        self.render_fn = render_fn
        self.batch_size = batch_size
        self.input_range = input_range
        self.normalize = normalize
        # TRL names a callable reward by its __name__.
        self.__name__ = name

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        images = self._images_per_sample(prompts, completions, kwargs)
        scores = self._score(images)
        log_metric = kwargs.get("log_metric")
        scored = scores[~torch.isnan(scores)]
        if log_metric is not None and len(scored) > 0:
            log_metric(f"{self.__name__}/score_mean", scored.mean().item())
            log_metric(f"{self.__name__}/score_std", scored.std(correction=0).item())
        groups = [prompt if isinstance(prompt, str) else tuple(map(message_text, prompt)) for prompt in prompts]
        rewards = normalize_scores(scores, self.normalize, self.scorer.score_range, groups)
        return [None if math.isnan(reward) else reward for reward in rewards.tolist()]

    def _images_per_sample(self, prompts: list, completions: list, kwargs: dict) -> list[list[ImageInput]]:
        """The images of each completion (an empty list where there is none)."""
        count = len(completions)
        if self.render_fn is not None:
            rendered = self.render_fn([message_text(p) for p in prompts], [message_text(c) for c in completions])
            if _is_image_batch(rendered):
                rendered = list(rendered)
            if not isinstance(rendered, Sequence) or isinstance(rendered, str) or len(rendered) != count:
                got = f"{len(rendered)} items" if isinstance(rendered, Sequence) else type(rendered).__name__
                raise ValueError(
                    f"render_fn must return one image (or None) per completion: expected {count}, got {got}"
                )
            return [[] if image is None else [image] for image in rendered]

        key = self.image_key or next((k for k in DEFAULT_IMAGE_KEYS if k in kwargs), None)
        if key is None or key not in kwargs:
            wanted = repr(self.image_key) if self.image_key else " or ".join(map(repr, DEFAULT_IMAGE_KEYS))
            raise ValueError(
                f"no images: the reward function looks for the keyword argument {wanted}, but TRL passed only "
                f"{sorted(kwargs)}. Name the dataset column holding the images with image_key=..., or pass "
                "render_fn=... to make images from the completions."
            )
        values = kwargs[key]
        if len(values) != count:
            raise ValueError(f"{key!r} holds {len(values)} values for {count} completions")
        return [_images_of(value, f"{key}[{index}]") for index, value in enumerate(values)]

    def _score(self, images: list[list[ImageInput]]) -> torch.Tensor:
        """Per-sample scores ``[N]`` float32 on the CPU: the mean over the sample's images, NaN if none."""
        flat = [image for sample in images for image in sample]
        counts = torch.tensor([len(sample) for sample in images], dtype=torch.float32)
        if not flat:
            return torch.full((len(images),), math.nan)
        with torch.no_grad():
            scores = self.scorer(flat, input_range=self.input_range, batch_size=self.batch_size).float().cpu()
        owners = torch.repeat_interleave(torch.arange(len(images)), counts.long())
        sums = torch.zeros(len(images)).index_add_(0, owners, scores)
        return torch.where(counts > 0, sums / counts.clamp(min=1), math.nan)


class AsyncQScorerRewardFunc(QScorerRewardFunc):
    """`QScorerRewardFunc` as a coroutine: TRL awaits it together with its other asynchronous reward
    functions (remote judges, sandboxed code checks...), while the scoring runs in ``executor``.

    Args:
        executor: where the scoring runs; default: the event loop's default thread pool. A
            one-thread pool keeps calls on the scorer's device in order.
        **kwargs: as for `QScorerRewardFunc`.
    """

    def __init__(self, scorer: QScorer, *, executor: Executor | None = None, **kwargs: Any) -> None:
        super().__init__(scorer, **kwargs)
        self.executor = executor

    async def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        score = functools.partial(super().__call__, prompts, completions, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, score)


def message_text(message: str | list | dict) -> str:
    """The text of a prompt or completion: a string as is; for chat messages, the text of the last
    message (its string content, or its text parts joined)."""
    if isinstance(message, str):
        return message
    if isinstance(message, list) and message and isinstance(message[-1], dict):
        message = message[-1]
    if isinstance(message, dict) and "content" in message:
        content = message["content"]
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise TypeError(f"expected a string or chat messages (dicts with 'content'), got {type(message).__name__}")


def _is_image_batch(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4


def _images_of(value: Any, where: str) -> list[ImageInput]:
    """One column value -> its images (an empty list for None or an empty list)."""
    if value is None:
        return []
    if _is_image_batch(value):
        return list(value)
    images = [item for item in value if item is not None] if isinstance(value, (list, tuple)) else [value]
    for item in images:
        if not isinstance(item, (Image.Image, str, os.PathLike, torch.Tensor, np.ndarray)):
            raise TypeError(
                f"{where} holds a {type(item).__name__}, not an image: expected PIL images, file paths, tensors or "
                "numpy arrays (a column of arrays reads back as nested lists unless the dataset's format is "
                "'torch' or 'numpy')"
            )
    return images
