"""`ScoreTokenTrainer`: score-token fine-tuning on accelerate, on one device or many.

The same code runs as a plain script and under ``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO-2):
accelerate wraps the model and optimizer, runs the backward pass, accumulates gradients and syncs
them; this module feeds it the data, the objective, evaluation and checkpoints.

Output directory::

    checkpoints/step-00000500/   training state to resume from (written atomically)
    best/                        Q-Scorer checkpoint with the best evaluation metric so far
    final/                       Q-Scorer checkpoint at the end (trained-parts form; whole weights on
                                 a base it cannot refer to, the paper's mPLUG-Owl2 base)
    final-merged/                the same with LoRA merged, whole weights (with ``save_merged``)
    eval_report.json             final per-dataset metrics
    train_log.jsonl              one JSON object per logging step, evaluation and skipped image
    training_config.yaml         the configuration of the run
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    broadcast_object_list,
    gather_object,
    set_seed,
)

from qscorer_reward.checkpoint import lasting_base, replace_directory
from qscorer_reward.config_files import config_to_dict
from qscorer_reward.extras import require_extra
from qscorer_reward.preprocessing import to_unit_pixels
from qscorer_reward.scorer import QScorer

from .augment import QualityPreservingAugment
from .callbacks import TrainerCallback
from .config import LossWeights, ParameterGroup, TrainingConfig
from .data import IQADataset, IQARecord, MixtureSampler, check_images, collate_items
from .evaluation import dataset_metrics, format_table, predict, write_report
from .export import save_merged, save_trained_parts, save_whole
from .losses import fidelity_loss, margin_ranking_loss, plcc_loss, score_mse_loss
from .model import QScorerForTraining, TrainableParts, answer_token_count, language_model_modules
from .sources import load_records

require_extra("train", "qscorer_reward.training")

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"
# Settings a resumed run must share with the interrupted one for its data position (or, for the
# parameter groups, its schedules) to mean the same, each with the value a checkpoint written
# before the setting existed stands for (None: it was always recorded).
RESUME_INVARIANTS = {
    "per_device_batch_size": None,
    "gradient_accumulation_steps": None,
    "seed": None,
    "num_processes": None,
    "parameter_groups": [],
}

# Distributed types whose wrapped model holds flattened or partitioned parameters.
SHARDED_PARAMETERS = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def training_objective(
    outputs: dict[str, torch.Tensor],
    mos: torch.Tensor,
    mos_std: torch.Tensor,
    weights: LossWeights,
    callbacks: tuple[TrainerCallback, ...] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the enabled loss terms and each term (unweighted), from the model's
    outputs (``raw_scores``, ``ce_loss``; a ``vision_only`` forward has neither, and no score
    terms) and the batch's MOS ``[B]`` / MOS std ``[B]`` (NaN if unknown), followed by the
    callbacks' terms (`TrainerCallback.loss_terms`).

    Score terms read the unbounded regression output, so that a MOS at either end of the scale is
    reachable exactly; scoring bounds it (see `qscorer_reward.head.soft_clamp`).
    """
    weighted: dict[str, tuple[float, torch.Tensor]] = {}
    if "raw_scores" in outputs:
        raw = outputs["raw_scores"]
        if weights.mse:
            weighted["mse"] = (weights.mse, score_mse_loss(raw, mos))
        if weights.ce:
            weighted["ce"] = (weights.ce, outputs["ce_loss"])
        if weights.plcc:
            weighted["plcc"] = (weights.plcc, plcc_loss(raw, mos))
        if weights.fidelity:
            weighted["fidelity"] = (weights.fidelity, fidelity_loss(raw, mos, mos_std, weights.fidelity_std))
        if weights.ranking:
            weighted["ranking"] = (weights.ranking, margin_ranking_loss(raw, mos, weights.ranking_margin))
    for callback in callbacks:
        weighted |= callback.loss_terms(outputs, mos, mos_std)
    if not weighted:
        raise ValueError("every loss weight is 0: nothing to train")
    total = sum(weight * value for weight, value in weighted.values())
    return total, {name: value for name, (_, value) in weighted.items()}


