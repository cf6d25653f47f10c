"""qscorer-reward: Q-Scorer, an MLLM image-quality scorer, as a differentiable reward model."""

from .config import QScorerConfig
from .head import ScoreHead
from .scorer import QScorer

__version__ = "0.1.0"

__all__ = ["QScorer", "QScorerConfig", "ScoreHead", "__version__"]
