"""Score-token fine-tuning of a Q-Scorer (``docs/training.md``); needs the ``train`` extra.

`TrainingConfig` describes a run, `ScoreTokenTrainer` runs it (``qscorer train --config FILE.yaml``),
`TrainerCallback` s extend it from code; the pieces live in ``data`` (records, manifests, the
dataset and sampler), ``official`` (readers of the IQA releases), ``losses``, ``metrics``,
``model``, ``evaluation``, ``export`` and ``augment``. ``pairwise`` trains on image preferences
with TRL (the ``trl`` extra).
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
    "ParameterGroup": ".config",
    "ScoreTokenTrainer": ".trainer",
    "TrainerCallback": ".callbacks",
    "IQARecord": ".data",
    "read_manifest": ".data",
    "write_manifest": ".data",
    "OFFICIAL_READERS": ".official",
    "iqa_metrics": ".metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
