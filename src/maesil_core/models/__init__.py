"""Models: 3D ViT blocks, masking, MAESIL and the comparison methods."""

from .base import PretrainOutput
from .registry import available_methods, build_from_checkpoint, build_model

__all__ = ["PretrainOutput", "available_methods", "build_from_checkpoint", "build_model"]
