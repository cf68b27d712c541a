"""Interoperability: weights and outputs in the formats other tools read.

- :mod:`.monai_vit`     encoder weights to and from ``monai.networks.nets.ViT`` / ``UNETR``.
- :mod:`.monai_bundle`  a fine-tuned segmenter as a MONAI Bundle (``python -m monai.bundle run``).
- :mod:`.dicom_seg`     a label map as a DICOM Segmentation object referencing its CT series.

Nothing here is imported by the rest of ``maesil_core``: each module is used by the command
line (``maesil export`` / ``maesil import`` / ``maesil segment --format dicom-seg``) and by
whoever calls it from Python.
"""
