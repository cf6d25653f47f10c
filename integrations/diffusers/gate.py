"""`QualityGate`: score a preview of the batch part-way through sampling, flag (and optionally stop)
low-quality samples, and `generate_with_gate`, which regenerates the rejected ones with new seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from qscorer_reward.scorer import QScorer

from .latents import decode_latents, decoding_vae
from .sampling import SamplingObserver


class QualityGate(PipelineCallback):
    """A ``callback_on_step_end`` that, at one step, decodes the clean-image estimate of every sample,
    scores it and flags the samples scoring below ``threshold``.

    After the pipeline call (reset at the start of each call):

    - ``scores``: ``[B]`` float32 on CPU, the previews' scores (``None`` if the gate step was not reached),
    - ``passed``: ``[B]`` bool, ``scores >= threshold``,
    - ``previews``: ``[B, 3, H, W]`` float32 in [0, 1] on CPU, the images that were scored,
    - ``interrupted``: whether the gate stopped the pipeline (``interrupt_if_all_rejected`` and no sample
      passed); the pipeline then skips its remaining steps and returns the unfinished images.

    The gate step is ``gate_step_index``, else ``int(num_steps * gate_step_ratio)``, capped at the last
    step ``num_steps - 1`` (so ratio 1.0 scores the final images). It must be >= 1: the callback first
    runs after step 0 and only then starts recording the denoiser's predictions. Works with the
    pipelines `QScorerGuidance` supports; combine both with diffusers' ``MultiPipelineCallbacks``.

    Args:
        scorer: the quality model.
        threshold: the lowest passing score (on the scorer's scale, 1..5).
        gate_step_index: the step to gate at (takes precedence over the ratio).
        gate_step_ratio: the fraction of the schedule after which to gate.
        interrupt_if_all_rejected: stop the pipeline when no sample passes.
        batch_size: score at most this many previews per scorer pass (default: all).
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        scorer: QScorer,
        threshold: float,
        gate_step_index: int | None = None,
        gate_step_ratio: float = 0.5,
        interrupt_if_all_rejected: bool = False,
        batch_size: int | None = None,
    ):
        if gate_step_index is not None and gate_step_index < 1:
            raise ValueError(
                f"gate_step_index must be >= 1, got {gate_step_index}: the gate sees the denoiser's prediction "
                "from step 1 on"
            )
        if not 0.0 < gate_step_ratio <= 1.0:
            raise ValueError(f"gate_step_ratio must be in (0, 1], got {gate_step_ratio}")
        super().__init__(
            cutoff_step_ratio=None if gate_step_index is not None else float(gate_step_ratio),
            cutoff_step_index=gate_step_index,
        )
        self.register_to_config(
            threshold=float(threshold),
            gate_step_index=gate_step_index,
            gate_step_ratio=gate_step_ratio,
            interrupt_if_all_rejected=interrupt_if_all_rejected,
            batch_size=batch_size,
        )
        self.scorer = scorer
        self._reset()

    def _reset(self) -> None:
        self.scores: torch.Tensor | None = None
        self.passed: torch.Tensor | None = None
        self.previews: torch.Tensor | None = None
        self.interrupted = False

    def gate_step(self, num_steps: int) -> int:
        """The step index gated at in a schedule of ``num_steps`` steps; `ValueError` if outside it."""
        config = self.config
        if config.gate_step_index is not None:
            step = config.gate_step_index
        else:
            step = min(int(num_steps * config.gate_step_ratio), num_steps - 1)
        if not 1 <= step <= num_steps - 1:
            raise ValueError(
                f"QualityGate: gate step {step} is outside the schedule: this run has {num_steps} steps "
                f"(step indices 0..{num_steps - 1}) and the gate can act at step indices 1..{num_steps - 1}"
            )
        return step

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        observer = SamplingObserver.of(pipeline)
        if step_index == 0:
            self._reset()
        if step_index == self.gate_step(pipeline.num_timesteps):
            self.score_previews(pipeline, observer, step_index, timestep, callback_kwargs["latents"])
            if self.config.interrupt_if_all_rejected and not bool(self.passed.any()):
                pipeline._interrupt = True  # the pipelines' own flag; they skip the remaining steps
                self.interrupted = True
        return callback_kwargs

    @torch.no_grad()
    def score_previews(self, pipeline, observer: SamplingObserver, step_index: int, timestep, latents) -> None:
        """Decode the clean-image estimate of ``latents`` after step ``step_index``, score and flag it."""
        clean = observer.clean_latents(step_index, timestep, latents)
        with decoding_vae(pipeline):
            previews = decode_latents(pipeline, clean, observer.grid)
        self.scores = self.scorer(previews, batch_size=self.config.batch_size).float().cpu()
        self.previews = previews.cpu()
        self.passed = self.scores >= self.config.threshold


