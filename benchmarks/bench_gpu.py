"""Q-Scorer throughput at real model size on a GPU: Qwen2.5-VL-7B and -3B architectures.

Each model is built from its published architecture numbers (written out below, no download) with
random weights (throughput does not depend on weight values) in bfloat16 on the GPU, wrapped with
`QScorer.from_base_model` (one score token, the offline tiny tokenizer: the model's vocabulary
size is independent of it; a prompt as many tokens long as the default prompt is with the Qwen2.5
tokenizer) and frozen. Float images ``[B, 3, 448, 448]`` in [0, 1] already on the
GPU are scored for B = 1..64 in the three modes of `scoring` (no_grad first, then
grad_checkpointing, then grad_to_input). Reported per configuration:

- ms per call (median wall time until the GPU is done), ms per image, images/s;
- achieved TFLOP/s and model FLOPs utilisation (MFU) = achieved / ``--peak-tflops`` (989, the
  H100 SXM's dense bf16 peak), from the model FLOPs of `flops` (forward, or forward plus backward
  to the input), checked once per model against `torch.utils.flop_counter` on the real model;
- peak GPU memory (``torch.cuda.max_memory_allocated``, weights included) and its ratio to the
  no_grad peak at the same batch;
- no_grad only: the bare transformers forward on the prepared tensors, timed interleaved with the
  scorer call, and the scorer's overhead ratio over it.

Per model, at ``--compare-batch`` images (no_grad): Q-Scorer against Q-Align-style scoring on the
same backbone (see `scoring`), the vision tower's packed attention against transformers' "sdpa"
(one call per window), and one profiled scoring call (top operators, GPU busy time, host-device
synchronisations) written next to the JSON.

A configuration that runs out of memory is recorded and the larger batches of its mode are
skipped; so are configurations whose estimated time would pass ``--time-budget-s``. The JSON is
rewritten after every configuration, so a run cut short keeps what it measured. Run from the
repository root on a CUDA machine (finishes within 8 minutes)::

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out bench_gpu.json

``--tiny`` runs the same steps on the CPU (one thread, float32, one timed round) with a
scaled-down model of the same layout in seconds (the smoke test), and also checks the FLOP
formulas with gradients.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from flops import count_flops, flops_per_second, scoring_flops
from scoring import (
    bare_forward,
    measure_modes,
    qalign_level_ids,
    qalign_scores,
    qalign_scores_from_all_logits,
    set_gradient_checkpointing,
)
from timing import interleaved_median_ms, machine_info, synchronize

GIB = 2**30
H100_SXM_BF16_DENSE_TFLOPS = 989.0
OVERHEAD_TARGET = 1.15
MFU_TARGET = 0.40  # no_grad, batch >= 16, on an H100
CHECKPOINTING_MEMORY_TARGET = 1.5  # grad_checkpointing peak / no_grad peak at batch 8
MODE_ORDER = ("no_grad", "grad_checkpointing", "grad_to_input")

# Published architectures (the models' config.json on the Hugging Face hub; transformers'
# Qwen2_5_VLVisionConfig defaults are the same vision tower). Vocabulary size and tied embeddings
# change the weights' memory, not the FLOPs of scoring (Q-Scorer computes no lm_head).
QWEN2_5_VL_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    hidden_act="silu",
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
QWEN2_5_VL_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
ARCHITECTURES = {
    "qwen2.5-vl-7b": dict(
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters=QWEN2_5_VL_ROPE,
        ),
        vision=dict(QWEN2_5_VL_VISION, out_hidden_size=3584),
        tie_word_embeddings=False,
    ),
    "qwen2.5-vl-3b": dict(
        text=dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters=QWEN2_5_VL_ROPE,
        ),
        vision=dict(QWEN2_5_VL_VISION, out_hidden_size=2048),
        tie_word_embeddings=True,
    ),
}
# The offline tiny tokenizer spells every character of a prompt as one token; this prompt has as
# many tokens under it as the default prompt (qscorer_reward.config.QWEN_PROMPT_TEMPLATE) has under
# the Qwen2.5 tokenizer: 3 before the image, 21 after it (the vision start and end tokens and the
# score token come on top), so the sequences are as long as with the real tokenizer.
QWEN_LENGTH_PROMPT = "<|im_start|>u\n{image}rate this?<|im_end|>\n<|im_start|>a\nIt is:"
QWEN_PROMPT_TEXT_TOKENS = 24

# --tiny: the same layout (window and full-attention vision blocks, GQA, mrope) at toy widths.
TINY_ARCHITECTURES = {
    "tiny-7b-layout": dict(
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision=dict(QWEN2_5_VL_VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        | {"fullatt_block_indexes": [1, 3]},
        tie_word_embeddings=False,
    ),
}


def build_scorer(architecture: dict, device: torch.device, dtype: torch.dtype, attn_implementation: str, side: int):
    """A frozen Q-Scorer on a randomly initialised Qwen2.5-VL of ``architecture``, built on
    ``device`` in ``dtype``, with a pixel budget of ``side x side``."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    from qscorer_reward import QScorer
    from qscorer_reward.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    token_ids = {
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    config = Qwen2_5_VLConfig(
        text_config=architecture["text"],
        vision_config=architecture["vision"],
        tie_word_embeddings=architecture["tie_word_embeddings"],
        **{key: tokenizer.convert_tokens_to_ids(token) for key, token in token_ids.items()},
    )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    scorer = QScorer.from_base_model(
        model, tokenizer, prompt_template=QWEN_LENGTH_PROMPT, max_pixels=side * side, device=device
    )
    prompt_tokens = len(scorer.backbone.prefix_ids) + len(scorer.backbone.suffix_ids)
    if prompt_tokens != QWEN_PROMPT_TEXT_TOKENS:
        raise RuntimeError(f"the benchmark prompt has {prompt_tokens} tokens, not {QWEN_PROMPT_TEXT_TOKENS}")
    return scorer.requires_grad_(False).eval()


def free_memory(device: torch.device) -> None:
    """Return cached blocks after an out-of-memory error or a finished model."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Deadline:
    """The end of the run's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.perf_counter() + budget_s

    def left_s(self) -> float:
        return self.end - time.perf_counter()


def flop_check(scorer, side: int, flops: dict, with_gradients: bool) -> dict:
    """Counted (`torch.utils.flop_counter`) over analytic FLOPs for one image, forward and,
    if ``with_gradients``, forward plus backward to the input; 1.0 means the formulas match the
    model."""
    device = scorer.device
    pixels = torch.rand(1, 3, side, side, device=device)
    with torch.no_grad():
        counted_forward = count_flops(lambda: scorer(pixels))
    check = {"forward_counted_over_analytic": counted_forward / flops["forward"]}
    if with_gradients:
        leaf = pixels.clone().requires_grad_(True)
        counted = count_flops(lambda: scorer(leaf).sum().backward())
        check["forward_and_backward_counted_over_analytic"] = counted / flops["forward_and_backward_to_input"]
    return check


def mode_row(mode: str, batch: int, measured: dict, flops: dict, peak_tflops: float) -> dict:
    """One result row from `scoring.measure_modes`' numbers for ``mode``."""
    ms = measured[mode]["ms_per_call"]
    per_image = flops["forward"] if mode == "no_grad" else flops["forward_and_backward_to_input"]
    tflops = flops_per_second(batch * per_image, ms)
    row = {
        "mode": mode,
        "batch": batch,
        "status": "ok",
        "ms_per_call": ms,
        "ms_per_image": ms / batch,
        "images_per_s": 1e3 * batch / ms,
        "tflop_per_s": tflops,
        "mfu": tflops / peak_tflops,
        "peak_memory_gib": measured[mode]["peak_memory_bytes"] / GIB,
    }
    if "bare_forward" in measured:
        row["bare_forward_ms"] = measured["bare_forward"]["ms_per_call"]
        row["overhead_vs_bare_forward"] = ms / measured["bare_forward"]["ms_per_call"]
    return row


def run_modes(scorer, flops: dict, args, deadline: Deadline, save) -> list[dict]:
    """Every (mode, batch) configuration of one model, within the deadline."""
    device = scorer.device
    rows: list[dict] = []
    for mode in MODE_ORDER:
        stop_reason = None
        last_call_ms = None
        for batch in args.batch_sizes:
            if stop_reason is None and last_call_ms is not None:
                # warm-up, repeats and the memory call, at a cost growing with the batch at worst linearly
                estimate_s = (2 + args.repeats) * last_call_ms * 1e-3 * batch / rows[-1]["batch"]
                if mode == "no_grad":
                    estimate_s *= 2  # the bare forward runs too
                if estimate_s > deadline.left_s():
                    stop_reason = "skipped: past the time budget"
            if stop_reason is None and deadline.left_s() <= 0:
                stop_reason = "skipped: past the time budget"
            if stop_reason is not None:
                rows.append({"mode": mode, "batch": batch, "status": stop_reason})
                continue
            try:
                rows.append(measure_configuration(scorer, mode, batch, flops, args))
                add_memory_ratio(rows)
                last_call_ms = rows[-1]["ms_per_call"]
            except Exception as error:  # recorded; the other configurations go on
                rows.append({"mode": mode, "batch": batch, "status": describe_failure(error)})
                stop_reason = "skipped: a smaller batch failed"
                free_memory(device)
            print_row(rows[-1], flush=True)
            save()
    return rows


def measure_configuration(scorer, mode: str, batch: int, flops: dict, args) -> dict:
    """The result row of ``batch`` random images scored in ``mode``."""
    pixels = torch.rand(batch, 3, args.image_side, args.image_side, device=scorer.device)
    references = {"bare_forward": bare_forward_call(scorer, pixels)} if mode == "no_grad" else None
    measured = measure_modes(
        scorer,
        pixels,
        (mode,),
        device=scorer.device,
        warmup=1,
        repeats=args.repeats,
        time_budget_s=args.config_budget_s,
        references=references,
    )
    return mode_row(mode, batch, measured, flops, args.peak_tflops)


def describe_failure(error: Exception) -> str:
    """A one-line status for a failed step (the traceback of anything but running out of memory
    goes to stderr)."""
    if not isinstance(error, torch.OutOfMemoryError):
        traceback.print_exception(error, file=sys.stderr)
    kind = "out of memory" if isinstance(error, torch.OutOfMemoryError) else type(error).__name__
    return f"{kind}: {str(error).splitlines()[0] if str(error) else ''}"


def bare_forward_call(scorer, pixels: torch.Tensor):
    """A zero-argument callable: the bare backbone forward (no_grad) on ``pixels`` prepared once."""
    inputs = scorer.backbone.prepare(pixels)

    def bare() -> torch.Tensor:
        with torch.no_grad():
            return bare_forward(scorer, inputs)

    return bare


def add_memory_ratio(rows: list[dict]) -> None:
    """The last row's peak memory over the no_grad peak at the same batch, if that was measured."""
    row = rows[-1]
    for earlier in rows:
        if earlier["mode"] == "no_grad" and earlier["batch"] == row["batch"] and earlier["status"] == "ok":
            row["peak_memory_vs_no_grad"] = row["peak_memory_gib"] / earlier["peak_memory_gib"]
            return


def compare_at_batch(scorer, args) -> dict:
    """no_grad at ``--compare-batch``: Q-Scorer vs Q-Align-style, packed vs per-window vision
    attention (ms and ratios)."""
    from qscorer_reward.backbones.vision_attention import PACKED_SDPA

    device = scorer.device
    pixels = torch.rand(args.compare_batch, 3, args.image_side, args.image_side, device=device)
    inputs = scorer.backbone.prepare(pixels)
    level_ids = qalign_level_ids(scorer.tokenizer)
    vision_config = scorer.backbone.model.model.visual.config
    attention_before = vision_config._attn_implementation

    def score_with_vision_attention(name: str):
        vision_config._attn_implementation = name
        return scorer(pixels)

    comparisons: dict = {"batch": args.compare_batch}
    try:
        with torch.no_grad():
            qalign_ms = interleaved_median_ms(
                {
                    "qscorer": lambda: scorer.score_inputs(inputs),
                    "qalign_answer_position": lambda: qalign_scores(scorer, inputs, level_ids),
                    "qalign_all_logits": lambda: qalign_scores_from_all_logits(scorer, inputs, level_ids),
                },
                warmup=1,
                repeats=args.repeats,
                device=device,
                time_budget_s=args.config_budget_s,
            )
            comparisons["qalign_ms"] = qalign_ms
            comparisons["qalign_ratio_to_qscorer"] = {name: ms / qalign_ms["qscorer"] for name, ms in qalign_ms.items()}
            if attention_before == PACKED_SDPA:
                attention_ms = interleaved_median_ms(
                    {
                        "packed_sdpa": lambda: score_with_vision_attention(PACKED_SDPA),
                        "transformers_sdpa": lambda: score_with_vision_attention("sdpa"),
                    },
                    warmup=1,
                    repeats=args.repeats,
                    device=device,
                    time_budget_s=args.config_budget_s,
                )
                comparisons["vision_attention_ms"] = attention_ms
                comparisons["transformers_sdpa_over_packed"] = (
                    attention_ms["transformers_sdpa"] / attention_ms["packed_sdpa"]
                )
    finally:
        vision_config._attn_implementation = attention_before
    return comparisons


def profile_call(scorer, args, report_path: Path) -> dict:
    """Profile one no_grad scoring call at ``--compare-batch``: writes the operator table to
    ``report_path`` and returns the wall time, the GPU's busy time (sum of kernel times) and the
    host-device synchronisations (stream/device syncs and memory copies) of that call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = scorer.device
    pixels = torch.rand(args.compare_batch, 3, args.image_side, args.image_side, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        scorer(pixels)
        synchronize(device)
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            scorer(pixels)
            synchronize(device)
            wall_ms = 1e3 * (time.perf_counter() - start)
    averages = profiler.key_averages()
    sort_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    report_path.write_text(averages.table(sort_by=sort_key, row_limit=40) + "\n")
    # the kernels' own time, as the table's "Self CUDA time total" sums it
    kernel_us = sum(
        event.self_device_time_total
        for event in averages
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    )
    kernel_ms = kernel_us / 1e3
    sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")
    syncs = {name: sum(event.count for event in averages if event.key == name) for name in sync_names}
    return {
        "batch": args.compare_batch,
        "wall_ms": wall_ms,
        "gpu_kernel_ms": kernel_ms,
        "gpu_busy_fraction": kernel_ms / wall_ms if device.type == "cuda" else None,
        "host_device_syncs": syncs,
        "operator_table": report_path.name,
    }


def print_row(row: dict, flush: bool = False) -> None:
    """One configuration as a table line."""
    if row["status"] != "ok":
        print(f"{row['mode']:<20}{row['batch']:>6}  {row['status']}", flush=flush)
        return
    overhead = f"{row['overhead_vs_bare_forward']:>9.3f}" if "overhead_vs_bare_forward" in row else f"{'':>9}"
    memory_ratio = f"{row['peak_memory_vs_no_grad']:>8.2f}" if "peak_memory_vs_no_grad" in row else f"{'':>8}"
    print(
        f"{row['mode']:<20}{row['batch']:>6}{row['ms_per_call']:>10.1f}{row['ms_per_image']:>10.2f}"
        f"{row['images_per_s']:>10.1f}{row['tflop_per_s']:>9.1f}{row['mfu']:>7.1%}{row['peak_memory_gib']:>10.2f}"
        f"{memory_ratio}{overhead}",
        flush=flush,
    )


TABLE_HEADER = (
    f"{'mode':<20}{'batch':>6}{'ms/call':>10}{'ms/image':>10}{'images/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
    f"{'peak GiB':>10}{'mem/ng':>8}{'/ bare':>9}"
)


def verdicts(rows: list[dict], on_h100_class_gpu: bool) -> dict:
    """The issue's targets, judged from one model's rows (None where not measured)."""
    no_grad = {row["batch"]: row for row in rows if row["mode"] == "no_grad" and row["status"] == "ok"}
    checkpointing = {row["batch"]: row for row in rows if row["mode"] == "grad_checkpointing" and row["status"] == "ok"}
    large = [row["mfu"] for batch, row in no_grad.items() if batch >= 16]
    memory_ratio = checkpointing[8].get("peak_memory_vs_no_grad") if 8 in checkpointing else None
    overheads = [row["overhead_vs_bare_forward"] for row in no_grad.values()]
    return {
        "best_no_grad_mfu_at_batch_16_or_more": max(large) if large else None,
        "mfu_target": MFU_TARGET,
        "mfu_target_met": (max(large) >= MFU_TARGET) if large and on_h100_class_gpu else None,
        "checkpointing_memory_ratio_at_batch_8": memory_ratio,
        "checkpointing_memory_target": CHECKPOINTING_MEMORY_TARGET,
        "checkpointing_memory_target_met": None
        if memory_ratio is None
        else memory_ratio <= CHECKPOINTING_MEMORY_TARGET,
        "max_overhead_vs_bare_forward": max(overheads) if overheads else None,
        "overhead_target": OVERHEAD_TARGET,
    }


def run_model(
    name: str,
    architecture: dict,
    device: torch.device,
    dtype: torch.dtype,
    args,
    deadline: Deadline,
    result: dict,
    save,
    on_h100_class_gpu: bool,
) -> None:
    """Every step for one model, filling ``result`` as it goes; a failed step is recorded as
    ``result[step]["status"]`` (or ``result["status"]`` when the model cannot be built)."""
    started = time.perf_counter()
    try:
        scorer = build_scorer(architecture, device, dtype, args.attn, args.image_side)
    except Exception as error:  # recorded; the next model goes on
        result["status"] = describe_failure(error)
        print(f"\n{name}: {result['status']}")
        return
    result["build_s"] = time.perf_counter() - started
    result["parameters_billion"] = sum(p.numel() for p in scorer.parameters()) / 1e9
    if device.type == "cuda":
        result["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
    flops = result["flops_per_image"] = scoring_flops(scorer, args.image_side, args.image_side)
    try:
        result["flop_check"] = flop_check(scorer, args.image_side, flops, with_gradients=args.tiny)
    except Exception as error:  # the formulas stay usable without the check
        result["flop_check"] = {"status": describe_failure(error)}
    checked = result["flop_check"].get("forward_counted_over_analytic", math.nan)
    print(
        f"\n{name}: {result['parameters_billion']:.3f} B parameters, built in {result['build_s']:.1f} s; "
        f"{flops['forward'] / 1e12:.3f} TFLOP per image forward ({flops['sequence_length']} tokens); "
        f"FLOPs counted / formula {checked:.4f}"
    )
    print(TABLE_HEADER)
    result["rows"] = run_modes(scorer, flops, args, deadline, save)
    result["targets"] = verdicts(result["rows"], on_h100_class_gpu)
    print(f"targets: {json.dumps(result['targets'])}")
    if deadline.left_s() > (5 if args.tiny else 60):
        profile_path = args.out.with_name(f"{args.out.stem}_{name}_profile.txt")
        for step, run_step in (
            ("comparisons", lambda: compare_at_batch(scorer, args)),
            ("profile", lambda: profile_call(scorer, args, profile_path)),
        ):
            try:
                result[step] = run_step()
            except Exception as error:  # recorded; the other steps go on
                result[step] = {"status": describe_failure(error)}
                free_memory(device)
            print(f"{step} at batch {args.compare_batch}: {json.dumps(result[step])}")
    set_gradient_checkpointing(scorer, False)


def main(argv: list[str] | None = None) -> dict:
    """Benchmark each model, print the tables, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"), help="JSON results (default: %(default)s)")
    parser.add_argument("--models", nargs="+", help="models to run, in order (default: 7b then 3b; tiny with --tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 2 4 8 16 32 64 (1 2 with --tiny)")
    parser.add_argument("--image-side", type=int, help="square image side in pixels (default: 448; 224 with --tiny)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (default: 5)")
    parser.add_argument(
        "--config-budget-s", type=float, default=10.0, help="stop timing a configuration after this many seconds"
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        help="no step starts after this many seconds from the start (default: 420, 60 with --tiny)",
    )
    parser.add_argument("--compare-batch", type=int, help="batch of the comparisons and the profile (default: 16)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_BF16_DENSE_TFLOPS,
        help="the GPU's dense bf16 peak for MFU (default: %(default)s, H100 SXM)",
    )
    parser.add_argument(
        "--attn",
        default="auto",
        choices=("auto", "sdpa", "flash_attention_2"),
        help="attention implementation (auto: flash_attention_2 where the flash_attn package is installed)",
    )
    parser.add_argument("--tiny", action="store_true", help="scaled-down models on the CPU (smoke test)")
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype, architectures = torch.device("cpu"), torch.float32, TINY_ARCHITECTURES
        defaults = dict(batch_sizes=[1, 2], image_side=224, time_budget_s=60.0, compare_batch=2)
        args.repeats = 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or use --tiny")
        device, dtype, architectures = torch.device("cuda"), torch.bfloat16, ARCHITECTURES
        defaults = dict(batch_sizes=[1, 2, 4, 8, 16, 32, 64], image_side=448, time_budget_s=420.0, compare_batch=16)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    models = args.models or list(architectures)
    unknown = sorted(set(models) - set(architectures))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(architectures)}")
    if args.attn == "auto":
        args.attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    deadline = Deadline(args.time_budget_s)
    machine = machine_info(device)
    on_h100_class_gpu = "H100" in machine.get("gpu", "") or "H200" in machine.get("gpu", "")
    results: dict = {
        "machine": machine,
        "mode": "tiny" if args.tiny else "gpu",
        "settings": {
            key: getattr(args, key)
            for key in (
                "batch_sizes",
                "image_side",
                "repeats",
                "config_budget_s",
                "time_budget_s",
                "compare_batch",
                "peak_tflops",
                "attn",
            )
        }
        | {"dtype": str(dtype).removeprefix("torch.")},
        "models": {},
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"device: {machine.get('gpu', machine['cpu_model'])}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, attention {args.attn}, {args.image_side}x{args.image_side} images"
    )
    for name in models:
        if deadline.left_s() < (10 if args.tiny else 90):
            results["models"][name] = {"status": "skipped: past the time budget"}
        else:
            results["models"][name] = model_result = {}
            run_model(name, architectures[name], device, dtype, args, deadline, model_result, save, on_h100_class_gpu)
            free_memory(device)
        save()
    results["total_s"] = args.time_budget_s - deadline.left_s()
    save()
    print(f"\nwrote {args.out} in {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
