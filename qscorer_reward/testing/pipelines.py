"""Tiny random diffusers pipelines built offline from configs in code, for tests, examples and benchmarks.

Each factory returns a real diffusers pipeline (StableDiffusion, StableDiffusionXL, StableDiffusion3 or
Flux) whose models have a few small layers and random weights, reproducible from ``seed``. The
tokenizers are byte-level (every byte one token, no merges) built with the ``tokenizers`` library, so
nothing is downloaded. The VAEs carry the real models' latent ``scaling_factor`` / ``shift_factor``
(and, for SDXL, per-channel ``latents_mean`` / ``latents_std``), so code that decodes latents has to
get those right to match the pipeline's own output.

Images are ``TINY_IMAGE_SIZE`` pixels square by default; every model runs on CPU in well under a
second per step. Needs the ``diffusers`` extra.
"""

from __future__ import annotations

import torch

from qscorer_reward.extras import require_extra
from qscorer_reward.library_noise import diffusers_pipeline_imports

require_extra("diffusers", __name__)

PIPELINE_KINDS = ("sd", "sd_v", "sdxl", "sd3", "flux")

# Side of the default image, in pixels.
TINY_IMAGE_SIZE = 32

# Byte-level vocabulary (256) plus the special tokens each tokenizer adds.
_BYTE_VOCAB = 256

# Text lengths in tokens (bytes here): CLIP's real 77, and a T5 length for `tiny_call_kwargs`. Prompts of
# tests and examples fit them, so the pipelines never truncate them (and never warn that they did).
CLIP_MAX_LENGTH = 77
T5_SEQUENCE_LENGTH = 77


def tiny_pipeline(kind: str, seed: int = 0, scheduler=None):
    """A tiny random pipeline of ``kind``, one of `PIPELINE_KINDS`:

    - ``"sd"``: `StableDiffusionPipeline`, epsilon prediction, DDIM scheduler.
    - ``"sd_v"``: `StableDiffusionPipeline`, v-prediction, Euler scheduler.
    - ``"sdxl"``: `StableDiffusionXLPipeline`, two CLIP text encoders, Euler scheduler.
    - ``"sd3"``: `StableDiffusion3Pipeline`, MMDiT, two CLIP and one T5 encoder, flow matching.
    - ``"flux"``: `FluxPipeline`, packed 2x2 latents, CLIP and T5 encoders, flow matching.

    ``scheduler`` replaces the default scheduler (build it with ``SomeScheduler.from_config(...)``).
    """
    factories = {
        "sd": lambda: tiny_sd_pipeline(seed=seed),
        "sd_v": lambda: tiny_sd_pipeline(prediction_type="v_prediction", seed=seed),
        "sdxl": lambda: tiny_sdxl_pipeline(seed=seed),
        "sd3": lambda: tiny_sd3_pipeline(seed=seed),
        "flux": lambda: tiny_flux_pipeline(seed=seed),
    }
    if kind not in factories:
        raise ValueError(f"unknown pipeline kind {kind!r}; choose one of {PIPELINE_KINDS}")
    pipe = factories[kind]()
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


