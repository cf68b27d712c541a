"""Sample data: the procedural CT phantom (offline) and a real public CT (pooch download).

The public CT is fetched once with its SHA-256 into ``$MAESIL_CACHEDIR`` or the OS cache
folder (``maesil_core.data.download``); offline, a notification says where to put it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def phantom_sample() -> list[tuple]:
    """A torso phantom CT (HU) and its organ labels, made on the spot (< 1 s)."""
    from maesil_core.data import make_phantom
    from maesil_core.data.io import Volume

    from ._reader import image_layer_data, labels_layer_data

    ph = make_phantom(shape=(128, 128, 96), spacing=(2.0, 2.0, 2.5), seed=0)
    ct = image_layer_data(ph.ct, ph.affine, "phantom_ct", is_hu=True, source="")
    labels_vol = Volume(array=ph.labels.astype(np.int32), affine=ph.affine, path="", is_hu=False)
    labels = labels_layer_data(labels_vol, "phantom_labels", names=ph.names)
    return [ct, labels]


def public_ct_sample() -> list[tuple]:
    """TotalSegmentator's small example abdomen CT and its organ labels (Apache-2.0).

    Downloaded on first use; offline, the error notification names the file and the folder
    to put it in (or ``MAESIL_CACHEDIR``).
    """
    from napari.utils.notifications import show_warning

    from maesil_core.data.download import fetch
    from maesil_core.errors import MaesilError

    from ._reader import read_volume

    # offline, fetch raises a DataError that says which file to put where; napari shows it
    # as an error notification (a sample must return layers or raise)
    ct_path = fetch("totalseg_example_ct")
    layers = [_renamed(read_volume(ct_path, as_labels=False), "abdomen_ct")]
    try:
        seg_path = fetch("totalseg_example_seg")
        layers.append(_renamed(read_volume(seg_path, as_labels=True), "abdomen_labels"))
    except MaesilError as exc:
        show_warning(f"Sample labels not available (the CT is): {exc}")
    return layers


def _renamed(layer_data: tuple, name: str) -> tuple:
    data, kwargs, kind = layer_data
    return data, {**kwargs, "name": name}, kind


def sample_paths() -> dict[str, Path]:  # pragma: no cover - convenience for scripts
    from maesil_core.data.download import PUBLIC_CT, cache_dir

    return {k: cache_dir() / v["filename"] for k, v in PUBLIC_CT.items()}