@dataclass
class GatedGeneration:
    """What `generate_with_gate` returns, one entry per requested image (prompt-major order).

    Attributes:
        images: the accepted image (a PIL image, or a ``[3, H, W]`` tensor in [0, 1] with
            ``output_type="pt"``), or ``None`` where no attempt passed.
        scores: ``[N]`` float32, the gate's score of the accepted attempt (of the last attempt where none passed).
        passed: ``[N]`` bool.
        seeds: the seed of the accepted (or last) attempt.
        attempts: how many attempts each image took.
    """

    images: list
    scores: torch.Tensor
    passed: torch.Tensor
    seeds: list[int]
    attempts: list[int]


def generate_with_gate(
    pipeline,
    prompt: str | Sequence[str],
    gate: QualityGate,
    *,
    num_images_per_prompt: int = 1,
    max_attempts: int = 3,
    seed: int = 0,
    batch_size: int | None = None,
    callbacks: Sequence[PipelineCallback] = (),
    output_type: str = "pil",
    **pipeline_kwargs,
) -> GatedGeneration:
    """Generate images through ``gate``, regenerating rejected ones with new seeds, at most
    ``max_attempts`` times per image.

    Image ``j`` (prompt-major, ``num_images_per_prompt`` per prompt, ``N`` in all) uses seed
    ``seed + attempt * N + j`` on attempt ``attempt`` = 0, 1, ..., so results do not depend on
    ``batch_size`` (images per pipeline call, default all pending ones). ``callbacks`` run before the
    gate at every step (e.g. a `QScorerGuidance`); ``pipeline_kwargs`` go to the pipeline
    (``num_inference_steps``, ``height``, ``guidance_scale``...).
    """
    for reserved in ("generator", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "latents"):
        if reserved in pipeline_kwargs:
            raise TypeError(
                f"generate_with_gate sets {reserved!r} itself (seeds come from seed=, callbacks from callbacks=)"
            )
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    requests = [text for text in prompts for _ in range(num_images_per_prompt)]
    total = len(requests)
    images: list = [None] * total
    scores = torch.full((total,), float("nan"))
    passed = torch.zeros(total, dtype=torch.bool)
    seeds, attempts = [0] * total, [0] * total
    callback = MultiPipelineCallbacks([*callbacks, gate]) if callbacks else gate
    pending = list(range(total))
    for attempt in range(max_attempts):
        step = batch_size or len(pending)
        for start in range(0, len(pending), step):
            batch = pending[start : start + step]
            batch_seeds = [seed + attempt * total + j for j in batch]
            output = pipeline(
                prompt=[requests[j] for j in batch],
                generator=[torch.Generator().manual_seed(s) for s in batch_seeds],
                callback_on_step_end=callback,
                output_type=output_type,
                **pipeline_kwargs,
            )
            if gate.scores is None:
                raise RuntimeError("the quality gate did not run: the pipeline stopped before the gate step")
            for row, j in enumerate(batch):
                scores[j], seeds[j], attempts[j] = gate.scores[row], batch_seeds[row], attempt + 1
                if gate.passed[row]:
                    passed[j] = True
                    images[j] = output.images[row]
        pending = [j for j in pending if not passed[j]]
        if not pending:
            break
    return GatedGeneration(images=images, scores=scores, passed=passed, seeds=seeds, attempts=attempts)
