"""GRPO with Q-Scorer as a reward: a language model writes image descriptions, a diffusers
pipeline renders them, Q-Scorer rates the images, and TRL's GRPOTrainer updates the language model.

    python examples/trl_grpo_reward.py            # tiny random models built in code, CPU, seconds
    python examples/trl_grpo_reward.py --policy Qwen/Qwen2.5-0.5B --pipeline stabilityai/sd-turbo \\
        --scorer path/to/qscorer-checkpoint --device cuda --max-steps 200
    python examples/trl_grpo_reward.py --scorer-url http://127.0.0.1:8000   # the scorer of `qscorer serve`

With the defaults nothing is downloaded and every model has random weights: the run shows the
wiring (rendering, scoring, logging, updates), not learning. Nothing is saved unless ``--output-dir``
names a folder for TRL's files; ``--smoke`` runs one step.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from qscorer_reward import QScorer
from qscorer_reward.integrations.trl import QScorerRewardFunc

SUBJECTS = ["a lighthouse at dusk", "a bowl of fruit", "a cat on a windowsill", "a mountain lake"]


def load_models(args):
    """The policy and its tokenizer, the text-to-image pipeline and the scorer."""
    if args.policy:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        policy, tokenizer = (
            AutoModelForCausalLM.from_pretrained(args.policy),
            AutoTokenizer.from_pretrained(args.policy),
        )
    else:
        from qscorer_reward.testing.policies import tiny_policy

        policy, tokenizer = tiny_policy()
    if args.pipeline:
        from diffusers import AutoPipelineForText2Image

        pipeline = AutoPipelineForText2Image.from_pretrained(args.pipeline, torch_dtype=torch.float16).to(args.device)
    else:
        from qscorer_reward.testing.pipelines import tiny_pipeline

        pipeline = tiny_pipeline("sd")
    if args.scorer_url:
        from qscorer_reward.serving import RemoteQScorer

        scorer = RemoteQScorer(args.scorer_url)  # token from $QSCORER_SERVE_TOKEN, if set
    elif args.scorer:
        scorer = QScorer.from_pretrained(args.scorer, device=args.device)
    else:
        from qscorer_reward.testing import tiny_scorer

        scorer = tiny_scorer(max_pixels=56 * 56)
    return policy, tokenizer, pipeline, scorer


def brevity_reward(completions, **kwargs):
    """A second reward, on another scale: shorter descriptions are better."""
    return [-len(completion) / 100 for completion in completions]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="causal LM id or path (default: a tiny random one)")
    parser.add_argument("--pipeline", help="diffusers text-to-image id or path (default: a tiny random one)")
    parser.add_argument("--scorer", help="Q-Scorer checkpoint (default: a tiny random one)")
    parser.add_argument("--scorer-url", help="a running `qscorer serve` to score with instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inference-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--output-dir", help="TRL's output folder (default: a temporary one, removed at the end)")
    parser.add_argument("--smoke", action="store_true", help="one step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grpo-qscorer-") as scratch:
        train(args, args.output_dir or scratch, max_steps=1 if args.smoke else args.max_steps)


def train(args, output_dir: str, max_steps: int):
    policy, tokenizer, pipeline, scorer = load_models(args)

    def render(prompts, completions):
        # The policy's completion continues the prompt; together they are the image description.
        texts = [prompt + completion for prompt, completion in zip(prompts, completions)]
        return pipeline(texts, num_inference_steps=args.inference_steps, output_type="pt").images

    # "unit" maps scores from the MOS scale (1..5) to [0, 1], the scale of the brevity reward.
    quality = QScorerRewardFunc(scorer, render_fn=render, normalize="unit", batch_size=8)
    dataset = Dataset.from_dict({"prompt": [f"A photo of {subject}," for subject in SUBJECTS]})
    config = GRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        logging_steps=1,
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=False,
        activation_checkpointing=False,  # small policies need no recomputation
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=policy,
        processing_class=tokenizer,
        reward_funcs=[quality, brevity_reward],
        args=config,
        train_dataset=dataset,
    )
    trainer.train()

    for entry in trainer.state.log_history:
        if "qscorer/score_mean" in entry:
            print(
                f"step {entry['step']}: quality score {entry['qscorer/score_mean']:.3f} "
                f"(std {entry['qscorer/score_std']:.3f}), quality reward {entry['rewards/qscorer/mean']:.3f}, "
                f"total reward {entry['reward']:.3f}"
            )


if __name__ == "__main__":
    main()
