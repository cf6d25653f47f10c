"""Backbone families: one file each; `backbone_class` picks the one for a transformers model type."""

from __future__ import annotations

from .base import Backbone, BackboneInputs
from .qwen_vl import QwenVLBackbone

BACKBONES: tuple[type[Backbone], ...] = (QwenVLBackbone,)


def backbone_class(model_type: str) -> type[Backbone]:
    """The `Backbone` subclass handling transformers ``config.model_type`` ``model_type``."""
    for cls in BACKBONES:
        if model_type in cls.model_types:
            return cls
    supported = sorted(t for cls in BACKBONES for t in cls.model_types)
    raise ValueError(f"unsupported backbone model type {model_type!r}; supported: {supported}")


__all__ = ["Backbone", "BackboneInputs", "QwenVLBackbone", "backbone_class"]
