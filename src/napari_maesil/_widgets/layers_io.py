"""Layers -> ``maesil_core`` volumes (what the fine-tune and segment jobs take)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._geometry import META_KEY, layer_to_volume


def layer_volume(layer: Any, labels: bool = False) -> Any:
    """A ``Volume`` (array (X, Y, Z), RAS affine) for a 3D Image or Labels layer.

    The array is in the layer's (LPS) voxel order; its ``path`` is the source file if known
    (so a ``label_names.json`` beside it is found), else the layer name.
    """
    from maesil_core.data.io import Volume, looks_like_hu

    array, affine = layer_to_volume(layer)
    source = (layer.metadata.get(META_KEY) or {}).get("source") or layer.name
    if labels:
        return Volume(np.asarray(array, dtype=np.int32), affine, str(source), is_hu=False)
    array = np.asarray(array, dtype=np.float32)
    return Volume(array, affine, str(source), is_hu=looks_like_hu(array))


def layer_label_names(layer: Any) -> dict[int, str]:
    """``{id: name}`` of a Labels layer, from its metadata or its features table."""
    names = (layer.metadata.get(META_KEY) or {}).get("label_names") or {}
    names = {int(k): str(v) for k, v in names.items()}
    features = getattr(layer, "features", None)
    if not names and features is not None and "index" in features and "name" in features:
        names = {int(i): str(n) for i, n in zip(features["index"], features["name"]) if str(n)}
    return {k: v for k, v in names.items() if k != 0}
