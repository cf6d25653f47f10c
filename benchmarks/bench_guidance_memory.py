"""Peak memory and wall time of `QScorerGuidance` against plain sampling, same seeds, same pipeline.

GPU (default): a StableDiffusionXLPipeline with SDXL base 1.0's architecture (UNet 2.6B parameters,
VAE, CLIP ViT-L and OpenCLIP bigG text encoders) built from its config with random weights, nothing
downloaded, and a Q-Scorer on a random Qwen2.5-VL-7B-architecture backbone (``--scorer`` picks the 3B
architecture or a checkpoint folder). Batch 4 at 1024 x 1024, classifier-free guidance, bfloat16.
Guidance runs at every step of the second half of the schedule, one image per backward pass, the
VAE decoder and the scorer under gradient checkpointing (the `QScorerGuidance` defaults).

Peak memory is ``torch.cuda.max_memory_allocated`` over each pipeline call, with the pipeline and
the scorer both resident during both calls, so ``overhead = guided peak - plain peak`` is what
guidance adds on top of "plain sampling plus the scorer's weights". Each call is timed once after a
short warm-up of both. Runs in about 2 minutes on one H100::

    python benchmarks/bench_guidance_memory.py [--json out.json] [--scorer qwen2_5_vl_3b|PATH]

``--cpu-tiny``: the tiny SDXL pipeline of `qscorer_reward.testing.pipelines` and a tiny scorer on
the CPU, batch 4 at 64 x 64. CPU tensors have no allocator statistics: the peak comes from
torch.profiler's memory timeline (every tensor allocation and free, in order, weights included once
touched), and the times are medians of three runs made without the profiler::

    .venv/bin/python benchmarks/bench_guidance_memory.py --cpu-tiny [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from qscorer_reward.integrations.diffusers import QScorerGuidance

GIB = 2**30
MIB = 2**20


# ---------------------------------------------------------------------------- SDXL architecture


def sdxl_pipeline(device: torch.device, dtype: torch.dtype):
    """StableDiffusionXLPipeline with SDXL base 1.0's configs and random weights, on ``device``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from qscorer_reward.testing.pipelines import tiny_clip_tokenizer

    eos = 257  # the stand-in tokenizer's end-of-text id, where CLIP pools
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        common = dict(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=256, eos_token_id=eos, pad_token_id=eos
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
                projection_dim=768,
                **common,
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
                **common,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(model_max_length=77),
        tokenizer_2=tiny_clip_tokenizer(model_max_length=77),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.to(dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Qwen2.5-VL text and vision sizes (the 3B and 7B releases' configs).
QWEN2_5_VL = {
    "qwen2_5_vl_3b": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2_5_vl_7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


def random_scorer(name: str, device: torch.device, dtype: torch.dtype):
    """A Q-Scorer (K = 1, 448 x 448 pixel budget) on a random Qwen2.5-VL backbone of the named size,
    or the checkpoint at path ``name``."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    from qscorer_reward import QScorer
    from qscorer_reward.testing import tiny_tokenizer

    if name not in QWEN2_5_VL:
        return QScorer.from_pretrained(name, device=device, dtype=dtype)
    sizes = dict(QWEN2_5_VL[name])
    tie = sizes.pop("tie_word_embeddings")
    tokenizer = tiny_tokenizer()
    ids = {
        key: tokenizer.convert_tokens_to_ids(token)
        for key, token in (
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
        )
    }
    text = dict(
        sizes,
        vocab_size=152064,
        rms_norm_eps=1e-6,
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=sizes["hidden_size"],
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    scorer = QScorer.from_base_model(model, tokenizer, num_score_tokens=1, max_pixels=448 * 448, device=device)
    return scorer.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------ measuring


def parameter_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def cuda_peak(call: Callable[[], object], device: torch.device) -> tuple[int, float]:
    """(max_memory_allocated over the call, seconds)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), time.perf_counter() - start


def cpu_peak(call: Callable[[], object]) -> int:
    """The most tensor bytes alive at once during the call, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        call()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def generate(pipe, scorer, batch: int, size: int, steps: int, guided_from: int | None, micro_batch_size: int):
    """One pipeline call (``output_type="pt"``), guided from step ``guided_from`` on unless it is None."""
    guidance = None
    if guided_from is not None:
        guidance = QScorerGuidance(
            scorer, guidance_scale=0.05, start_step_index=guided_from, micro_batch_size=micro_batch_size
        )
    return pipe(
        [f"photo {i}" for i in range(batch)],
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(i) for i in range(batch)],
        callback_on_step_end=guidance,
        output_type="pt",
    ).images


def run(args) -> dict:
    device = torch.device("cpu" if args.cpu_tiny else "cuda")
    if args.cpu_tiny:
        from qscorer_reward.testing import tiny_scorer
        from qscorer_reward.testing.pipelines import tiny_pipeline

        pipe, scorer = tiny_pipeline("sdxl"), tiny_scorer(max_pixels=56 * 56)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        built = time.perf_counter()
        pipe = sdxl_pipeline(device, dtype)
        scorer = random_scorer(args.scorer, device, dtype)
        print(f"models built in {time.perf_counter() - built:.0f} s", flush=True)
    guided_from = args.guided_from if args.guided_from is not None else args.steps // 2
    settings = (args.batch, args.size, args.steps)

    def plain():
        return generate(pipe, scorer, *settings, None, args.micro_batch_size)

    def guided():
        return generate(pipe, scorer, *settings, guided_from, args.micro_batch_size)

    # Warm-up: kernels, workspaces, the guidance path once.
    generate(pipe, scorer, args.batch, args.size, 2, 1, args.micro_batch_size)
    generate(pipe, scorer, args.batch, args.size, 2, None, args.micro_batch_size)
    if args.cpu_tiny:
        plain_peak, guided_peak = cpu_peak(plain), cpu_peak(guided)
        plain_s = statistics.median(_seconds(plain) for _ in range(3))
        guided_s = statistics.median(_seconds(guided) for _ in range(3))
    else:
        plain_peak, plain_s = cuda_peak(plain, device)
        guided_peak, guided_s = cuda_peak(guided, device)
    pipeline_bytes = parameter_bytes(*(m for m in pipe.components.values() if isinstance(m, torch.nn.Module)))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "size": args.size,
        "steps": args.steps,
        "guided_steps": list(range(guided_from, args.steps)),
        "micro_batch_size": args.micro_batch_size,
        "pipeline_weights_mib": pipeline_bytes / MIB,
        "scorer_weights_mib": parameter_bytes(scorer) / MIB,
        "plain_peak_mib": plain_peak / MIB,
        "guided_peak_mib": guided_peak / MIB,
        "overhead_mib": (guided_peak - plain_peak) / MIB,
        "overhead_fraction": (guided_peak - plain_peak) / plain_peak,
        "plain_s": plain_s,
        "guided_s": guided_s,
        "time_ratio": guided_s / plain_s,
    }
    if args.cpu_tiny:
        # The CPU timeline counts only weights that a call touches: the plain call never runs the scorer.
        plain_with_scorer = plain_peak + parameter_bytes(scorer)
        result["plain_peak_plus_scorer_mib"] = plain_with_scorer / MIB
        result["overhead_mib"] = (guided_peak - plain_with_scorer) / MIB
        result["overhead_fraction"] = (guided_peak - plain_with_scorer) / plain_with_scorer
    return result


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny models on the CPU (see the module docstring)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--size", type=int, default=None, help="image side in pixels (default 1024; 64 with --cpu-tiny)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guided-from", type=int, default=None, help="first guided step (default steps // 2)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--scorer", default="qwen2_5_vl_7b", help="qwen2_5_vl_7b, qwen2_5_vl_3b or a checkpoint path")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    args.size = args.size or (64 if args.cpu_tiny else 1024)
    if not args.cpu_tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu-tiny")
    result = run(args)
    for key, value in result.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
