"""qscorer-reward: Q-Scorer, an MLLM image-quality scorer, as a differentiable reward model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that the command line (`qscorer --help`) starts without torch.
_EXPORTS = {"QScorer": ".scorer", "QScorerConfig": ".config", "ScoreHead": ".head"}

__all__ = ["QScorer", "QScorerConfig", "ScoreHead", "__version__"]

if TYPE_CHECKING:
    from .config import QScorerConfig
    from .head import ScoreHead
    from .scorer import QScorer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
