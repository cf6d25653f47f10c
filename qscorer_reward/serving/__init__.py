"""Q-Scorer as a reward service: ``qscorer serve`` (a Ray Serve application, `serving.app`),
its client `RemoteQScorer` (standard library only), and offline scoring on Ray Data
(`serving.ray_engine`, ``qscorer score --engine ray``). Ray is needed by the server and the
engine only: ``pip install "qscorer-reward[serve]"``."""

import os

from .client import RemoteQScorer, RequestRefused

# Set before Ray is imported, for a Ray instance a command starts on this machine: no usage report
# unless asked, and Ray's switch for a machine outside any cluster, which binds its ports to
# 127.0.0.1 (Ray reads both when it is imported).
LOCAL_RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prepare_ray_environment(address: str | None) -> None:
    """Call before Ray is imported: a local instance (no ``address``) gets `LOCAL_RAY_ENVIRONMENT`,
    and Ray Data logs errors only, not its progress nor its notes on how it stores the paths (the
    user's own settings of these variables win)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    if address is None:
        for name, value in LOCAL_RAY_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


__all__ = ["LOCAL_RAY_ENVIRONMENT", "RemoteQScorer", "RequestRefused", "prepare_ray_environment"]
