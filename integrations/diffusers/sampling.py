"""What a ``callback_on_step_end`` can know about the sampling loop it runs in: the noise level of the
latents after each step, and the clean latents the denoiser predicts for them.

diffusers hands a step-end callback the latents after the scheduler's update, but not the denoiser's
prediction. `SamplingObserver` records it: it wraps the scheduler's ``step`` (the one place every
pipeline passes its final, classifier-free-guided prediction through) and, for Flux, reads the
latent grid from the transformer's ``img_ids``. It starts recording on the first callback, so the
prediction is known from step index 1 on.

Noise levels are written as ``x = a * x0 + b * noise``: ``a = sqrt(alphas_cumprod)``,
``b = sqrt(1 - alphas_cumprod)`` for DDPM-style (variance-preserving) schedulers, ``a = 1, b = sigma``
for the Euler family (latents scaled by sigma), and ``a = 1 - sigma, b = sigma`` for flow matching.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .latents import pipeline_family

# Scheduler class name -> how its latents relate to the clean latents (see the module docstring).
SCHEDULER_FORMS = {
    "DDIMScheduler": "alphas_cumprod",
    "DDPMScheduler": "alphas_cumprod",
    "PNDMScheduler": "alphas_cumprod",
    "DPMSolverMultistepScheduler": "vp_sigmas",
    "UniPCMultistepScheduler": "vp_sigmas",
    "EulerDiscreteScheduler": "euler_sigmas",
    "EulerAncestralDiscreteScheduler": "euler_sigmas",
    "LMSDiscreteScheduler": "euler_sigmas",
    "FlowMatchEulerDiscreteScheduler": "flow_sigmas",
}


def scheduler_form(scheduler) -> str:
    """One of ``"alphas_cumprod"``, ``"vp_sigmas"``, ``"euler_sigmas"``, ``"flow_sigmas"``; `TypeError`
    naming the scheduler when it is not one of `SCHEDULER_FORMS`."""
    name = type(scheduler).__name__
    form = SCHEDULER_FORMS.get(name)
    if form is None:
        raise TypeError(
            f"scheduler {name} is not supported (its noise levels are not known here); use one of "
            f"{', '.join(SCHEDULER_FORMS)}, e.g. "
            "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)"
        )
    if form == "vp_sigmas" and scheduler.config.get("use_flow_sigmas", False):
        return "flow_sigmas"
    return form


def prediction_type(scheduler) -> str:
    """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"`` (velocity
    ``noise - x0``)."""
    if scheduler_form(scheduler) == "flow_sigmas":
        return "flow"
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type {kind!r} of {type(scheduler).__name__} is not supported")
    return kind


def noise_level(scheduler, position: int) -> tuple[float, float]:
    """``(a, b)`` of the latents at ``position`` in the schedule, ``x = a * x0 + b * noise``.

    Position ``i`` is the input of denoising step ``i`` (``scheduler.timesteps[i]``); position
    ``len(scheduler.timesteps)`` is the output of the last step. (DDIM and PNDM step down by
    ``num_train_timesteps // num_inference_steps``, which with ``"trailing"`` spacing can land one
    training timestep away from the next timestep; the level of the next timestep is used, the one
    the denoiser is given next.)
    """
    form = scheduler_form(scheduler)
    if form == "alphas_cumprod":
        timesteps = scheduler.timesteps
        if position < len(timesteps):
            alpha_bar = float(scheduler.alphas_cumprod[int(timesteps[position])])
        else:
            alpha_bar = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    sigma = float(scheduler.sigmas[position])
    if form == "euler_sigmas":
        return 1.0, sigma
    if form == "flow_sigmas":
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(1.0 + sigma**2)
    return alpha, sigma * alpha


def predicted_clean(model_output: torch.Tensor, sample: torch.Tensor, a: float, b: float, kind: str) -> torch.Tensor:
    """The clean latents ``x0`` the denoiser predicts for ``sample`` at noise level ``(a, b)``.

    ``kind`` is a `prediction_type`. For v-prediction ``v = alpha * noise - sigma * x0`` with
    ``(alpha, sigma) = (a, b) / sqrt(a^2 + b^2)``, the variance-preserving scale the network sees.
    """
    if kind == "epsilon":
        return (sample - b * model_output) / a
    if kind == "v_prediction":
        norm = math.hypot(a, b)
        return (a / norm) * (sample / norm) - (b / norm) * model_output
    if kind == "flow":
        return sample - b * model_output
    return model_output


@dataclass
class RecordedStep:
    """One call of the scheduler's ``step``: ``model_output`` (the guided prediction), the ``sample`` it
    was applied to and the ``prev_sample`` it returned, all in the pipeline's latent layout."""

    timestep: float
    model_output: torch.Tensor
    sample: torch.Tensor
    prev_sample: torch.Tensor


