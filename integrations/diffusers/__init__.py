"""Q-Scorer in diffusers sampling: reward guidance and quality gating as ``callback_on_step_end``
callbacks, best-of-N selection and filtering, and reward fine-tuning of the denoiser.

Supported pipelines: StableDiffusionPipeline (epsilon and v-prediction), StableDiffusionXLPipeline,
StableDiffusion3Pipeline and FluxPipeline::

    from qscorer_reward.integrations.diffusers import QScorerGuidance, QualityGate, best_of_n, filter_images

    image = pipe(prompt, callback_on_step_end=QScorerGuidance(scorer, guidance_scale=0.05)).images[0]

Each job lives in its own module: `guidance`, `gate`, `selection` and `reward_finetune`
(``python -m qscorer_reward.integrations.diffusers.reward_finetune --config FILE``), with the latent
decoding (`latents`) and the view into the sampling loop (`sampling`) shared by all of them.
Needs the ``diffusers`` extra.
"""

import importlib

from qscorer_reward.extras import missing_extra

try:
    import diffusers  # noqa: F401
except ModuleNotFoundError as err:
    raise missing_extra("diffusers", __name__) from err

from .gate import GatedGeneration, QualityGate, generate_with_gate
from .guidance import QScorerGuidance
from .latents import decode_latents
from .sampling import SamplingObserver
from .selection import BestOfN, FilteredImages, best_of_n, filter_images

# Imported on first use: `python -m ...reward_finetune` must not find its module imported already.
_LAZY = {"RewardFinetuneConfig": ".reward_finetune", "RewardFinetuner": ".reward_finetune"}

__all__ = [
    "BestOfN",
    "FilteredImages",
    "GatedGeneration",
    "QScorerGuidance",
    "QualityGate",
    "RewardFinetuneConfig",
    "RewardFinetuner",
    "SamplingObserver",
    "best_of_n",
    "decode_latents",
    "filter_images",
    "generate_with_gate",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
