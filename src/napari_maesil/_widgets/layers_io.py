"""Layers -> ``maesil_core`` volumes (what the jobs take), and the checks made before a job.

What a job receives from a layer is taken on the Qt thread when Start is clicked:

- an Image layer's array by reference (napari never edits image data in place; replacing
  ``layer.data`` while the job runs leaves the job's array alone), as a view in the
  ``(X, Y, Z)`` order of the core, in its own dtype (an int16 CT stays int16);
- a Labels layer's array as a copy (the user can paint on it while the job runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._geometry import META_KEY, layer_to_volume

#: an integer volume with at most this many distinct values is a label map, not a CT
_MAX_LABEL_VALUES = 64


def layer_volume(layer: Any, labels: bool = False) -> Any:
    """A ``Volume`` (array (X, Y, Z), RAS affine) for a 3D Image or Labels layer.

    The array is in the layer's (LPS) voxel order; its ``path`` is the source file if known
    (so a label-names file beside it is found), else the layer name. Image data is a view
    (no copy, the layer's dtype); label data is an int32 copy.
    """
    from maesil_core.data.io import Volume

    check_loaded(layer)
    array, affine = layer_to_volume(layer)
    source = (layer.metadata.get(META_KEY) or {}).get("source") or layer.name
    if labels:
        return Volume(np.array(array, dtype=np.int32), affine, str(source), is_hu=False)
    meta = layer.metadata.get(META_KEY) or {}
    is_hu = meta["is_hu"] if "is_hu" in meta else _looks_like_hu(array)
    return Volume(array, affine, str(source), is_hu=bool(is_hu))


def _looks_like_hu(array: np.ndarray) -> bool:
    from maesil_core.data.io import HU_MIN_THRESHOLD

    sample = array[::2, ::2, ::2]
    return bool(sample.size) and float(sample.min()) < HU_MIN_THRESHOLD


def layer_label_names(layer: Any) -> dict[int, str]:
    """``{id: name}`` of a Labels layer, from its metadata or its features table."""
    names = (layer.metadata.get(META_KEY) or {}).get("label_names") or {}
    names = {int(k): str(v) for k, v in names.items()}
    features = getattr(layer, "features", None)
    if not names and features is not None and "index" in features and "name" in features:
        names = {int(i): str(n) for i, n in zip(features["index"], features["name"]) if str(n)}
    return {k: v for k, v in names.items() if k != 0}


def check_loaded(layer: Any) -> None:
    """A DataError if the layer's file is still being decoded in the background."""
    from maesil_core.errors import DataError

    from .._lazy import is_loading

    if is_loading(layer):
        raise DataError(
            f"layer {layer.name!r} is still being read from its file (a few seconds for a "
            "large CT); start again when the CT shows in the viewer."
        )


def label_map_problem(layer: Any) -> str | None:
    """A message if the Image layer chosen as the CT holds a label map, else None.

    Looks at every 4th voxel along each axis (an integer map with few distinct values), so
    it is quick on the Qt thread even for a 512 x 512 x 400 volume. A layer still being read
    is refused with its own message (:func:`check_loaded`).
    """
    check_loaded(layer)
    data = layer.data
    if getattr(data, "ndim", 0) != 3 or not np.issubdtype(np.asarray(data[:0]).dtype, np.integer):
        return None
    sample = np.asarray(data[::4, ::4, ::4])
    if sample.size == 0 or sample.min() < 0:
        return None
    values = np.unique(sample)
    if len(values) > _MAX_LABEL_VALUES:
        return None
    return (
        f"layer {layer.name!r} looks like a label map ({len(values)} integer values), not a "
        "CT; choose the CT layer (or open the file as labels: File > Open opens label maps "
        "as Labels layers)."
    )
