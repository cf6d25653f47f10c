"""`QScorerGuidance`: steer a diffusers sampling loop towards images the Q-Scorer rates higher."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.callbacks import PipelineCallback

from qscorer_reward.scorer import QScorer, require_gradients

from .latents import decode_latents, decoding_vae
from .sampling import SamplingObserver

TIMESTEP_WEIGHTINGS = ("none", "signal")


class QScorerGuidance(PipelineCallback):
    """Reward guidance as a ``callback_on_step_end``: at the chosen steps it moves the latents along the
    gradient of the Q-Scorer score of the image they are heading for.

    At a guided step ``i`` (after the scheduler's update) it

    1. estimates the clean latents from the current latents and the denoiser's prediction of step ``i``
       (see `SamplingObserver.clean_latents`; the denoiser itself is not differentiated),
    2. decodes them through the pipeline's VAE and scores the pixels, with gradients, under gradient
       checkpointing of the VAE decoder and the scorer, ``micro_batch_size`` images at a time,
    3. adds ``scale * direction`` to the latents, where ``direction`` is each image's gradient with
       respect to its latents, normalised to unit RMS (default) or clipped, and ``scale`` is
       ``guidance_scale``, times the signal fraction ``a / sqrt(a^2 + b^2)`` of the latents' noise
       level with ``timestep_weighting="signal"`` (small while the estimate is mostly noise).

    Works through ``callback_on_step_end`` of StableDiffusionPipeline (epsilon and v-prediction),
    StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline::

        guidance = QScorerGuidance(scorer, guidance_scale=0.05, start_step_index=10)
        image = pipe(prompt, callback_on_step_end=guidance).images[0]
        guidance.step_scores  # {step index: [B] preview scores before the update}

    Guided steps are ``start_step_index, start_step_index + every_k_steps, ...`` below the cutoff step
    (``cutoff_step_index``, else ``int(num_steps * cutoff_step_ratio)``). Guiding step ``num_steps - 1``
    changes the final latents. The earliest step is 1: the callback first runs after step 0 and only
    then starts recording the denoiser's predictions.

    Args:
        scorer: the reward model; its weights are not changed.
        guidance_scale: RMS change of the latents per guided step when the gradient is normalised.
        start_step_index: first guided step, >= 1.
        cutoff_step_ratio: guide below ``int(num_steps * cutoff_step_ratio)``.
        cutoff_step_index: guide below this step index (takes precedence over the ratio).
        every_k_steps: guide every k-th step from the start.
        normalize_gradient: scale each image's gradient to unit RMS (``guidance_scale`` is then in
            latent units, independent of the scorer's and the VAE's gradient magnitudes).
        clip_gradient_rms: without normalisation, shrink each image's gradient to at most this RMS.
        timestep_weighting: ``"none"`` or ``"signal"`` (see above).
        micro_batch_size: images decoded and scored per backward pass (``None``: the whole batch); 1
            keeps the extra memory of guidance to one image's decode and score.
        gradient_checkpointing: checkpoint the VAE decoder and the scorer during guidance.
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        scorer: QScorer,
        guidance_scale: float = 0.05,
        start_step_index: int = 1,
        cutoff_step_ratio: float = 1.0,
        cutoff_step_index: int | None = None,
        every_k_steps: int = 1,
        normalize_gradient: bool = True,
        clip_gradient_rms: float | None = None,
        timestep_weighting: str = "none",
        micro_batch_size: int | None = 1,
        gradient_checkpointing: bool = True,
    ):
        require_gradients(scorer, "QScorerGuidance")
        super().__init__(
            cutoff_step_ratio=None if cutoff_step_index is not None else cutoff_step_ratio,
            cutoff_step_index=cutoff_step_index,
        )
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if start_step_index < 1:
            raise ValueError(
                f"start_step_index must be >= 1, got {start_step_index}: the callback sees the denoiser's "
                "prediction from step 1 on"
            )
        if every_k_steps < 1:
            raise ValueError(f"every_k_steps must be >= 1, got {every_k_steps}")
        if normalize_gradient and clip_gradient_rms is not None:
            raise ValueError("clip_gradient_rms applies only with normalize_gradient=False")
        if clip_gradient_rms is not None and clip_gradient_rms <= 0:
            raise ValueError(f"clip_gradient_rms must be > 0, got {clip_gradient_rms}")
        if timestep_weighting not in TIMESTEP_WEIGHTINGS:
            raise ValueError(f"timestep_weighting must be one of {TIMESTEP_WEIGHTINGS}, got {timestep_weighting!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.register_to_config(
            guidance_scale=guidance_scale,
            start_step_index=start_step_index,
            cutoff_step_ratio=cutoff_step_ratio,
            every_k_steps=every_k_steps,
            normalize_gradient=normalize_gradient,
            clip_gradient_rms=clip_gradient_rms,
            timestep_weighting=timestep_weighting,
            micro_batch_size=micro_batch_size,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.scorer = scorer
        self.step_scores: dict[int, torch.Tensor] = {}
        self._guided_steps: range | None = None

    def guided_steps(self, num_steps: int) -> range:
        """The step indices guided in a schedule of ``num_steps`` steps; `ValueError` if none."""
        config = self.config
        if config.cutoff_step_index is not None:
            cutoff = config.cutoff_step_index
        else:
            cutoff = int(num_steps * config.cutoff_step_ratio)
        steps = range(config.start_step_index, min(cutoff, num_steps), config.every_k_steps)
        if len(steps) == 0:
            raise ValueError(
                f"QScorerGuidance has no step to guide: start_step_index={config.start_step_index} and cutoff "
                f"step {cutoff} leave no step of this schedule's step indices 0..{num_steps - 1}"
            )
        return steps

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        observer = SamplingObserver.of(pipeline)
        if step_index == 0 or self._guided_steps is None:
            self._guided_steps = self.guided_steps(pipeline.num_timesteps)
            self.step_scores = {}
        if step_index in self._guided_steps:
            latents = callback_kwargs["latents"]
            callback_kwargs["latents"] = self.guide(pipeline, observer, step_index, timestep, latents)
        return callback_kwargs

    def guide(self, pipeline, observer: SamplingObserver, step_index: int, timestep, latents: torch.Tensor):
        """One guidance update of ``latents`` (the pipeline's layout and dtype) after step ``step_index``."""
        config = self.config
        scale = config.guidance_scale
        if config.timestep_weighting == "signal":
            scale *= observer.signal_fraction(step_index)
        size = config.micro_batch_size or latents.shape[0]
        updates, scores = [], []
        checkpointing = config.gradient_checkpointing
        with (
            decoding_vae(pipeline, checkpointing),
            _scorer_checkpointing(self.scorer, checkpointing),
            torch.enable_grad(),
        ):
            for start in range(0, latents.shape[0], size):
                rows = slice(start, start + size)
                chunk = latents[rows].detach().float().requires_grad_(True)
                clean = observer.clean_latents(step_index, timestep, chunk, rows)
                chunk_scores = self.scorer(decode_latents(pipeline, clean, observer.grid))
                (gradient,) = torch.autograd.grad(chunk_scores.sum(), chunk)
                updates.append(scale * self._direction(gradient))
                scores.append(chunk_scores.detach().float().cpu())
        self.step_scores[step_index] = torch.cat(scores)
        return (latents.float() + torch.cat(updates)).to(latents.dtype)

    def _direction(self, gradient: torch.Tensor) -> torch.Tensor:
        rms = gradient.pow(2).mean(dim=tuple(range(1, gradient.ndim)), keepdim=True).sqrt()
        rms = rms.clamp_min(torch.finfo(gradient.dtype).tiny)
        if self.config.normalize_gradient:
            return gradient / rms
        if self.config.clip_gradient_rms is not None:
            return gradient * (self.config.clip_gradient_rms / rms).clamp(max=1.0)
        return gradient


@contextmanager
def _scorer_checkpointing(scorer: QScorer, enabled: bool):
    """Gradient checkpointing of the scorer's backbone within the context, restored on exit."""
    if not enabled or scorer.is_gradient_checkpointing:
        yield
        return
    scorer.gradient_checkpointing_enable()
    try:
        yield
    finally:
        scorer.gradient_checkpointing_disable()
