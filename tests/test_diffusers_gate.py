"""QualityGate, generate_with_gate, best_of_n and filter_images through the real ``__call__`` of tiny
SD / SD-v / SDXL / SD3 / Flux pipelines."""

import functools

import pytest
import torch
from PIL import Image

from qscorer_reward.integrations.diffusers import (
    QScorerGuidance,
    QualityGate,
    best_of_n,
    filter_images,
    generate_with_gate,
)
from qscorer_reward.integrations.diffusers.latents import denoiser
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.testing.pipelines import PIPELINE_KINDS, tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a cat on a sofa", "a red car", "a mountain lake"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def scorer():
    return tiny_scorer(max_pixels=56 * 56)


@functools.cache
def pipeline(kind):
    """One tiny pipeline per kind for this module; tests do not change its weights."""
    return tiny_pipeline(kind)


def generate(pipe, kind, callback=None, seeds=(0, 1, 2), **kwargs):
    return pipe(
        PROMPTS[: len(seeds)],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        callback_on_step_end=callback,
        output_type="pt",
        **{**tiny_call_kwargs(kind), **kwargs},
    ).images


class CallCounter:
    """Counts forward calls of a module (a forward hook)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


# ------------------------------------------------------------------------------ QualityGate


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
def test_gate_scores_equal_scoring_its_previews_and_the_final_preview_is_the_output(kind):
    pipe = pipeline(kind)
    final_gate = QualityGate(scorer(), threshold=2.8, gate_step_ratio=1.0)
    images = generate(pipe, kind, final_gate)

    assert final_gate.scores.shape == (3,) and final_gate.previews.shape == (3, 3, 32, 32)
    # At the last step the preview is the clean estimate of the final latents: the pipeline's own
    # output (exactly where the schedule ends at zero noise; SD's DDIM ends at a tiny noise level).
    torch.testing.assert_close(final_gate.previews, images, rtol=0, atol=5e-3)
    torch.testing.assert_close(final_gate.scores, scorer()(final_gate.previews), rtol=0, atol=1e-5)
    torch.testing.assert_close(final_gate.scores, scorer()(images), rtol=0, atol=5e-3)
    assert torch.equal(final_gate.passed, final_gate.scores >= 2.8)
    assert not final_gate.interrupted

    mid_gate = QualityGate(scorer(), threshold=2.8, gate_step_index=2)
    generate(pipe, kind, mid_gate)
    torch.testing.assert_close(mid_gate.scores, scorer()(mid_gate.previews), rtol=0, atol=1e-5)


def test_gate_interrupts_when_every_sample_is_rejected():
    pipe = tiny_pipeline("sd")
    counter = CallCounter(denoiser(pipe))
    gate = QualityGate(scorer(), threshold=5.0, gate_step_index=1, interrupt_if_all_rejected=True)
    generate(pipe, "sd", gate, num_inference_steps=6)
    assert gate.interrupted and not gate.passed.any()
    assert counter.calls == 2  # steps 0 and 1; the remaining four were skipped

    counter.calls = 0
    lenient = QualityGate(scorer(), threshold=1.0, gate_step_index=1, interrupt_if_all_rejected=True)
    generate(pipe, "sd", lenient, num_inference_steps=6)
    assert not lenient.interrupted and lenient.passed.all()
    assert counter.calls == 6


def test_gate_state_is_reset_by_each_call():
    pipe = pipeline("sd3")
    gate = QualityGate(scorer(), threshold=5.0, gate_step_index=3)
    generate(pipe, "sd3", gate, seeds=(0,))
    assert gate.scores is not None
    with pytest.raises(ValueError, match="gate step 3 is outside the schedule"):
        generate(pipe, "sd3", gate, seeds=(0,), num_inference_steps=3)
    assert gate.scores is None


def test_gate_combines_with_guidance():
    from diffusers.callbacks import MultiPipelineCallbacks

    pipe = pipeline("flux")
    plain_gate = QualityGate(scorer(), threshold=0.0, gate_step_ratio=1.0)
    generate(pipe, "flux", plain_gate)
    guided_gate = QualityGate(scorer(), threshold=0.0, gate_step_ratio=1.0)
    generate(pipe, "flux", MultiPipelineCallbacks([QScorerGuidance(scorer(), guidance_scale=0.1), guided_gate]))
    assert guided_gate.scores.mean() > plain_gate.scores.mean()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(gate_step_index=0), "gate_step_index must be >= 1"),
        (dict(gate_step_ratio=0.0), r"gate_step_ratio must be in \(0, 1\]"),
        (dict(gate_step_ratio=1.5), r"gate_step_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_gate_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QualityGate(scorer(), threshold=3.0, **options)


def test_gate_step_that_rounds_to_zero_is_refused():
    with pytest.raises(ValueError, match="outside the schedule"):
        generate(pipeline("sdxl"), "sdxl", QualityGate(scorer(), threshold=3.0, gate_step_ratio=0.1), seeds=(0,))


# ------------------------------------------------------------------------------ regeneration


def test_generate_with_gate_regenerates_rejected_images_with_new_seeds():
    pipe, kind = pipeline("sd_v"), "sd_v"
    # Two prompts x two images, prompt-major: image j has seed j on the first attempt.
    first = [float(probe_score(pipe, kind, PROMPTS[j // 2], j)) for j in range(4)]
    threshold = sorted(first)[1] + 1e-4  # the two lowest first-attempt images are rejected
    gate = QualityGate(scorer(), threshold=threshold, gate_step_ratio=1.0)
    result = generate_with_gate(
        pipe, PROMPTS[:2], gate, num_images_per_prompt=2, max_attempts=4, output_type="pt", **tiny_call_kwargs(kind)
    )
    for j in range(4):
        assert result.passed[j] == (result.images[j] is not None)
        assert result.seeds[j] == (result.attempts[j] - 1) * 4 + j
        if result.passed[j]:
            assert result.scores[j] >= threshold
            # The accepted image is what that seed gives, and its score is the image's score.
            prompt = PROMPTS[j // 2]
            torch.testing.assert_close(
                result.scores[j], probe_score(pipe, kind, prompt, result.seeds[j]), atol=1e-4, rtol=0
            )
            assert result.images[j].shape == (3, 32, 32)
    first_attempt_passed = [j for j in range(4) if first[j] >= threshold]
    assert len(first_attempt_passed) == 2
    assert all(result.attempts[j] == 1 for j in first_attempt_passed)
    regenerated = [j for j in range(4) if j not in first_attempt_passed]
    assert all(result.attempts[j] > 1 for j in regenerated)
    assert any(result.passed[j] for j in regenerated), "no regenerated image passed: the test shows nothing"
    assert all(result.attempts[j] == 4 for j in regenerated if not result.passed[j])


def probe_score(pipe, kind, prompt, seed):
    gate = QualityGate(scorer(), threshold=0.0, gate_step_ratio=1.0)
    pipe(
        prompt,
        generator=torch.Generator().manual_seed(seed),
        callback_on_step_end=gate,
        output_type="pt",
        **tiny_call_kwargs(kind),
    )
    return gate.scores[0]


def test_generate_with_gate_refuses_its_own_arguments():
    with pytest.raises(TypeError, match="sets 'generator' itself"):
        generate_with_gate(pipeline("sd"), "a cat", QualityGate(scorer(), 3.0), generator=torch.Generator())


# ------------------------------------------------------------------------------ best of N, filtering


def test_best_of_n_keeps_the_top_k_and_does_not_depend_on_batching():
    pipe, kind = pipeline("sd3"), "sd3"
    kwargs = tiny_call_kwargs(kind)
    whole = best_of_n(pipe, PROMPTS[:2], 4, scorer(), top_k=2, seed=7, output_type="pt", **kwargs)
    batched = best_of_n(pipe, PROMPTS[:2], 4, scorer(), top_k=2, batch_size=3, seed=7, output_type="pt", **kwargs)

    assert whole.all_scores.shape == (2, 4) and whole.scores.shape == (2, 2)
    assert torch.equal(whole.seeds, 7 + torch.arange(8).view(2, 4))
    torch.testing.assert_close(batched.all_scores, whole.all_scores, rtol=0, atol=1e-4)
    expected, order = whole.all_scores.sort(dim=1, descending=True)
    torch.testing.assert_close(whole.scores, expected[:, :2])
    assert torch.equal(whole.indices, order[:, :2])
    # The best image is the one its seed generates, and scores as reported.
    best = whole.images[1][0]
    seed = int(whole.seeds[1, whole.indices[1, 0]])
    direct = pipe(PROMPTS[1], generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images[0]
    torch.testing.assert_close(best, direct, rtol=0, atol=1e-5)
    torch.testing.assert_close(scorer()(best), whole.scores[1, :1], rtol=0, atol=1e-5)


def test_best_of_n_halves_the_batch_after_running_out_of_memory():
    pipe, kind = pipeline("sd"), "sd"

    def memory_limit(pipeline, step, timestep, callback_kwargs):
        # Stands in for an accelerator with room for two images at a time.
        if callback_kwargs["latents"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: more than 2 images)")
        return callback_kwargs

    limited = best_of_n(
        pipe, "a cat", 5, scorer(), batch_size=5, callback_on_step_end=memory_limit, **tiny_call_kwargs(kind)
    )
    assert limited.batch_size == 2
    reference = best_of_n(pipe, "a cat", 5, scorer(), batch_size=2, **tiny_call_kwargs(kind))
    torch.testing.assert_close(limited.all_scores, reference.all_scores, rtol=0, atol=1e-5)
    assert isinstance(limited.images[0][0], Image.Image)

    def no_memory(pipeline, step, timestep, callback_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        best_of_n(pipe, "a cat", 2, scorer(), callback_on_step_end=no_memory, **tiny_call_kwargs(kind))


def test_best_of_n_refuses_bad_arguments():
    with pytest.raises(ValueError, match="1 <= top_k <= n"):
        best_of_n(pipeline("sd"), "a cat", 2, scorer(), top_k=3)
    with pytest.raises(TypeError, match="sets 'num_images_per_prompt' itself"):
        best_of_n(pipeline("sd"), "a cat", 2, scorer(), num_images_per_prompt=2)


def test_filter_images_keeps_those_at_or_above_the_threshold(photos):
    images = torch.stack([torch.from_numpy(p[:64, :64]).permute(2, 0, 1).float() / 255 for p in photos])
    scores = scorer()(images)
    threshold = float(scores.median())
    result = filter_images(images, scorer(), threshold)
    expected = torch.nonzero(scores >= threshold).flatten()
    assert torch.equal(result.indices, expected)
    assert torch.equal(result.images, images[expected])
    torch.testing.assert_close(result.all_scores, scores)
    torch.testing.assert_close(result.scores, scores[expected])

    as_pil = [Image.fromarray(p[:64, :64]) for p in photos]
    from_pil = filter_images(as_pil, scorer(), threshold, batch_size=2)
    assert [as_pil.index(image) for image in from_pil.images] == from_pil.indices.tolist()
    assert all(s >= threshold for s in from_pil.scores)
