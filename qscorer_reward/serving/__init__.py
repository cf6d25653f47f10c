"""Q-Scorer as a reward service: ``qscorer serve`` (a Ray Serve application, `serving.app`),
its client `RemoteQScorer` (standard library only), and offline scoring on Ray Data
(`serving.ray_engine`, ``qscorer score --engine ray``). Ray is needed by the server and the
engine only: ``pip install "qscorer-reward[serve]"``."""

from .client import RemoteQScorer, RequestRefused

__all__ = ["RemoteQScorer", "RequestRefused"]
