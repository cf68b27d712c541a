"""Models: 3D ViT blocks, masking, MAESIL and the comparison methods."""

from .base import PretrainOutput
from .registry import available_methods, build_model

__all__ = ["PretrainOutput", "build_model", "available_methods"]
