"""Selection by score after sampling: `best_of_n` generates candidates and keeps the best, `filter_images`
keeps the images scoring at least a threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qscorer_reward.preprocessing import ImageInput
from qscorer_reward.scorer import QScorer


@dataclass
class BestOfN:
    """What `best_of_n` returns, for ``P`` prompts.

    Attributes:
        images: per prompt, its ``top_k`` best images, best first (PIL images, or ``[3, H, W]`` float
            tensors in [0, 1] with ``output_type="pt"``).
        scores: ``[P, top_k]`` float32, their scores.
        indices: ``[P, top_k]`` int64, their candidate indices.
        all_scores: ``[P, n]`` float32, every candidate's score in candidate order.
        seeds: ``[P, n]`` int64, every candidate's seed.
        batch_size: the candidates per pipeline call it ended up using.
    """

    images: list[list]
    scores: torch.Tensor
    indices: torch.Tensor
    all_scores: torch.Tensor
    seeds: torch.Tensor
    batch_size: int


def best_of_n(
    pipeline,
    prompt: str | Sequence[str],
    n: int,
    scorer: QScorer,
    *,
    top_k: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    score_batch_size: int | None = None,
    output_type: str = "pil",
    **pipeline_kwargs,
) -> BestOfN:
    """Generate ``n`` candidates per prompt and keep the ``top_k`` the scorer rates highest.

    Candidate ``j`` of prompt ``p`` uses seed ``seed + p * n + j`` (a CPU ``torch.Generator`` per image),
    so the candidates do not depend on how they are batched. Candidates are generated ``batch_size``
    per pipeline call (default ``n``); a call that runs out of accelerator memory is retried with half
    as many, down to one. Only the current best ``top_k`` images are kept in memory.

    ``pipeline_kwargs`` go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``height``,
    ``callback_on_step_end`` such as a `QScorerGuidance`...).
    """
    for reserved in ("generator", "num_images_per_prompt", "latents", "prompt_embeds"):
        if reserved in pipeline_kwargs:
            raise TypeError(f"best_of_n sets {reserved!r} itself (seeds come from seed=, candidates from n=)")
    if n < 1 or not 1 <= top_k <= n:
        raise ValueError(f"need n >= 1 and 1 <= top_k <= n, got n={n}, top_k={top_k}")
    if output_type not in ("pil", "pt"):
        raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch_size = min(batch_size or n, n)
    seeds = seed + torch.arange(len(prompts) * n, dtype=torch.int64).view(len(prompts), n)
    all_scores = torch.empty(len(prompts), n)
    best_images, best_scores, best_indices = [], [], []
    for p, text in enumerate(prompts):
        kept_images, kept_indices = None, None
        start = 0
        while start < n:
            count = min(batch_size, n - start)
            try:
                images = _generate(pipeline, text, seeds[p, start : start + count].tolist(), pipeline_kwargs)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            with torch.no_grad():
                all_scores[p, start : start + count] = scorer(images, batch_size=score_batch_size).float().cpu()
            candidates = torch.arange(start, start + count)
            images = images.float().cpu()
            if kept_images is not None:
                images, candidates = torch.cat([kept_images, images]), torch.cat([kept_indices, candidates])
            order = all_scores[p, candidates].argsort(descending=True, stable=True)[:top_k]
            kept_images, kept_indices = images[order], candidates[order]
            start += count
        best_indices.append(kept_indices)
        best_scores.append(all_scores[p, kept_indices])
        best_images.append(_as_output(pipeline, kept_images, output_type))
    return BestOfN(
        images=best_images,
        scores=torch.stack(best_scores),
        indices=torch.stack(best_indices),
        all_scores=all_scores,
        seeds=seeds,
        batch_size=batch_size,
    )


def _generate(pipeline, prompt: str, seeds: list[int], pipeline_kwargs: dict) -> torch.Tensor:
    """``len(seeds)`` images for ``prompt``, ``[B, 3, H, W]`` float in [0, 1]."""
    output = pipeline(
        prompt=prompt,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
        **pipeline_kwargs,
    )
    return output.images


def _as_output(pipeline, images: torch.Tensor, output_type: str) -> list:
    if output_type == "pt":
        return list(images)
    processor = pipeline.image_processor
    return processor.numpy_to_pil(processor.pt_to_numpy(images))


@dataclass
class FilteredImages:
    """What `filter_images` returns.

    Attributes:
        images: the kept images, in input order (a tensor ``[K, 3, H, W]`` for tensor input, else a list).
        scores: ``[K]`` float32, their scores.
        indices: ``[K]`` int64, their positions in the input.
        all_scores: ``[B]`` float32, every input image's score.
    """

    images: torch.Tensor | list
    scores: torch.Tensor
    indices: torch.Tensor
    all_scores: torch.Tensor


@torch.no_grad()
def filter_images(
    images: ImageInput,
    scorer: QScorer,
    min_score: float,
    *,
    batch_size: int | None = None,
    input_range: tuple[float, float] = (0.0, 1.0),
) -> FilteredImages:
    """Keep the images scoring at least ``min_score``.

    ``images`` is anything `QScorer` accepts as a batch: a tensor ``[B, 3, H, W]``, or a list of PIL
    images, paths, arrays or tensors. ``batch_size`` bounds the images per scorer pass.
    """
    all_scores = scorer(images, input_range=input_range, batch_size=batch_size).float().cpu()
    indices = torch.nonzero(all_scores >= min_score).flatten()
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        kept = images[indices.to(images.device)]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        kept = images[indices.numpy()]
    else:
        items = [images] if not isinstance(images, (list, tuple)) else images
        kept = [items[i] for i in indices.tolist()]
    return FilteredImages(images=kept, scores=all_scores[indices], indices=indices, all_scores=all_scores)
