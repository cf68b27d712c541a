"""napari-maesil: MAESIL self-supervised 3D pretraining for CT in napari."""

from maesil_core import __version__

__all__ = ["__version__"]