def _ready(pipeline):
    """Models in eval mode (as ``from_pretrained`` leaves them), no progress bar."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tiny_call_kwargs(kind: str, num_inference_steps: int = 4) -> dict:
    """Keyword arguments for calling a `tiny_pipeline` of ``kind``: its image size, the steps and, for the
    T5-conditioned pipelines, a shorter text length (their defaults, 256 and 512 tokens, dominate the cost)."""
    kwargs = dict(height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE, num_inference_steps=num_inference_steps)
    if kind in ("sd3", "flux"):
        kwargs["max_sequence_length"] = T5_SEQUENCE_LENGTH
    return kwargs


# ---------------------------------------------------------------------------------------- tokenizers


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """Byte-level stand-in for `CLIPTokenizer`: ``<|startoftext|> bytes... <|endoftext|>``, padded with
    ``<|endoftext|>`` (ids 256 and 257), as CLIP pads."""
    from tokenizers import processors

    tokenizer = _byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], model_max_length)
    bos, eos = _BYTE_VOCAB, _BYTE_VOCAB + 1
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"
    return tokenizer


def tiny_t5_tokenizer(model_max_length: int = 512):
    """Byte-level stand-in for `T5TokenizerFast`: ``bytes... </s>``, padded with ``<pad>`` (ids 256, 257)."""
    from tokenizers import processors

    tokenizer = _byte_tokenizer(["<pad>", "</s>"], model_max_length)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", _BYTE_VOCAB + 1)]
    )
    tokenizer.pad_token, tokenizer.eos_token = "<pad>", "</s>"
    return tokenizer


def _byte_tokenizer(special_tokens: list[str], model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for offset, token in enumerate(special_tokens):
        vocab[token] = _BYTE_VOCAB + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(special_tokens)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length)


# ------------------------------------------------------------------------------------ text encoders


def _clip_config(with_projection: bool, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_BYTE_VOCAB + 2,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim if with_projection else hidden_size,
        bos_token_id=_BYTE_VOCAB,
        eos_token_id=_BYTE_VOCAB + 1,
        pad_token_id=_BYTE_VOCAB + 1,
    )


def _clip_text_encoder(with_projection: bool = False, **config):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(with_projection, **config))


def _t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_BYTE_VOCAB + 2,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=_BYTE_VOCAB,
        eos_token_id=_BYTE_VOCAB + 1,
        decoder_start_token_id=_BYTE_VOCAB,
    )
    return T5EncoderModel(config)


# ----------------------------------------------------------------------------------------------- VAE


def _vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None, **config):
    """A two-level AutoencoderKL (images / 2 = latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **config,
    )


# ------------------------------------------------------------------------------------------ pipelines


def _tiny_unet(**config):
    """A two-level `UNet2DConditionModel` at the tiny latent size; ``config`` adds the cross-attention
    and conditioning settings of each pipeline family."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        **config,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """`StableDiffusionPipeline` with a two-level UNet; DDIM for epsilon, Euler for v-prediction."""
    with diffusers_pipeline_imports():
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = _vae()
        text_encoder = _clip_text_encoder()
    scheduler_config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="trailing" if prediction_type == "v_prediction" else "leading",
        steps_offset=1,
    )
    if prediction_type == "v_prediction":
        scheduler = EulerDiscreteScheduler(**scheduler_config)
    else:
        scheduler = DDIMScheduler(**scheduler_config, clip_sample=False, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipeline)


def tiny_sdxl_pipeline(seed: int = 0):
    """`StableDiffusionXLPipeline`: two CLIP encoders (the second with a projection), a UNet with SDXL's
    ``text_time`` added conditioning, and a VAE with per-channel latent mean and std."""
    with diffusers_pipeline_imports():
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(
            attention_head_dim=(2, 4),
            cross_attention_dim=64,  # the two encoders' hidden states, concatenated
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text
        )
        vae = _vae(
            scaling_factor=0.13025,
            latents_mean=[0.1, -0.2, 0.05, 0.0],
            latents_std=[1.2, 0.8, 1.0, 0.9],
        )
        text_encoder = _clip_text_encoder()
        text_encoder_2 = _clip_text_encoder(with_projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _ready(pipeline)


def tiny_sd3_pipeline(seed: int = 0):
    """`StableDiffusion3Pipeline`: a one-layer MMDiT, CLIP x2 + T5 text encoders, 16-channel latents."""
    with diffusers_pipeline_imports():
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=TINY_IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # the T5 width; CLIP states are zero-padded to it
            caption_projection_dim=32,
            pooled_projection_dim=64,  # the two CLIP projections, concatenated
            pos_embed_max_size=16,
        )
        vae = _vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = _clip_text_encoder(with_projection=True)
        text_encoder_2 = _clip_text_encoder(with_projection=True)
        text_encoder_3 = _t5_encoder()
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return _ready(pipeline)


def tiny_flux_pipeline(seed: int = 0):
    """`FluxPipeline`: one double- and one single-stream block, guidance embedding, CLIP + T5 encoders;
    latents are packed into 2x2 patches, ``[B, (H/4)(W/4), 4 C]`` for images of ``H x W``."""
    with diffusers_pipeline_imports():
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = _vae(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        text_encoder = _clip_text_encoder()
        text_encoder_2 = _t5_encoder()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    return _ready(pipeline)
