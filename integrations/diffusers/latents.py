"""The latent spaces of the supported diffusers pipelines: which pipeline a callback is running in, and
how its latents decode to pixels, written once for guidance, quality gates, best-of-N and training.

Latents as the pipelines hold them during sampling:

- Stable Diffusion 1.x/2.x: ``[B, 4, H/8, W/8]``, ``vae_latents = latents / scaling_factor``.
- SDXL: the same, or ``latents * latents_std / scaling_factor + latents_mean`` when the VAE config
  carries per-channel statistics.
- SD3: ``[B, 16, H/8, W/8]``, ``latents / scaling_factor + shift_factor``.
- Flux: packed 2x2 patches, ``[B, (H/16)(W/16), 64]``; unpacked to ``[B, 16, H/8, W/8]`` first.

(The factor 8 is the VAE's, ``pipeline.vae_scale_factor``.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qscorer_reward.library_noise import diffusers_pipeline_imports

PIPELINE_FAMILIES = ("stable_diffusion", "stable_diffusion_xl", "stable_diffusion_3", "flux")


def pipeline_family(pipeline) -> str:
    """The family of a pipeline object, one of `PIPELINE_FAMILIES` (subclasses count as their base).

    Raises `TypeError` naming the pipeline class for anything else.
    """
    with diffusers_pipeline_imports():
        from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    for cls, family in (
        (StableDiffusionPipeline, "stable_diffusion"),
        (StableDiffusionXLPipeline, "stable_diffusion_xl"),
        (StableDiffusion3Pipeline, "stable_diffusion_3"),
        (FluxPipeline, "flux"),
    ):
        if isinstance(pipeline, cls):
            return family
    raise TypeError(
        f"{type(pipeline).__name__} is not supported; supported pipelines are StableDiffusionPipeline, "
        "StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline (and their subclasses)"
    )


def denoiser(pipeline) -> nn.Module:
    """The pipeline's denoising network: ``pipeline.unet`` (SD, SDXL) or ``pipeline.transformer`` (SD3, Flux)."""
    return pipeline.transformer if pipeline_family(pipeline) in ("stable_diffusion_3", "flux") else pipeline.unet


def unpack_latents(latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Flux's packed latents ``[B, rows * cols, 4 C]`` -> ``[B, C, 2 rows, 2 cols]`` (a differentiable view)."""
    batch, length, width = latents.shape
    rows, cols = grid
    if rows * cols != length or width % 4:
        raise ValueError(
            f"packed latents of shape {tuple(latents.shape)} do not fit a {rows} x {cols} grid of 2x2 patches"
        )
    channels = width // 4
    latents = latents.view(batch, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, 2 * rows, 2 * cols)


def to_vae_latents(pipeline, latents: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The pipeline's sampling latents -> the VAE decoder's input ``[B, C, h, w]`` (unscaled, shifted,
    unpacked for Flux, for which ``grid``, the packed latents' ``(rows, cols)``, is required)."""
    family = pipeline_family(pipeline)
    config = pipeline.vae.config
    if family == "flux":
        if grid is None:
            raise ValueError("Flux latents are packed: pass grid=(rows, cols) of the packed latent patches")
        latents = unpack_latents(latents, grid)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if family == "stable_diffusion_xl" and mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents * std / config.scaling_factor + mean
    latents = latents / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    return latents + shift if shift is not None and family in ("stable_diffusion_3", "flux") else latents


def decode_latents(pipeline, latents: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode sampling latents to pixels as the pipeline's ``output_type="pt"`` does.

    Args:
        pipeline: a pipeline of one of `PIPELINE_FAMILIES`.
        latents: the pipeline's latents (see the module docstring), any float dtype.
        grid: for Flux, ``(rows, cols)`` of the packed patches.

    Returns:
        ``[B, 3, H, W]`` float32 in [0, 1], differentiable with respect to ``latents`` when grad is
        enabled. Decoded in the VAE's current dtype: wrap the call, and any backward pass through it, in
        `decoding_vae` to decode as the pipeline would.
    """
    vae = pipeline.vae
    vae_latents = to_vae_latents(pipeline, latents, grid).to(device=vae.device, dtype=vae.dtype)
    image = vae.decode(vae_latents, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0.0, 1.0)


@contextmanager
def decoding_vae(pipeline, gradient_checkpointing: bool = False):
    """Within this context the pipeline's VAE decodes as the pipeline itself does at the end of sampling:
    a float16 VAE whose config sets ``force_upcast`` (SDXL's) runs in float32. With
    ``gradient_checkpointing`` the decoder recomputes its block activations in the backward pass
    instead of storing them. Both are undone on exit, so backward passes through a decode must run
    inside the context.
    """
    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    checkpoint = gradient_checkpointing and not vae.is_gradient_checkpointing
    if upcast:
        vae.to(torch.float32)
    if checkpoint:
        vae.enable_gradient_checkpointing()
    try:
        yield vae
    finally:
        if checkpoint:
            vae.disable_gradient_checkpointing()
        if upcast:
            vae.to(torch.float16)