class _StepRecorder:
    """Stands in for a scheduler's bound ``step`` method, calls it and keeps the latest call."""

    def __init__(self, scheduler):
        self.step = type(scheduler).step.__get__(scheduler)
        self.latest: RecordedStep | None = None

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        output = self.step(model_output, timestep, sample, *args, **kwargs)
        prev_sample = output[0] if isinstance(output, tuple) else output.prev_sample
        self.latest = RecordedStep(float(timestep), model_output, sample, prev_sample)
        return output


class SamplingObserver:
    """Watches one pipeline's sampling loop; get it with `SamplingObserver.of(pipeline)` from a callback.

    It keeps only the latest step (three latent-sized tensors) and stays attached after sampling, so
    later runs of the same pipeline reuse it.
    """

    _by_pipeline: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, pipeline):
        self.family = pipeline_family(pipeline)
        self.scheduler = pipeline.scheduler
        self.kind = prediction_type(self.scheduler)
        self.recorder = _StepRecorder(self.scheduler)
        self.scheduler.step = self.recorder
        self.grid: tuple[int, int] | None = None
        self._grid_hook = None
        if self.family == "flux":
            self._grid_hook = pipeline.transformer.register_forward_pre_hook(self._read_grid, with_kwargs=True)

    @classmethod
    def of(cls, pipeline) -> SamplingObserver:
        """The pipeline's observer, attached on first use (and again if the scheduler was replaced).

        Raises `TypeError` for an unsupported pipeline or scheduler.
        """
        observer = cls._by_pipeline.get(pipeline)
        if observer is None or observer.scheduler is not pipeline.scheduler:
            if observer is not None:
                observer.detach()
            observer = cls(pipeline)
            cls._by_pipeline[pipeline] = observer
        return observer

    def forget(self) -> None:
        """Drop the recorded step (and with it any autograd graph it references)."""
        self.recorder.latest = None

    def detach(self) -> None:
        """Give the scheduler back its own ``step`` and remove the transformer hook."""
        if self.scheduler.__dict__.get("step") is self.recorder:
            del self.scheduler.step
        if self._grid_hook is not None:
            self._grid_hook.remove()

    def _read_grid(self, module, args, kwargs):
        ids = kwargs.get("img_ids")
        if ids is not None:
            ids = ids[0] if ids.ndim == 3 else ids
            self.grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)

    def step_record(self, step_index: int, timestep) -> RecordedStep:
        """The scheduler call of step ``step_index``; `RuntimeError` if it was not recorded."""
        record = self.recorder.latest
        if record is None or record.timestep != float(timestep):
            raise RuntimeError(
                f"the denoiser's prediction at step {step_index} was not recorded: the observer starts "
                "recording on the first callback, so it knows predictions from step index 1 on"
            )
        return record

    def output_level(self, step_index: int) -> tuple[float, float]:
        """``(a, b)`` of the latents after step ``step_index``."""
        return noise_level(self.scheduler, step_index + 1)

    def clean_latents(
        self, step_index: int, timestep, latents: torch.Tensor, rows: slice = slice(None)
    ) -> torch.Tensor:
        """The clean latents predicted for ``latents``, the latents after step ``step_index``.

        That is the denoiser's prediction of the step just taken (as the scheduler computed it), moved
        by whatever changed the latents since the scheduler returned them, divided by their signal
        scale ``a`` (the prediction itself held fixed). Differentiable with respect to ``latents``.

        Args:
            step_index, timestep: the callback's arguments.
            latents: the latents after the step, or the ``rows`` of them, in the pipeline's layout.
            rows: which batch rows ``latents`` holds.

        Returns:
            float32, the shape of ``latents``.
        """
        record = self.step_record(step_index, timestep)
        a_in, b_in = noise_level(self.scheduler, step_index)
        predicted = predicted_clean(
            record.model_output[rows].float(), record.sample[rows].float(), a_in, b_in, self.kind
        )
        a_out, _ = self.output_level(step_index)
        return predicted + (latents.float() - record.prev_sample[rows].float()) / a_out

    def signal_fraction(self, step_index: int) -> float:
        """``a / sqrt(a^2 + b^2)`` of the latents after step ``step_index``: 0 at pure noise, 1 when clean."""
        a, b = self.output_level(step_index)
        return a / math.hypot(a, b)
