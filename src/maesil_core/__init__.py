"""maesil_core: self-supervised 3D pretraining for CT (no Qt, no napari)."""

__version__ = "0.1.0"
