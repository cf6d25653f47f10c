"""Reward fine-tuning of a diffusion model's denoiser with LoRA, the Q-Scorer score of the decoded image
as the reward, by backpropagating through sampling.

Two methods (``RewardFinetuneConfig.method``):

- ``"draft"``: DRaFT-K / AlignProp-style truncated backpropagation. Sample all steps, with gradients
  only through the last ``truncation_steps`` denoiser calls, decode the final latents and ascend the
  reward. ``randomize_truncation`` draws K uniformly from 1..``truncation_steps`` each step
  (AlignProp's randomised truncation).
- ``"refl"``: ReFL. Sample without gradients up to a random late step, take that one step with
  gradients, decode the clean-image estimate it gives and ascend the reward.

Sampling runs the pipeline's own ``__call__`` (its prompt encoding, classifier-free guidance,
scheduler and latent layout), steered by a step-end callback that switches autograd on for the steps
that carry gradients.

Guards against reward hacking: ``kl_weight`` adds the mean squared difference between the fine-tuned
and the frozen base denoiser's predictions at the steps with gradients (for Gaussian sampling steps
with equal variances, their KL divergence up to a per-step factor); ``reward_clip`` caps the reward
so that images already scoring above it give no gradient; and every ``eval_every`` steps a held-out
prompt set is sampled with fixed seeds, scored, logged to ``eval/metrics.jsonl`` and saved as an image
grid ``eval/step_XXXXXX.png`` for a person to look at.

Launch (one or more GPUs, data parallel)::

    accelerate launch -m qscorer_reward.integrations.diffusers.reward_finetune \\
        --config training/configs/reward_finetune_sd15.yaml [--set max_train_steps=500 ...]

The LoRA weights are saved in diffusers' format (``pytorch_lora_weights.safetensors``); load them with
``pipeline.load_lora_weights(output_dir)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qscorer_reward.config_files import config_to_dict, load_config, parse_overrides, save_config
from qscorer_reward.library_noise import diffusers_pipeline_imports
from qscorer_reward.scorer import QScorer, require_gradients

from .latents import decode_latents, decoding_vae, denoiser, pipeline_family
from .sampling import SamplingObserver

METHODS = ("draft", "refl")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class RewardFinetuneConfig:
    """Everything a reward fine-tuning run needs; round-trips through YAML or JSON (`from_file`, `save`,
    read by `qscorer_reward.config_files`).

    Prompt lists (``train_prompts``, ``eval_prompts``) are lists of strings or the path of a text file
    with one prompt per line (a relative path, like every path here, is relative to the working
    directory).
    """

    # models
    pretrained_model: str | None = None  # diffusers pipeline folder or hub id (used by `main`)
    scorer: str | None = None  # Q-Scorer checkpoint folder or hub id; None: the bundled default
    # method
    method: str = "draft"
    truncation_steps: int = 1  # DRaFT K: denoiser calls with gradients, 1 <= K < num_inference_steps
    randomize_truncation: bool = False
    refl_step_range: tuple[float, float] = (0.75, 1.0)  # ReFL: the step is drawn from this part of the schedule
    # sampling
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    resolution: int = 512
    max_sequence_length: int | None = None  # SD3 / Flux T5 tokens (None: the pipeline's default)
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # optimisation
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    train_batch_size: int = 1  # prompts per process per micro-step
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    # reward hacking guards
    reward_clip: float | None = None
    kl_weight: float = 0.0
    # prompts and evaluation
    train_prompts: list[str] | str = field(default_factory=list)
    eval_prompts: list[str] | str = field(default_factory=list)
    eval_every: int = 100
    eval_batch_size: int = 4
    eval_seed: int = 0
    # bookkeeping
    output_dir: str = "reward-finetune"
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from: str | None = None  # a checkpoint folder, or "latest" in output_dir
    seed: int = 0
    report_to: str | None = None  # an accelerate tracker ("tensorboard", "wandb"...)

    def __post_init__(self):
        self.refl_step_range = tuple(self.refl_step_range)
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistent field."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be >= 2, got {self.num_inference_steps}")
        if not 1 <= self.truncation_steps < self.num_inference_steps:
            raise ValueError(
                f"truncation_steps must be in 1..num_inference_steps - 1 = {self.num_inference_steps - 1}, got "
                f"{self.truncation_steps} (the first denoiser call runs before any callback can enable gradients)"
            )
        low, high = self.refl_step_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(
                f"refl_step_range must be (low, high) with 0 <= low < high <= 1, got {self.refl_step_range}"
            )
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "eval_every",
            "eval_batch_size",
            "checkpoint_every",
            "lora_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict | None = None) -> RewardFinetuneConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` config; ``overrides`` (``{"key": value}``) replace
        fields. Unknown keys are an error."""
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON."""
        save_config(self, path)


def load_prompts(prompts: list[str] | str) -> list[str]:
    """A prompt list as given, or read from a text file (one prompt per line, blank lines skipped)."""
    if isinstance(prompts, str):
        lines = Path(prompts).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    return list(prompts)


class RewardFinetuner:
    """Fine-tunes ``pipeline``'s denoiser with a LoRA adapter to raise ``scorer``'s reward.

    On construction it freezes every model of the pipeline and the scorer, adds the LoRA adapter
    (float32 parameters), enables gradient checkpointing of the denoiser and the scorer if configured
    (the VAE decoder's is switched on around each decode with gradients) and builds the optimizer. The
    pipeline must already be on the accelerator's device, in the weight dtype wanted (e.g. bfloat16).

    Args:
        pipeline: a StableDiffusion, StableDiffusionXL, StableDiffusion3 or Flux pipeline.
        scorer: the reward model.
        config: the run's settings; ``pretrained_model`` and ``scorer`` are not used here.
        accelerator: an ``accelerate.Accelerator``; by default one built from the config.
    """

    def __init__(self, pipeline, scorer: QScorer, config: RewardFinetuneConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        require_gradients(scorer, f"reward fine-tuning ({config.method})")
        self.config = config
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, log_with=config.report_to, project_dir=config.output_dir
        )
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError("reward fine-tuning runs data parallel only (the LoRA gradients are averaged by hand)")
        self.pipeline = pipeline
        self.family = pipeline_family(pipeline)
        self.scorer = scorer.requires_grad_(False)
        self.train_prompts = load_prompts(config.train_prompts)
        self.eval_prompts = load_prompts(config.eval_prompts)
        if not self.train_prompts:
            raise ValueError("train_prompts is empty")

        for component in pipeline.components.values():
            if isinstance(component, nn.Module):
                component.requires_grad_(False)
        self.denoiser = denoiser(pipeline)
        self.denoiser.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules),
            )
        )
        cast_training_params(self.denoiser, dtype=torch.float32)
        if config.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            self.scorer.gradient_checkpointing_enable()
        self.parameters = [p for p in self.denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            self.parameters, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.adam_weight_decay
        )
        self.optimizer = self.accelerator.prepare(optimizer)
        # Not prepared: accelerate would step it once per process per step.
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        self.base_regression = _BaseRegression(self.denoiser) if config.kl_weight > 0 else None
        self.step = 0
        self.eval_history: list[dict] = []
        pipeline.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------------------------ training

    def train(self) -> list[dict]:
        """Run until ``max_train_steps``, evaluating at the start, every ``eval_every`` steps and at the
        end; returns the evaluation history (see `evaluate`)."""
        config, accelerator = self.config, self.accelerator
        if config.resume_from:
            self.load_checkpoint(self._resolve_checkpoint(config.resume_from))
        if accelerator.is_main_process and config.report_to:
            accelerator.init_trackers("qscorer-reward-finetune", config=_flat_config(config))
        if self.step == 0:
            self.evaluate()
        while self.step < config.max_train_steps:
            metrics = self.train_step()
            accelerator.log(metrics, step=self.step)
            if self.step % config.eval_every == 0 or self.step == config.max_train_steps:
                self.evaluate()
            if self.step % config.checkpoint_every == 0 or self.step == config.max_train_steps:
                self.save_checkpoint()
        if accelerator.is_main_process:
            self.save_lora(config.output_dir)
        accelerator.end_training()
        return self.eval_history

    def train_step(self) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its metrics."""
        config = self.config
        self.denoiser.train()
        totals = {"loss": 0.0, "reward": 0.0, "kl": 0.0}
        for micro in range(config.gradient_accumulation_steps):
            rng = _generator(config.seed, self.step, micro, self.accelerator.process_index)
            picks = torch.randint(len(self.train_prompts), (config.train_batch_size,), generator=rng)
            prompts = [self.train_prompts[i] for i in picks.tolist()]
            with decoding_vae(self.pipeline, config.gradient_checkpointing):
                loss, metrics = self.loss(prompts, rng)
                self.accelerator.backward(loss / config.gradient_accumulation_steps)
            for key, value in metrics.items():
                totals[key] += value / config.gradient_accumulation_steps
        self._average_gradients()
        totals["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        return totals

    def loss(self, prompts: list[str], rng: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss ``-mean(clipped reward) + kl_weight * kl`` for one micro-batch of ``prompts``, with
        the sampling noise drawn from ``rng``; also its metrics as floats."""
        config = self.config
        steps = config.num_inference_steps
        if config.method == "draft":
            k = config.truncation_steps
            if config.randomize_truncation:
                k = int(torch.randint(1, k + 1, (1,), generator=rng))
            window = _GradientWindow(first_grad_step=steps - k)
        else:
            low = max(1, int(steps * config.refl_step_range[0]))
            high = max(low + 1, min(steps, math.ceil(steps * config.refl_step_range[1])))
            step = int(torch.randint(low, high, (1,), generator=rng))
            window = _GradientWindow(first_grad_step=step, capture_step=step)
        if self.base_regression is not None:
            self.base_regression.reset()
        seeds = torch.randint(2**62, (len(prompts),), generator=rng).tolist()
        with self.accelerator.autocast():
            latents = self._sample(prompts, seeds, window, output_type="latent")
            latents = window.clean if config.method == "refl" else latents
            rewards = self.scorer(decode_latents(self.pipeline, latents, window.grid))
        SamplingObserver.of(self.pipeline).forget()
        clipped = rewards.clamp(max=config.reward_clip) if config.reward_clip is not None else rewards
        loss = -clipped.mean()
        kl = torch.zeros((), device=loss.device)
        if self.base_regression is not None:
            kl = self.base_regression.mean()
            loss = loss + config.kl_weight * kl
        metrics = {"loss": loss.detach().item(), "reward": rewards.detach().mean().item(), "kl": kl.detach().item()}
        return loss, metrics

    def _sample(self, prompts: list[str], seeds: list[int], callback, output_type: str):
        config = self.config
        kwargs = dict(
            prompt=prompts,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            height=config.resolution,
            width=config.resolution,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type=output_type,
            callback_on_step_end=callback,
        )
        if config.max_sequence_length is not None:
            kwargs["max_sequence_length"] = config.max_sequence_length
        return self.pipeline(**kwargs).images

    def _average_gradients(self) -> None:
        """Average the LoRA gradients over processes (the denoiser is not wrapped in DDP: the pipeline
        calls it directly)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for parameter, chunk in zip(self.parameters, flat.split([g.numel() for g in grads])):
            parameter.grad = chunk.view_as(parameter).to(parameter.dtype)

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Sample the held-out prompts with fixed seeds (``eval_seed + i`` for prompt ``i``), score them,
        append ``{"step", "mean_reward", "rewards"}`` to ``eval/metrics.jsonl`` and save the images
        as ``eval/step_XXXXXX.png`` (main process only; the others wait). Returns the record."""
        config, accelerator = self.config, self.accelerator
        record = {"step": self.step, "mean_reward": float("nan"), "rewards": []}
        if accelerator.is_main_process and self.eval_prompts:
            self.denoiser.eval()
            images = []
            for start in range(0, len(self.eval_prompts), config.eval_batch_size):
                prompts = self.eval_prompts[start : start + config.eval_batch_size]
                seeds = [config.eval_seed + start + i for i in range(len(prompts))]
                with accelerator.autocast():
                    images.append(self._sample(prompts, seeds, None, output_type="pt").float())
            images = torch.cat(images)
            rewards = self.scorer(images, batch_size=config.eval_batch_size).float().cpu()
            record = {"step": self.step, "mean_reward": float(rewards.mean()), "rewards": rewards.tolist()}
            folder = Path(config.output_dir) / "eval"
            folder.mkdir(parents=True, exist_ok=True)
            _image_grid(images).save(folder / f"step_{self.step:06d}.png")
            with open(folder / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            accelerator.log({"eval/mean_reward": record["mean_reward"]}, step=self.step)
        accelerator.wait_for_everyone()
        self.eval_history.append(record)
        return record

    # ------------------------------------------------------------------------------ saving, resume

    def save_lora(self, directory: str | Path) -> None:
        """Write the LoRA weights in diffusers' format, loadable with ``pipeline.load_lora_weights(directory)``."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser)
        if self.family in ("stable_diffusion", "stable_diffusion_xl"):
            layers = {"unet_lora_layers": convert_state_dict_to_diffusers(state)}
        else:
            layers = {"transformer_lora_layers": state}
        type(self.pipeline).save_lora_weights(directory, **layers, safe_serialization=True)

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-STEP``: LoRA weights, optimizer state, and the step, LR schedule and
        config as JSON. Keeps at most ``checkpoints_total_limit`` checkpoints."""
        config = self.config
        folder = Path(config.output_dir) / f"checkpoint-{self.step}"
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            self.save_lora(folder)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            state = {"step": self.step, "lr_scheduler": self.lr_scheduler.state_dict(), "config": config.to_dict()}
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            if config.checkpoints_total_limit is not None:
                for old in _checkpoints(Path(config.output_dir))[: -config.checkpoints_total_limit]:
                    for file in old.iterdir():
                        file.unlink()
                    old.rmdir()
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore the LoRA weights, optimizer, LR schedule and step saved by `save_checkpoint`."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        prefix = "unet." if self.family in ("stable_diffusion", "stable_diffusion_xl") else "transformer."
        weights = load_file(folder / LORA_WEIGHTS_NAME)
        weights = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
        if prefix == "unet.":
            weights = convert_unet_state_dict_to_peft(weights)
        result = set_peft_model_state_dict(self.denoiser, weights)
        if result is not None and getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: LoRA weights do not fit this model: {result.unexpected_keys[:5]}...")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        state = json.loads((folder / "trainer_state.json").read_text())
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = state["step"]

    def _resolve_checkpoint(self, resume_from: str) -> Path:
        if resume_from != "latest":
            return Path(resume_from)
        found = _checkpoints(Path(self.config.output_dir))
        if not found:
            raise FileNotFoundError(f"resume_from='latest' but {self.config.output_dir} has no checkpoint-* folder")
        return found[-1]


class _GradientWindow:
    """Step-end callback: switches autograd on after step ``first_grad_step - 1`` (the pipeline's
    ``__call__`` runs under ``no_grad``, which restores the previous mode when it returns), so the
    denoiser calls from ``first_grad_step`` on build a graph. With ``capture_step`` it keeps the clean
    latents estimated after that step in ``clean`` and stops the pipeline there.
    """

    def __init__(self, first_grad_step: int, capture_step: int | None = None):
        self.first_grad_step = first_grad_step
        self.capture_step = capture_step
        self.clean: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        observer = SamplingObserver.of(pipeline)
        if step_index == self.first_grad_step - 1:
            torch.set_grad_enabled(True)
        if step_index == self.capture_step:
            self.clean = observer.clean_latents(step_index, timestep, callback_kwargs["latents"])
            torch.set_grad_enabled(False)
            pipeline._interrupt = True
        self.grid = observer.grid
        return callback_kwargs


class _BaseRegression:
    """Forward hook on the denoiser: at every call that builds a graph, also runs the base model
    (adapters disabled, no graph) on the same inputs and accumulates the mean squared difference."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.total: torch.Tensor | None = None
        self.calls = 0
        self._running_base = False
        model.register_forward_hook(self, with_kwargs=True)

    def reset(self) -> None:
        self.total, self.calls = None, 0

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no denoiser call with gradients was recorded")
        return self.total / self.calls

    def __call__(self, module, args, kwargs, output):
        if self._running_base or not torch.is_grad_enabled():
            return
        self._running_base = True
        try:
            module.disable_adapters()
            with torch.no_grad():
                base = module(*args, **kwargs)
        finally:
            module.enable_adapters()
            self._running_base = False
        tuned, base = _sample_of(output), _sample_of(base)
        difference = (tuned.float() - base.float()).pow(2).mean()
        self.total = difference if self.total is None else self.total + difference
        self.calls += 1


def _sample_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _generator(seed: int, step: int, micro: int, process: int) -> torch.Generator:
    """A generator for one micro-step of one process, the same whenever the run is resumed."""
    state = np.random.SeedSequence([seed, step, micro, process]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _image_grid(images: torch.Tensor, columns: int = 4):
    """``[N, 3, H, W]`` in [0, 1] -> one PIL image, ``columns`` images per row, 2 px white gaps."""
    from PIL import Image

    count, _, height, width = images.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = torch.ones(3, rows * (height + 2) - 2, columns * (width + 2) - 2)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + 2), (index % columns) * (width + 2)
        grid[:, top : top + height, left : left + width] = image
    array = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


def _flat_config(config: RewardFinetuneConfig) -> dict:
    """The config with list values joined, for trackers that only take scalars."""
    return {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in config.to_dict().items()}


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``accelerate launch -m qscorer_reward.integrations.diffusers.reward_finetune --config FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m qscorer_reward.integrations.diffusers.reward_finetune",
        description="Reward fine-tuning of a diffusion model with LoRA, the Q-Scorer as the reward.",
    )
    parser.add_argument("--config", required=True, help="a RewardFinetuneConfig as YAML or JSON")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields (values parsed as YAML)"
    )
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    config = RewardFinetuneConfig.from_file(args.config, overrides)
    if config.pretrained_model is None:
        parser.error("the config must name pretrained_model")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, log_with=config.report_to, project_dir=config.output_dir
    )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    with diffusers_pipeline_imports():
        pipeline = DiffusionPipeline.from_pretrained(config.pretrained_model, torch_dtype=weight_dtype)
    pipeline.to(accelerator.device)
    scorer = QScorer.from_pretrained(config.scorer, device=accelerator.device, dtype=weight_dtype)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        config.save(Path(config.output_dir) / "reward_finetune_config.yaml")
    torch.manual_seed(config.seed)  # the LoRA initialisation
    history = RewardFinetuner(pipeline, scorer, config, accelerator).train()
    if accelerator.is_main_process:
        first, last = history[0], history[-1]
        print(
            f"held-out reward: {first['mean_reward']:.4f} at step {first['step']} -> "
            f"{last['mean_reward']:.4f} at step {last['step']}; LoRA weights in {config.output_dir}"
        )


if __name__ == "__main__":
    main()
