"""Backbone families: one file each; `backbone_class` picks the one for a transformers model type."""

from __future__ import annotations

from importlib import import_module

from .base import Backbone, BackboneInputs
from .qwen_vl import QwenVLBackbone

BACKBONES: tuple[type[Backbone], ...] = (QwenVLBackbone,)

# Families with their own model code, imported on first use (importing one registers its model with
# transformers' Auto classes, and costs the import of transformers' modeling code).
NATIVE_BACKBONES: dict[str, tuple[str, str]] = {"mplug_owl2": (".mplug_owl2", "MplugOwl2Backbone")}


def backbone_class(model_type: str) -> type[Backbone]:
    """The `Backbone` subclass handling transformers ``config.model_type`` ``model_type``."""
    for cls in BACKBONES:
        if model_type in cls.model_types:
            return cls
    if model_type in NATIVE_BACKBONES:
        module, name = NATIVE_BACKBONES[model_type]
        return getattr(import_module(module, __name__), name)
    supported = sorted([t for cls in BACKBONES for t in cls.model_types] + list(NATIVE_BACKBONES))
    raise ValueError(f"unsupported backbone model type {model_type!r}; supported: {supported}")


__all__ = ["Backbone", "BackboneInputs", "QwenVLBackbone", "backbone_class"]
