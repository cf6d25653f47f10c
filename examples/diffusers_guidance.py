"""Reward guidance with the Q-Scorer in a diffusers sampling loop: the same prompts and seeds, sampled
without and with `QScorerGuidance`, each image scored.

Runs offline on the CPU in seconds with a tiny random SDXL pipeline and a tiny random scorer (the
scores then only show that guidance moves images towards what that scorer rates higher)::

    python examples/diffusers_guidance.py              # --smoke: 4 steps, seconds

With real models (a GPU strongly advised)::

    python examples/diffusers_guidance.py --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --scorer path/to/qscorer-checkpoint --steps 30 --size 1024 --start 15 --out guided
"""

import argparse
from pathlib import Path

import torch

from qscorer_reward import QScorer
from qscorer_reward.integrations.diffusers import QScorerGuidance

PROMPTS = ["a lighthouse on a rocky coast at sunset", "a bowl of ramen on a wooden table"]


def load(args):
    if args.model is None:
        from qscorer_reward.testing import tiny_scorer
        from qscorer_reward.testing.pipelines import TINY_IMAGE_SIZE, tiny_pipeline

        args.size = TINY_IMAGE_SIZE
        return tiny_pipeline("sdxl"), tiny_scorer(max_pixels=56 * 56)
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    return pipe, QScorer.from_pretrained(args.scorer, device=device, dtype=dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a diffusers SD / SDXL / SD3 / Flux pipeline (default: tiny random SDXL)")
    parser.add_argument("--scorer", help="a Q-Scorer checkpoint (default: the bundled one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--start", type=int, default=2, help="first guided step")
    parser.add_argument("--scale", type=float, default=0.1, help="RMS latent change per guided step")
    parser.add_argument("--out", type=Path, help="save the images here")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 4 steps")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 4

    pipe, scorer = load(args)
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps, output_type="pt")

    def sample(callback=None):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, generator=generators, callback_on_step_end=callback, **call).images

    plain = sample()
    guidance = QScorerGuidance(
        scorer, guidance_scale=args.scale, start_step_index=args.start, timestep_weighting="signal"
    )
    guided = sample(guidance)

    with torch.no_grad():
        plain_scores, guided_scores = scorer(plain), scorer(guided)
    for prompt, before, after in zip(PROMPTS, plain_scores.tolist(), guided_scores.tolist()):
        print(f"{before:.3f} -> {after:.3f}  {prompt}")
    print("previews during guidance (mean score per step):")
    for step, scores in guidance.step_scores.items():
        print(f"  step {step}: {scores.mean():.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, images in (("plain", plain), ("guided", guided)):
            for i, image in enumerate(pipe.image_processor.pt_to_numpy(images.float().cpu())):
                pipe.image_processor.numpy_to_pil(image[None])[0].save(args.out / f"{name}_{i}.png")


if __name__ == "__main__":
    main()
