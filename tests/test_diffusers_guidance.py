"""QScorerGuidance through the real ``__call__`` of tiny SD / SD-v / SDXL / SD3 / Flux pipelines, and the
sampling math and latent decoding it is built on."""

import functools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from qscorer_reward.integrations.diffusers import QScorerGuidance, SamplingObserver, decode_latents
from qscorer_reward.integrations.diffusers.sampling import noise_level, predicted_clean, prediction_type
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.testing.pipelines import PIPELINE_KINDS, tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a cat on a sofa", "a red car", "a mountain lake", "a bowl of fruit"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def scorer():
    return tiny_scorer(max_pixels=56 * 56)


@functools.cache
def pipeline(kind):
    """One tiny pipeline per kind for this module; tests do not change its weights."""
    return tiny_pipeline(kind)


def generate(pipe, kind, callback=None, seeds=(0, 1, 2, 3), output_type="pt", **kwargs):
    return pipe(
        PROMPTS[: len(seeds)],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        callback_on_step_end=callback,
        output_type=output_type,
        **{**tiny_call_kwargs(kind), **kwargs},
    ).images


class LatentsProbe(PipelineCallback):
    """Keeps a copy of the latents it is handed at every step."""

    tensor_inputs = ["latents"]

    def __init__(self):
        super().__init__()
        self.seen = {}

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen[step_index] = callback_kwargs["latents"].clone()
        return callback_kwargs


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_guidance_raises_the_final_score_over_unguided_sampling_with_the_same_seeds(kind):
    pipe = pipeline(kind)
    unguided = generate(pipe, kind)
    guidance = QScorerGuidance(scorer(), guidance_scale=0.1)
    guided = generate(pipe, kind, guidance)

    assert guided.shape == unguided.shape == (4, 3, 32, 32)
    assert sorted(guidance.step_scores) == [1, 2, 3]
    assert all(s.shape == (4,) for s in guidance.step_scores.values())
    unguided_scores, guided_scores = scorer()(unguided), scorer()(guided)
    gain = (guided_scores - unguided_scores).mean().item()
    assert gain > 0.05, f"{kind}: guidance changed the mean score by {gain:+.4f}"
    # The guided run's own previews rise from step to step too.
    assert guidance.step_scores[3].mean() > guidance.step_scores[1].mean()


def test_guidance_at_zero_scale_leaves_sampling_unchanged():
    pipe = pipeline("sd")
    unguided = generate(pipe, "sd")
    guidance = QScorerGuidance(scorer(), guidance_scale=0.0)
    torch.testing.assert_close(generate(pipe, "sd", guidance), unguided)
    assert sorted(guidance.step_scores) == [1, 2, 3]


def guided_update(pipe, kind, **options):
    """The change the guidance makes to the latents at step 2, ``[2, ...]``."""
    before, after = LatentsProbe(), LatentsProbe()
    guidance = QScorerGuidance(scorer(), start_step_index=2, cutoff_step_index=3, **options)
    generate(pipe, kind, MultiPipelineCallbacks([before, guidance, after]), seeds=(0, 1))
    for step in (1, 3):
        torch.testing.assert_close(after.seen[step], before.seen[step], rtol=0, atol=0)
    return after.seen[2] - before.seen[2]


def rms(update):
    return update.pow(2).mean(dim=(1, 2, 3)).sqrt()


def test_normalised_update_size_follows_the_scale_and_the_timestep_weighting():
    pipe = pipeline("sd_v")
    plain = rms(guided_update(pipe, "sd_v", guidance_scale=0.2))
    weighted = rms(guided_update(pipe, "sd_v", guidance_scale=0.2, timestep_weighting="signal"))
    signal = SamplingObserver.of(pipe).signal_fraction(2)
    assert 0.0 < signal < 1.0
    torch.testing.assert_close(plain, torch.full((2,), 0.2), rtol=1e-3, atol=0.0)
    torch.testing.assert_close(weighted, torch.full((2,), 0.2 * signal), rtol=1e-3, atol=0.0)


def test_raw_gradient_is_clipped_per_image():
    pipe = pipeline("sd_v")
    raw = guided_update(pipe, "sd_v", guidance_scale=1.0, normalize_gradient=False)
    limit = rms(raw).min().item() / 2
    clipped = guided_update(pipe, "sd_v", guidance_scale=1.0, normalize_gradient=False, clip_gradient_rms=limit)
    torch.testing.assert_close(rms(clipped), torch.full((2,), limit), rtol=1e-3, atol=0.0)
    # Clipping rescales, it does not turn the direction.
    cosine = torch.nn.functional.cosine_similarity(raw.flatten(1), clipped.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(2), rtol=0, atol=1e-4)


def test_micro_batching_and_checkpointing_do_not_change_the_result():
    pipe = pipeline("sdxl")
    model = scorer()
    reference = QScorerGuidance(model, guidance_scale=0.1, micro_batch_size=None, gradient_checkpointing=False)
    chunked = QScorerGuidance(model, guidance_scale=0.1, micro_batch_size=1, gradient_checkpointing=True)
    expected = generate(pipe, "sdxl", reference, seeds=(0, 1, 2))
    torch.testing.assert_close(generate(pipe, "sdxl", chunked, seeds=(0, 1, 2)), expected, rtol=1e-4, atol=1e-5)
    # The checkpointing switched on for the guidance is switched off again.
    assert not model.is_gradient_checkpointing
    assert not pipe.vae.is_gradient_checkpointing


