"""Messages of other libraries that the package's own calls would trigger, silenced narrowly.

Each helper drops one known message, only around the call of this package that triggers it; the
same message from a user's own code is left alone, and so is every other message.
"""

from __future__ import annotations

import contextlib
import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropMessages(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def diffusers_pipeline_imports():
    """Around an import (or ``from_pretrained``) of diffusers pipeline classes.

    diffusers' pipeline modules import ``CLIPImageProcessor`` and ``SiglipImageProcessor`` for
    IP-Adapters; without torchvision (not a dependency here), transformers 5 then logs that it falls
    back to their PIL versions. Nothing in this package uses those processors, so the notice is
    dropped here. transformers shows it once per process, so once dropped it does not come back.
    """
    logger = logging.getLogger("transformers.utils.import_utils")
    drop = _DropMessages(TORCHVISION_FALLBACK)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