class ScoreTokenTrainer:
    """Fine-tune a Q-Scorer on a vision-language base model with the configured datasets.

    Usage::

        trainer = ScoreTokenTrainer(TrainingConfig.from_file("recipe.yaml"))
        report = trainer.train()          # resumes from output_dir/checkpoints if there is one

    Args:
        config: the run's `TrainingConfig`.
        accelerator: an `accelerate.Accelerator` to use (default: one built from the config and
            the ``accelerate launch`` environment).
        callbacks: `TrainerCallback` s that extend the run (training aids, loss terms).
    """

    def __init__(
        self,
        config: TrainingConfig,
        accelerator: Accelerator | None = None,
        callbacks: list[TrainerCallback] | tuple[TrainerCallback, ...] = (),
    ):
        self.config = config
        self.callbacks = tuple(callbacks)
        self.latest_group_start = max((group.start_step for group in config.parameter_groups), default=0)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=config.report_to or None,
            project_dir=config.output_dir,
            # A parameter group that starts later gets no gradients before it does.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
            if self.latest_group_start
            else None,
        )
        if self.latest_group_start:
            self._check_later_groups_are_supported()
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self._skipped_paths: set[str] = set()

    # ------------------------------------------------------------------ public

    def train(self, resume: str | None = "auto") -> dict[str, dict[str, float]]:
        """Run the training; returns the final evaluation report ``{dataset: metrics}`` (empty
        without eval datasets).

        ``resume``: ``"auto"`` continues from the latest complete checkpoint in
        ``output_dir/checkpoints`` if there is one; a path continues from that checkpoint;
        ``None`` starts afresh (existing checkpoints are then replaced as the run goes).
        """
        config, accelerator = self.config, self.accelerator
        if config.base_model:  # a base its checkpoints could not name is refused before anything is done
            lasting_base(config.base_model, Path(config.output_dir) / "final")
        set_seed(config.seed)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / "training_config.yaml")
            self._remove_partial_checkpoints()
        accelerator.wait_for_everyone()

        train_sets = self._load_datasets(config.train_datasets)
        eval_sets = self._load_datasets(config.eval_datasets)
        model = self._build_model()
        self.model = model
        augment = QualityPreservingAugment(
            config.augment.hflip, config.augment.min_crop_side, model.scorer.config.max_pixels
        )
        records = [record for recs in train_sets.values() for record in recs]
        dataset = IQADataset(records, augment if augment.active else None, seed=config.seed)
        sampler = MixtureSampler(
            [len(recs) for recs in train_sets.values()],
            weights=None if config.train_datasets[0].weight is None else [d.weight for d in config.train_datasets],
            samples_per_epoch=config.samples_per_epoch,
            seed=config.seed,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
            group_size=config.training_group_size(),
        )
        steps_per_epoch = len(sampler) // config.per_device_batch_size // config.gradient_accumulation_steps
        if steps_per_epoch < 1:
            raise ValueError(
                f"{len(records)} training images make no full step of {config.per_device_batch_size} images x "
                f"{config.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes"
            )
        total_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
        if self.latest_group_start >= total_steps:
            raise ValueError(
                f"a parameter group starts at step {self.latest_group_start}, after all {total_steps} steps"
            )

        optimizer = self._optimizer(model)
        scheduler = self._scheduler(optimizer, total_steps)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed reads the batch size from prepared dataloaders; this trainer shards its own.
            ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
        prepared, optimizer = accelerator.prepare(model, optimizer)
        self.prepared = prepared
        self._register_state_hooks(prepared)

        state = {"global_step": 0, "epoch": 0, "batches_done": 0, "best_metric": None, "best_step": None}
        checkpoint = self._find_checkpoint(resume)
        if checkpoint is not None:
            state = self._load_training_state(checkpoint, scheduler)
            self._log({"event": "resumed", "checkpoint": str(checkpoint), "step": state["global_step"]})
        if config.report_to:
            accelerator.init_trackers("qscorer-score-token-training", config=_flat(config.to_dict()))

        parameter_groups = self._parameter_groups(model)
        if accelerator.distributed_type in SHARDED_PARAMETERS:  # clip their parameters as one
            parameter_groups = [(ParameterGroup("all"), [p for p in prepared.parameters() if p.requires_grad])]
        batches_per_epoch = steps_per_epoch * config.gradient_accumulation_steps
        progress = self._progress_bar(total_steps, state["global_step"])
        running: dict[str, list[float]] = {}
        failed: list[tuple[str, str]] = []
        report: dict[str, dict[str, float]] | None = None
        started = time.monotonic()
        prepared.train()
        while state["global_step"] < total_steps:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            sampler.set_position(state["batches_done"] * config.per_device_batch_size)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=config.per_device_batch_size,
                sampler=sampler,
                num_workers=config.num_workers,
                collate_fn=collate_items,
                drop_last=True,
                # Its own generator: creating the iterator must not draw from the global one,
                # whose state a resumed run restores (dropout draws from it).
                generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch),
            )
            for batch in loader:
                if state["batches_done"] >= batches_per_epoch:
                    break
                failed.extend(batch["failed"])
                terms = self._train_on_batch(
                    batch, prepared, optimizer, scheduler, parameter_groups, state["global_step"]
                )
                state["batches_done"] += 1
                for name, value in terms.items():
                    running.setdefault(name, []).append(value)
                if not accelerator.sync_gradients:
                    continue
                state["global_step"] += 1
                step = state["global_step"]
                progress.update(1)
                if step % config.logging_steps == 0 or step == total_steps:
                    self._log_training(step, running, failed, scheduler, progress, started)
                    running, failed = {}, []
                if eval_sets and self._evaluation_due(step, state["batches_done"] >= batches_per_epoch, total_steps):
                    report = self._evaluate_and_keep_best(eval_sets, state, step)
                if config.save_steps and (step % config.save_steps == 0 or step == total_steps):
                    self._save_training_state(state, scheduler)
                if step >= total_steps:
                    break
            if state["global_step"] < total_steps:
                state["epoch"] += 1
                state["batches_done"] = 0
        progress.close()

        if eval_sets and report is None:  # resumed after the last step: evaluate what was trained
            report = self._evaluate(eval_sets)
        self._export(self.output_dir / "final")
        if accelerator.is_main_process:
            if report:
                write_report(report, self.output_dir / "eval_report.json")
                print(format_table(report), file=sys.stderr)
            if config.save_merged and self.model.scorer.config.base_model:
                save_merged(self.output_dir / "final", self.output_dir / "final-merged")
            elif config.save_merged:
                self._warn("save_merged: final/ already holds the whole weights; no final-merged/ written")
        accelerator.wait_for_everyone()
        if config.report_to:
            accelerator.end_training()
        return report or {}

    def _train_on_batch(
        self, batch: dict, prepared, optimizer, scheduler, parameter_groups, step: int
    ) -> dict[str, float]:
        """Forward and backward on one micro-batch of optimizer step ``step`` (from 0); an
        optimizer step when accelerate says the accumulated gradients are complete, in which the
        groups not started yet (`ParameterGroup.start_step`) take no part and every other group is
        clipped to ``max_grad_norm`` on its own. Returns the loss and its terms (unweighted)."""
        accelerator, config = self.accelerator, self.config
        with accelerator.accumulate(prepared):
            pixels = to_unit_pixels(batch["pixels"], device=accelerator.device)
            mos, mos_std = batch["mos"].to(accelerator.device), batch["mos_std"].to(accelerator.device)
            forward_kwargs = {}
            for callback in self.callbacks:
                forward_kwargs |= callback.forward_kwargs(step)
            outputs = prepared(pixels, compute_ce=bool(config.loss.ce), mos=mos, **forward_kwargs)
            loss, terms = training_objective(outputs, mos, mos_std, config.loss, self.callbacks)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                for group, parameters in parameter_groups:
                    if step < group.start_step:
                        for param in parameters:
                            param.grad = None  # no update and no optimizer state before the group starts
                if config.max_grad_norm and len(parameter_groups) == 1:
                    accelerator.clip_grad_norm_(parameter_groups[0][1], config.max_grad_norm)
                elif config.max_grad_norm:
                    # fp16's gradient scaler may unscale once per step: here, not per group.
                    accelerator.unscale_gradients()
                    for _, parameters in parameter_groups:
                        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        return {name: float(value.detach()) for name, value in {"loss": loss, **terms}.items()}

    # ------------------------------------------------------------------ setup

    def _check_later_groups_are_supported(self) -> None:
        accelerator = self.accelerator
        if accelerator.distributed_type in SHARDED_PARAMETERS:
            raise ValueError(
                "a parameter group with start_step > 0 needs a single process or DDP (FSDP and DeepSpeed are not "
                "supported)"
            )
        handler = accelerator.ddp_handler
        if accelerator.num_processes > 1 and not (handler is not None and handler.find_unused_parameters):
            raise ValueError(
                "a parameter group with start_step > 0 under DDP needs find_unused_parameters (its parameters may "
                "get no gradients before it starts): pass an Accelerator with "
                "DistributedDataParallelKwargs(find_unused_parameters=True), or let the trainer build it"
            )

    def _parameter_groups(self, model: QScorerForTraining) -> list[tuple[ParameterGroup, list[torch.nn.Parameter]]]:
        """The config's parameter groups with their trained parameters (in the model's order);
        without groups, one group ``"all"`` of every trained parameter."""
        groups = self.config.parameter_groups
        trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if not groups:
            return [(ParameterGroup("all"), [param for _, param in trained])]
        rest = next((group for group in groups if not group.parameters), None)
        members: dict[str, list[torch.nn.Parameter]] = {group.name: [] for group in groups}
        outside = []
        for name, param in trained:
            matching = (g for g in groups if any(fnmatch.fnmatchcase(name, pattern) for pattern in g.parameters))
            group = next(matching, rest)
            if group is None:
                outside.append(name)
            else:
                members[group.name].append(param)
        if outside:
            raise ValueError(
                f"{len(outside)} trained parameters belong to no parameter group (e.g. {outside[:3]}): add a "
                "pattern that matches them, or a group without patterns, which takes the rest"
            )
        empty = [name for name, params in members.items() if not params]
        if empty:
            raise ValueError(f"parameter group(s) {empty} match no trained parameter")
        return [(group, members[group.name]) for group in groups]

    def _load_datasets(self, specs) -> dict[str, list[IQARecord]]:
        """Records per dataset, without the images that are missing or unreadable (reported)."""
        loaded = {spec.name: load_records(spec) for spec in specs}
        if not self.config.verify_images:
            return loaded
        accelerator = self.accelerator
        result = {}
        for name, records in loaded.items():
            # One process reads the headers; all keep the same records.
            problems = [check_images(records)[1]] if accelerator.is_main_process else [None]
            if accelerator.num_processes > 1:
                broadcast_object_list(problems)
            bad = {str(path) for path, _ in problems[0]}
            self._report_failed(name, [(str(path), reason) for path, reason in problems[0]], warn=False)
            if bad:
                self._warn(f"dataset {name!r}: {len(bad)} of {len(records)} images missing or unreadable, skipped")
            result[name] = [record for record in records if str(record.path) not in bad]
            if not result[name]:
                raise ValueError(f"dataset {name!r}: none of its {len(records)} images can be read")
        return result

    def _build_model(self) -> QScorerForTraining:
        config = self.config
        if (
            config.dtype != "float32"
            and self.accelerator.mixed_precision == "no"
            and (
                config.train_vision_tower or config.train_merger or config.train_language_model or config.train_lm_head
            )
        ):
            raise ValueError(
                "training the vision tower, merger, output layer or language model of a half-precision backbone "
                "needs mixed_precision bf16 or fp16"
            )
        # The head's and the score rows' initialisation draw from the global generator: seeded.
        set_seed(config.seed)
        scorer = QScorer.from_base_model(
            config.base_model,
            num_score_tokens=config.num_score_tokens,
            prompt_template=config.prompt_template,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            head_hidden_sizes=config.head_hidden_sizes,
            dtype=getattr(torch, config.dtype),
            attn_implementation=config.attn_implementation,
        )
        lora = None
        if config.lora is not None:
            from peft import LoraConfig

            targets = config.lora.target_modules
            if not isinstance(targets, str):
                # The language model's modules only, by their full names: the vision side may use
                # the same short names.
                targets = language_model_modules(scorer.backbone, targets)
            lora = LoraConfig(
                r=config.lora.r,
                lora_alpha=config.lora.alpha,
                lora_dropout=config.lora.dropout,
                target_modules=targets,
            )
        parts = TrainableParts(
            lora=lora,
            vision_tower=config.train_vision_tower,
            merger=config.train_merger,
            language_model=config.train_language_model,
            lm_head=config.train_lm_head and bool(config.loss.ce),  # only the cross-entropy reads it
            output_rows=bool(config.loss.ce),
        )
        model = QScorerForTraining(
            scorer, parts, answer_token_count(scorer, config.answer_text), config.gradient_checkpointing
        )
        for callback in self.callbacks:
            callback.on_model_built(model)
        return model

    def _optimizer(self, model: QScorerForTraining) -> torch.optim.Optimizer:
        """AdamW with an optimizer parameter group per learning rate, weight decay and parameter
        group (each keeps its `ParameterGroup` name under ``"group"``, for its schedule)."""
        config = self.config
        group_of = {id(param): group.name for group, params in self._parameter_groups(model) for param in params}
        groups: dict[tuple[float, float, str], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = config.head_learning_rate if name.startswith("scorer.head.") and config.head_learning_rate else None
            decay = config.weight_decay if param.ndim >= 2 else 0.0
            groups.setdefault((lr or config.learning_rate, decay, group_of[id(param)]), []).append(param)
        param_groups = [
            {"params": params, "lr": lr, "weight_decay": decay, "group": group}
            for (lr, decay, group), params in groups.items()
        ]
        return torch.optim.AdamW(param_groups, lr=config.learning_rate)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """``lr_scheduler`` with a warm-up of ``warmup_ratio`` of the steps, over the whole run; a
        parameter group with ``start_step`` N stays at 0 for N steps and then follows the same kind
        of schedule over the steps that remain."""
        config = self.config
        from transformers import get_scheduler

        def multiplier(steps: int):
            # The schedule as a function of the step, read off a scheduler of a stand-in optimizer.
            stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            schedule = get_scheduler(
                config.lr_scheduler,
                stand_in,
                num_warmup_steps=math.ceil(config.warmup_ratio * steps),
                num_training_steps=steps,
            )
            if not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(f"lr_scheduler {config.lr_scheduler!r} is not a schedule of the step")
            return schedule.lr_lambdas[0]

        whole_run = multiplier(total_steps)
        if not self.latest_group_start:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, whole_run)

        def delayed(delay: int):
            after_delay = multiplier(total_steps - delay)
            return lambda step: after_delay(step - delay) if step >= delay else 0.0

        starts = {group.name: group.start_step for group in config.parameter_groups}
        schedules = {start: delayed(start) for start in set(starts.values()) if start}
        lambdas = [schedules.get(starts[group["group"]], whole_run) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    # ------------------------------------------------------------------ evaluation

    def _evaluation_due(self, step: int, end_of_epoch: bool, total_steps: int) -> bool:
        if step <= self.latest_group_start:  # not everything has started training yet
            return False
        if step == total_steps:
            return True  # the final report
        if self.config.eval_steps:
            return step % self.config.eval_steps == 0
        return end_of_epoch

    def _evaluate(self, eval_sets: dict[str, list[IQARecord]]) -> dict[str, dict[str, float]]:
        """Metrics per eval dataset, computed on every process from all processes' predictions."""
        accelerator = self.accelerator
        model = self.prepared
        # Sharded parameters (FSDP) need the wrapped model; elsewhere the unwrapped one skips
        # the wrapper's collective calls, which evaluation does not need.
        if accelerator.distributed_type != DistributedType.FSDP:
            model = accelerator.unwrap_model(model)
        model.eval()
        device = accelerator.device

        def score(images: list[torch.Tensor]) -> torch.Tensor:
            return model(to_unit_pixels(images, device=device), compute_ce=False)["scores"]

        report = {}
        for name, records in eval_sets.items():
            scores, failed = predict(
                score,
                records,
                self.config.eval_batch_size or self.config.per_device_batch_size,
                num_workers=self.config.num_workers,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                progress=self._live_progress,
                description=f"eval {name}",
            )
            gathered = gather_object([(scores, failed)])
            merged = {index: value for part, _ in gathered for index, value in part.items()}
            self._report_failed(name, [pair for _, part in gathered for pair in part])
            report[name] = dataset_metrics(records, merged)
        self.prepared.train()
        return report

    def _evaluate_and_keep_best(self, eval_sets, state: dict, step: int) -> dict[str, dict[str, float]]:
        """Evaluate; export ``best/`` when the selection metric improved. Returns the report."""
        report = self._evaluate(eval_sets)
        config = self.config
        values = [
            metrics[config.metric_for_best] for name, metrics in report.items() if config.best_dataset in (None, name)
        ]
        metric = float(np.mean(values))
        self._log({"event": "eval", "step": step, "metrics": report, "selection_metric": metric})
        if config.report_to:
            self.accelerator.log(_flat({"eval": report}), step=step)
        lower_is_better = config.metric_for_best == "rmse"
        best = state["best_metric"]
        improved = math.isfinite(metric) and (best is None or (metric < best if lower_is_better else metric > best))
        if improved:
            state["best_metric"], state["best_step"] = metric, step
            self._export(self.output_dir / "best")
        return report

    # ------------------------------------------------------------------ checkpoints

    def _export(self, directory: Path) -> None:
        """Write the current model as a loadable Q-Scorer checkpoint (collective: every process
        calls it): its trained parts on top of the base model, or, for a base this package's
        checkpoints cannot refer to (the paper's mPLUG-Owl2 base, stored as pickles), whole."""
        accelerator = self.accelerator
        state = accelerator.get_state_dict(self.prepared)
        if accelerator.is_main_process:
            save = save_trained_parts if self.model.scorer.config.base_model else save_whole
            save(self.model, state, directory, self.config.model_name)
        accelerator.wait_for_everyone()

    def _register_state_hooks(self, prepared) -> None:
        trainable = {name for name, param in prepared.named_parameters() if param.requires_grad}

        def keep_trainable(models, weights, output_dir):
            # The frozen base model is the same at every step: store only what training changes.
            for i, weights_of_model in enumerate(weights):
                weights[i] = {k: v for k, v in weights_of_model.items() if k in trainable}

        def check_complete(models, input_dir):
            from safetensors import safe_open

            path = Path(input_dir) / "model.safetensors"
            if path.is_file():
                with safe_open(path, framework="pt") as handle:
                    missing = sorted(trainable - set(handle.keys()))
                if missing:
                    raise ValueError(f"{path}: the checkpoint lacks trained tensors {missing[:5]}")

        self.accelerator.register_save_state_pre_hook(keep_trainable)
        self.accelerator.register_load_state_pre_hook(check_complete)

    def _save_training_state(self, state: dict, scheduler) -> None:
        """Model (trained parts), optimizer, RNG (accelerate's ``save_state``), scheduler and data
        position, written to a hidden directory that is renamed into place once complete."""
        accelerator = self.accelerator
        name = f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
        staging = self.checkpoint_dir / f".{name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainer_state = dict(state, scheduler=scheduler.state_dict(), **self._invariants())
            (staging / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            replace_directory(staging, self.checkpoint_dir / name)
            if self.config.save_total_limit:
                for old in self._checkpoints()[: -self.config.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _load_training_state(self, checkpoint: Path, scheduler) -> dict:
        trainer_state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        saved = {key: trainer_state.get(key, default) for key, default in RESUME_INVARIANTS.items()}
        mismatched = {key: (saved[key], value) for key, value in self._invariants().items() if saved[key] != value}
        if mismatched:
            details = ", ".join(f"{k}: {old} then, {new} now" for k, (old, new) in mismatched.items())
            raise ValueError(
                f"cannot resume from {checkpoint}: the run's settings changed ({details}); restore them, "
                "or start afresh with resume disabled"
            )
        self.accelerator.load_state(str(checkpoint), strict=False)
        scheduler.load_state_dict(trainer_state["scheduler"])
        return {key: trainer_state[key] for key in ("global_step", "epoch", "batches_done", "best_metric", "best_step")}

    def _invariants(self) -> dict:
        settings = config_to_dict(self.config)
        values = {name: settings.get(name) for name in RESUME_INVARIANTS}
        values["num_processes"] = self.accelerator.num_processes
        return values

    def _checkpoints(self) -> list[Path]:
        """Complete training-state checkpoints, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [
            path
            for path in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if path.is_dir() and (path / TRAINER_STATE_FILE).is_file()
        ]
        return sorted(found, key=lambda path: path.name)

    def _find_checkpoint(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        if resume == "auto":
            checkpoints = self._checkpoints()
            return checkpoints[-1] if checkpoints else None
        path = Path(resume)
        if not (path / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {TRAINER_STATE_FILE})")
        return path

    def _remove_partial_checkpoints(self) -> None:
        """Leftovers of a save that was interrupted: hidden, never taken for checkpoints; removed."""
        if self.checkpoint_dir.is_dir():
            for leftover in self.checkpoint_dir.glob(f".{CHECKPOINT_PREFIX}*.partial"):
                shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ logging

    @property
    def _live_progress(self) -> bool:
        """Progress bars only for a person watching (stderr a terminal); a log file gets one line
        per logging step instead of carriage-return updates."""
        return self.accelerator.is_main_process and sys.stderr.isatty()

    def _progress_bar(self, total: int, done: int):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=done,
            desc="train",
            unit="step",
            disable=not self._live_progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def _log_training(self, step, running, failed, scheduler, progress, started) -> None:
        values = {name: float(np.mean(v)) for name, v in running.items()}
        # Every process's average, then the mean of those (each ran the same number of batches).
        gathered = gather_object([(values, failed)])
        merged = {name: float(np.mean([v[name] for v, _ in gathered])) for name in values}
        self._report_failed("train", [pair for _, part in gathered for pair in part])
        rates = {}  # the first optimizer group's of each parameter group
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            rates.setdefault(group["group"], lr)
        if len(rates) == 1:
            merged["lr"] = next(iter(rates.values()))
        else:
            merged |= {f"lr_{name}": lr for name, lr in rates.items()}
        record = {"event": "train", "step": step, **merged, "elapsed_s": round(time.monotonic() - started, 1)}
        record["skipped_images"] = len(self._skipped_paths)
        self._log(record)
        if self._live_progress:
            progress.set_postfix(loss=f"{merged['loss']:.4f}")
        elif self.accelerator.is_main_process:
            print(f"step {step}/{progress.total}: loss {merged['loss']:.4f}", file=sys.stderr, flush=True)
        if self.config.report_to:
            self.accelerator.log({f"train/{k}": v for k, v in merged.items()}, step=step)

    def _report_failed(self, dataset: str, failed: list[tuple[str, str]], warn: bool = True) -> None:
        """Log each skipped image once (and warn, unless a summary is printed instead)."""
        for path, reason in failed:
            if path not in self._skipped_paths:
                self._skipped_paths.add(path)
                self._log({"event": "skipped_image", "dataset": dataset, "path": path, "reason": reason})
                if warn:
                    self._warn(f"skipped unreadable image {path}: {reason}")

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "train_log.jsonl", "a") as stream:
                stream.write(json.dumps(record, default=_json_default) + "\n")

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", file=sys.stderr)


def _flat(data: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with ``/``-joined keys (trackers take flat scalars)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}/"))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
