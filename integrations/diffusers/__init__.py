"""Q-Scorer in diffusers sampling: reward guidance and quality gating as ``callback_on_step_end``
callbacks, best-of-N selection and filtering.

Supported pipelines: StableDiffusionPipeline (epsilon and v-prediction), StableDiffusionXLPipeline,
StableDiffusion3Pipeline and FluxPipeline, with the schedulers in `SCHEDULER_FORMS`::

    from qscorer_reward.integrations.diffusers import QScorerGuidance, QualityGate, best_of_n, filter_images

    image = pipe(prompt, callback_on_step_end=QScorerGuidance(scorer, guidance_scale=0.05)).images[0]

Each job lives in its own module: `diffusers_guidance`, `diffusers_gate`, `diffusers_selection`, with
the latent decoding (`diffusers_latents`) and the view into the sampling loop (`diffusers_sampling`)
shared by all of them.
"""

from .diffusers_gate import GatedGeneration, QualityGate, generate_with_gate
from .diffusers_guidance import QScorerGuidance
from .diffusers_latents import PIPELINE_FAMILIES, decode_latents, decoding_vae, pipeline_family, to_vae_latents
from .diffusers_sampling import SCHEDULER_FORMS, SamplingObserver
from .diffusers_selection import BestOfN, FilteredImages, best_of_n, filter_images

__all__ = [
    "PIPELINE_FAMILIES",
    "SCHEDULER_FORMS",
    "BestOfN",
    "FilteredImages",
    "GatedGeneration",
    "QScorerGuidance",
    "QualityGate",
    "SamplingObserver",
    "best_of_n",
    "decode_latents",
    "decoding_vae",
    "filter_images",
    "generate_with_gate",
    "pipeline_family",
    "to_vae_latents",
]
