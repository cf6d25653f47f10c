"""Training with Q-Scorer: score-token fine-tuning and reward fine-tuning of diffusion models.

Score-token fine-tuning (``docs/training.md``): `TrainingConfig` describes a run,
`ScoreTokenTrainer` runs it (``qscorer train --config FILE.yaml``); the pieces live in
``datasets`` (manifests, records, sampling), ``official`` (readers of the IQA releases),
``losses``, ``metrics``, ``model``, ``evaluation``, ``export``, ``augment`` and ``synthetic``.
"""

from __future__ import annotations

import importlib

# Exported names, imported on first use so that e.g. `losses` loads without the trainer's imports.
_EXPORTS = {
    "TrainingConfig": ".config",
    "DatasetConfig": ".config",
    "LoraSettings": ".config",
    "LossWeights": ".config",
    "AugmentSettings": ".config",
    "ScoreTokenTrainer": ".trainer",
    "IQARecord": ".datasets",
    "read_manifest": ".datasets",
    "write_manifest": ".datasets",
    "OFFICIAL_READERS": ".official",
    "iqa_metrics": ".metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
