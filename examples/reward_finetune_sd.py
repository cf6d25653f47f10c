"""Reward fine-tuning of a Stable Diffusion UNet with LoRA against the Q-Scorer (DRaFT-K), in process.

Offline on the CPU, a tiny random SD pipeline and a tiny random scorer, a few steps (under a minute)::

    python examples/reward_finetune_sd.py --output-dir runs/reward-finetune-sd

``--smoke`` runs two steps (seconds). For real runs, use the module entry point with a config (one or
more GPUs)::

    accelerate launch -m qscorer_reward.integrations.diffusers.reward_finetune \\
        --config training/configs/reward_finetune_sd15.yaml
"""

import argparse
from importlib.resources import files
from pathlib import Path

import torch

from qscorer_reward.integrations.diffusers import RewardFinetuneConfig, RewardFinetuner
from qscorer_reward.integrations.diffusers.reward_finetune import load_prompts
from qscorer_reward.testing import tiny_scorer
from qscorer_reward.testing.pipelines import tiny_pipeline

# The prompt lists installed with the package (training/configs/prompts in the repository).
PROMPTS = files("qscorer_reward.training") / "configs" / "prompts"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where the LoRA weights and samples go")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--method", choices=("draft", "refl"), default="draft")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: two steps")
    args = parser.parse_args()

    output_dir = args.output_dir
    steps = 2 if args.smoke else args.steps
    config = RewardFinetuneConfig(
        method=args.method,
        truncation_steps=2,  # backpropagate through the last 2 of 4 sampling steps
        num_inference_steps=4,
        guidance_scale=3.0,
        resolution=32,
        lora_rank=4,
        lora_alpha=4.0,
        learning_rate=5e-2,  # large: tiny random models and a handful of steps
        max_train_steps=steps,
        train_batch_size=2,
        mixed_precision="no",
        train_prompts=load_prompts(str(PROMPTS / "train.txt")),
        eval_prompts=load_prompts(str(PROMPTS / "eval.txt"))[:4],
        eval_every=steps,
        output_dir=str(output_dir),
    )
    torch.manual_seed(0)
    trainer = RewardFinetuner(tiny_pipeline("sd"), tiny_scorer(max_pixels=56 * 56), config)
    history = trainer.train()
    for record in history:
        print(f"step {record['step']}: held-out mean reward {record['mean_reward']:.4f}")
    print(f"sample grids and metrics in {output_dir}/eval, LoRA weights in {output_dir}")

    # The LoRA weights load into any pipeline of the same architecture with diffusers' own loader.
    fresh = tiny_pipeline("sd")
    fresh.load_lora_weights(output_dir)
    print("loaded LoRA adapters:", list(fresh.unet.peft_config))


if __name__ == "__main__":
    main()