def test_every_k_steps_and_window():
    pipe = pipeline("sd3")
    guidance = QScorerGuidance(scorer(), start_step_index=1, cutoff_step_ratio=0.8, every_k_steps=2)
    generate(pipe, "sd3", guidance, seeds=(0,), num_inference_steps=6)
    assert sorted(guidance.step_scores) == [1, 3]
    assert guidance.guided_steps(10) == range(1, 8, 2)


# ------------------------------------------------------------------------------ bad input


def test_unsupported_pipeline_is_named():
    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipeline("sd").components)
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline is not supported"):
        pipe("a cat", image=image, num_inference_steps=4, strength=1.0, callback_on_step_end=QScorerGuidance(scorer()))


def test_unsupported_scheduler_is_named():
    pipe = tiny_pipeline("sd")
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="scheduler HeunDiscreteScheduler is not supported"):
        generate(pipe, "sd", QScorerGuidance(scorer()), seeds=(0,))


def test_empty_window_is_reported_before_guiding():
    with pytest.raises(ValueError, match="no step to guide"):
        generate(pipeline("flux"), "flux", QScorerGuidance(scorer(), start_step_index=4), seeds=(0,))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(start_step_index=0), "start_step_index must be >= 1"),
        (dict(clip_gradient_rms=1.0), "only with normalize_gradient=False"),
        (dict(timestep_weighting="snr"), "timestep_weighting must be one of"),
        (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
        (dict(micro_batch_size=0), "micro_batch_size must be >= 1"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QScorerGuidance(scorer(), **options)


# ------------------------------------------------------------------------------ sampling math


def _exact_output(kind, x0, noise, a, b):
    """What a perfect denoiser predicts for latents ``a * x0 + b * noise``."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        norm = (a**2 + b**2) ** 0.5
        return (a / norm) * noise - (b / norm) * x0
    if kind == "flow":
        return noise - x0
    return x0


VP = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(**VP, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
        DDIMScheduler(**VP, prediction_type="v_prediction", steps_offset=1, clip_sample=False),
        PNDMScheduler(**VP, skip_prk_steps=True, steps_offset=1),
        DDPMScheduler(**VP, clip_sample=False),
        DPMSolverMultistepScheduler(**VP),
        DPMSolverMultistepScheduler(**VP, prediction_type="v_prediction"),
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        UniPCMultistepScheduler(**VP),
        EulerDiscreteScheduler(**VP, timestep_spacing="leading", steps_offset=1),
        EulerDiscreteScheduler(**VP, prediction_type="v_prediction", timestep_spacing="trailing"),
        EulerAncestralDiscreteScheduler(**VP),
        LMSDiscreteScheduler(**VP),
        FlowMatchEulerDiscreteScheduler(shift=3.0),
    ],
    ids=lambda s: f"{type(s).__name__}-{prediction_type(s)}",
)
def test_noise_levels_agree_with_the_scheduler_under_a_perfect_denoiser(scheduler):
    """Feed each scheduler the exact prediction for our noise levels: its own update must then land on
    our level for the next step, and end on the clean latents."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    kind = prediction_type(scheduler)
    scheduler.set_timesteps(6)
    a, b = noise_level(scheduler, 0)
    latents = a * x0 + b * noise
    stochastic = isinstance(scheduler, (EulerAncestralDiscreteScheduler, DDPMScheduler))
    step_kwargs = {"generator": generator} if stochastic else {}
    for i, t in enumerate(scheduler.timesteps):
        a, b = noise_level(scheduler, i)
        current_noise = (latents - a * x0) / b
        output = _exact_output(kind, x0, current_noise, a, b)
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(latents, t)
        torch.testing.assert_close(predicted_clean(output, latents, a, b, kind), x0, rtol=1e-4, atol=1e-4)
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
        a_next, b_next = noise_level(scheduler, i + 1)
        if not stochastic:
            torch.testing.assert_close(latents, a_next * x0 + b_next * noise, rtol=1e-4, atol=2e-4)
    a_end, b_end = noise_level(scheduler, len(scheduler.timesteps))
    assert b_end < 0.03 and a_end > 0.999
    torch.testing.assert_close(latents, x0, rtol=0, atol=0.1)


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_decode_latents_matches_the_pipelines_own_decoding(kind):
    """Scaling and shift factors, SDXL's latent mean and std, and Flux's packing, against the pipeline."""
    pipe = pipeline(kind)
    latents = generate(pipe, kind, seeds=(5, 6), output_type="latent")
    images = generate(pipe, kind, seeds=(5, 6))
    grid = None
    if kind == "flux":
        side = 32 // pipe.vae_scale_factor // 2
        grid = (side, side)
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(pipe, latents, grid), images, rtol=0, atol=1e-5)
