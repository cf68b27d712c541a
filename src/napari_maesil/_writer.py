"""Writers: Labels and Image layers -> NIfTI with the source CT's affine.

When the layer was made by this plugin (reader, sample data, Segment widget), its
``metadata["maesil"]`` holds the source file's affine, shape and orientation: the data is
put back in the source's voxel order and saved with exactly that affine, so a
segmentation saved here lies voxel for voxel on the CT in 3D Slicer or ITK-SNAP. Other
layers are saved from their ``scale`` / ``translate`` / ``rotate`` (world = LPS mm, see
:mod:`napari_maesil._geometry`). Label names go to ``<name>.json`` beside the file (``seg.nii.gz`` -> ``seg.json``), the
convention ``maesil segment`` and the reader share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import META_KEY, layer_affine_ras, source_order


def _nifti_path(path: str) -> Path:
    p = Path(path)
    low = p.name.lower()
    if not low.endswith((".nii", ".nii.gz")):
        p = p.with_name(p.name + ".nii.gz")
    return p


def volume_for_saving(data: Any, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(array in the file's voxel order, RAS affine)`` for layer ``data`` + layer kwargs."""
    from maesil_core.errors import DataError

    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    if info.get("loading"):
        raise DataError("this layer is still being read from its file; save it once it shows.")
    data = np.asarray(data)
    if data.ndim != 3:
        raise DataError(f"only 3D layers can be saved as NIfTI, this one is {data.shape}.")
    scale = meta.get("scale", (1.0, 1.0, 1.0))
    translate = meta.get("translate", (0.0, 0.0, 0.0))
    rotate = meta.get("rotate")
    affine = layer_affine_ras(scale, translate, rotate)
    if info.get("source_affine") is not None:
        src_affine = np.asarray(info["source_affine"], dtype=np.float64)
        back = source_order(data, info)
        # only trust the source affine if the layer still sits where the source was
        from ._geometry import to_lps

        if back is not None:
            _, lps_aff, _ = to_lps(np.zeros(back.shape, np.uint8), src_affine)
            if np.allclose(lps_aff, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, atol=1e-3):
                return back, src_affine
    return data.transpose(2, 1, 0), affine


def _write(path: str, data: Any, meta: dict[str, Any], labels: bool) -> list[str]:
    from maesil_core.data.io import save_volume, write_label_names

    out = _nifti_path(path)
    array, affine = volume_for_saving(data, meta)
    if labels:
        top = int(array.max(initial=0))
        dtype = np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.int32)
    else:
        dtype = np.int16 if _is_integer_hu(array) else np.float32
    save_volume(array, affine, out, overwrite=True, dtype=dtype)
    written = [str(out)]
    if labels:
        names = label_names_of(meta)
        if names:  # <stem>.json beside the label map: two maps in one folder keep theirs
            written.append(str(write_label_names(out, names)))
    return written


def _is_integer_hu(array: np.ndarray) -> bool:
    if np.issubdtype(array.dtype, np.integer):
        return bool(array.min(initial=0) >= -32768 and array.max(initial=0) <= 32767)
    return False


def label_names_of(meta: dict[str, Any]) -> dict[int, str]:
    """``{id: name}`` (background left out) of a Labels layer's ``meta`` (layer kwargs)."""
    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    names = {int(k): str(v) for k, v in (info.get("label_names") or {}).items()}
    features = meta.get("features")
    if not names and features is not None and len(features):
        try:
            idx = list(features["index"])
            col = list(features["name"])
            names = {int(i): str(n) for i, n in zip(idx, col) if int(i) != 0 and str(n)}
        except (KeyError, TypeError, ValueError):
            names = {}
    return {k: v for k, v in names.items() if k != 0}


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers (``.nii.gz`` / ``.nii``)."""
    return _write(path, data, meta, labels=True)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Image layers (``.nii.gz`` / ``.nii``)."""
    return _write(path, data, meta, labels=False)
