"""Selection by Q-Scorer score: best-of-N per prompt, a quality gate that regenerates rejected images
with new seeds, and filtering a folder-worth of images by a threshold.

Runs offline on the CPU with a tiny random SD3 pipeline and a tiny random scorer (``--smoke``: fewer
candidates and steps, seconds)::

    python examples/best_of_n.py

With real models::

    python examples/best_of_n.py --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --scorer path/to/qscorer-checkpoint --steps 28 --size 1024 --n 8
"""

import argparse

import torch

from qscorer_reward import QScorer
from qscorer_reward.integrations.diffusers import QualityGate, best_of_n, filter_images, generate_with_gate

PROMPTS = ["a harbour with fishing boats at dawn", "a close-up of a butterfly on a flower"]


def load(args):
    if args.model is None:
        from qscorer_reward.testing import tiny_scorer
        from qscorer_reward.testing.pipelines import tiny_call_kwargs, tiny_pipeline

        return tiny_pipeline("sd3"), tiny_scorer(max_pixels=56 * 56), tiny_call_kwargs("sd3", args.steps)
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps)
    return pipe, QScorer.from_pretrained(args.scorer, device=device, dtype=dtype), call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a diffusers SD / SDXL / SD3 / Flux pipeline (default: tiny random SD3)")
    parser.add_argument("--scorer", help="a Q-Scorer checkpoint (default: the bundled one)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=6, help="candidates per prompt")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 3 candidates, 3 steps")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.steps = 3, 3
    pipe, scorer, call = load(args)

    # 1. Best of N: n candidates per prompt (batched to fit memory), keep the best two.
    result = best_of_n(pipe, PROMPTS, args.n, scorer, top_k=2, batch_size=4, **call)
    for prompt, scores, best in zip(PROMPTS, result.all_scores, result.scores):
        candidates = ", ".join(f"{s:.3f}" for s in scores.tolist())
        kept = ", ".join(f"{s:.3f}" for s in best.tolist())
        print(f"{prompt}: candidates [{candidates}] -> kept [{kept}]")

    # 2. A gate at 60% of the schedule: rejected images are regenerated with new seeds, three tries at most.
    threshold = float(result.all_scores.median())
    gate = QualityGate(scorer, threshold=threshold, gate_step_ratio=0.6)
    gated = generate_with_gate(pipe, PROMPTS, gate, num_images_per_prompt=2, max_attempts=3, **call)
    for j, (passed, score, attempts) in enumerate(zip(gated.passed, gated.scores, gated.attempts)):
        status = "accepted" if passed else "rejected"
        print(f"image {j}: {status} with preview score {score:.3f} after {attempts} attempt(s)")

    # 3. Filter finished images by score.
    images = [image for per_prompt in result.images for image in per_prompt]
    kept = filter_images(images, scorer, min_score=threshold)
    print(f"filter at {threshold:.3f}: kept images {kept.indices.tolist()} of {len(images)}")


if __name__ == "__main__":
    main()
