"""Q-Scorer in the reward protocol of DDPO-style sampling loops (ddpo-pytorch, flow-GRPO-like code).

Those loops sample a batch of images from a diffusion model, decode them to pixels and call::

    rewards, reward_metadata = reward_fn(images, prompts, prompt_metadata)

usually through an executor (``executor.submit(reward_fn, ...)``) so that scoring one batch
overlaps sampling the next; ``rewards`` is one number per image. `QScorerDDPOReward` implements
that call; `AsyncQScorerDDPOReward` returns the future itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import torch

from qscorer_reward.preprocessing import ImageInput
from qscorer_reward.scorer import QScorer

from .normalization import check_normalization, normalize_scores


class QScorerDDPOReward:
    """``(images, prompts, metadata) -> (rewards, reward_metadata)`` with a `QScorer`.

    Example (ddpo-pytorch's training loop)::

        reward_fn = QScorerDDPOReward(QScorer.from_pretrained(device="cuda"))
        rewards = executor.submit(reward_fn, images, prompts, prompt_metadata)
        ...
        rewards, reward_metadata = rewards.result()

    Args:
        scorer: the Q-Scorer (frozen; it runs without gradients).
        input_range: value range of the decoded images, ``(0, 1)`` (what the loops pass) or ``(-1, 1)``.
        batch_size: score at most this many images per forward pass (default: all at once).
        normalize: ``None`` (rewards are the scores on the MOS scale), ``"unit"`` (mapped to
            [0, 1]) or ``"group_zscore"`` (standardised over the images of the same prompt); see
            `qscorer_reward.integrations.normalization`.

    Call arguments: ``images`` a float tensor ``[B, 3, H, W]`` in ``input_range`` (or anything
    `QScorer` accepts: uint8 tensors, PIL images, paths), ``prompts`` the ``B`` prompts the images
    were sampled from, ``metadata`` the loop's per-prompt metadata (not used).

    Returns: ``rewards``, float32 ``[B]`` on the scorer's device, detached; ``reward_metadata``,
    ``{"scores": [B] float32}``, the raw scores (equal to the rewards when ``normalize`` is None).
    """

    def __init__(
        self,
        scorer: QScorer,
        *,
        input_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int | None = None,
        normalize: str | None = None,
    ) -> None:
        check_normalization(normalize)
        self.scorer = scorer
        self.input_range = input_range
        self.batch_size = batch_size
        self.normalize = normalize

    def __call__(
        self, images: ImageInput, prompts: Sequence[str], metadata: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Grad mode is per thread; say it here, as this often runs in an executor's thread.
        with torch.no_grad():
            scores = self.scorer(images, input_range=self.input_range, batch_size=self.batch_size)
        if prompts is not None and len(prompts) != len(scores):
            raise ValueError(f"got {len(scores)} images but {len(prompts)} prompts; expected one prompt per image")
        rewards = normalize_scores(scores, self.normalize, self.scorer.score_range, prompts)
        return rewards, {"scores": scores}


class AsyncQScorerDDPOReward:
    """`QScorerDDPOReward` run in an executor: each call returns a `concurrent.futures.Future` of
    ``(rewards, reward_metadata)`` at once, so the sampling loop goes on while the batch is scored.

    Example::

        with AsyncQScorerDDPOReward(scorer) as reward_fn:
            pending = []
            for batch in sampling_batches:
                images, prompts, prompt_metadata = sample(batch)
                pending.append(reward_fn(images, prompts, prompt_metadata))
            rewards = torch.cat([future.result()[0] for future in pending])

    The images must not be modified in place until their future is done (they are not copied).

    Args:
        scorer: the Q-Scorer.
        executor: where the scoring runs; default: a one-thread pool owned by this object (closed by
            `shutdown` or on leaving a ``with`` block), which keeps the batches in order.
        **kwargs: as for `QScorerDDPOReward`.
    """

    def __init__(self, scorer: QScorer, *, executor: Executor | None = None, **kwargs: Any) -> None:
        self.reward_fn = QScorerDDPOReward(scorer, **kwargs)
        self._owns_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="qscorer-reward")

    def __call__(
        self, images: ImageInput, prompts: Sequence[str], metadata: Any = None
    ) -> Future[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return self.executor.submit(self.reward_fn, images, prompts, metadata)

    def shutdown(self, wait: bool = True) -> None:
        """Shut down the executor if this object created it (a passed-in executor is the caller's)."""
        if self._owns_executor:
            self.executor.shutdown(wait=wait)

    def __enter__(self) -> AsyncQScorerDDPOReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
