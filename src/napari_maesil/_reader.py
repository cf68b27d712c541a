"""Reader: NIfTI files and DICOM series folders -> napari Image (HU) or Labels layers.

Every volume is reoriented to LPS with nibabel's orientation tools and shown with
``scale`` = voxel spacing and ``translate`` = the LPS position of its first voxel (see
:mod:`napari_maesil._geometry`), so an RAS NIfTI, an LPS NIfTI, a DICOM series and their
label maps all line up in world coordinates (millimetres, DICOM patient space).

A file is read as a label map when it holds non-negative integers and either its name says
so (``label``, ``seg``, ``mask``) or it has few distinct values; names come from a
``label_names.json`` beside it and are attached as layer ``features`` (hover shows them).
Unreadable input gives a napari error notification (no traceback) and no layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import META_KEY, volume_to_layer

#: default CT window for display (HU): maesil's default training window
CT_WINDOW = (-175.0, 250.0)
_LABEL_HINTS = ("label", "seg", "mask", "annot")
_MAX_LABEL_VALUES = 64
#: file names that say nothing: the folder name is used instead / as a prefix
_GENERIC_IMAGE_NAMES = ("ct", "image", "img", "volume", "scan")
_GENERIC_LABEL_NAMES = ("labels", "label", "seg", "segmentation", "mask")


def get_reader(path: str | list[str]) -> Any:
    """npe2 reader hook: a reader function for NIfTI files and DICOM folders, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        return None
    for p in paths:
        low = str(p).lower()
        if Path(p).is_dir():
            from maesil_core.data.io import is_dicom_dir

            if not is_dicom_dir(p):
                return None
        elif not (low.endswith((".nii", ".nii.gz")) or low.endswith(".dcm")):
            return None
    return read_paths


def read_paths(path: str | list[str]) -> list[tuple]:
    """Read each path; errors become notifications (``[(None,)]`` = nothing to add)."""
    from napari.utils.notifications import show_error

    from maesil_core.errors import MaesilError

    paths = [path] if isinstance(path, str) else list(path)
    layers: list[tuple] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.suffix.lower() == ".dcm":
            p = p.parent  # a slice of a series: read the whole folder
        try:
            layers.append(read_volume(p))
        except MaesilError as exc:
            show_error(f"napari-maesil could not open {p.name}: {exc}")
    return layers or [(None,)]


def looks_like_labels(array: np.ndarray, name: str) -> bool:
    """Non-negative integer map with a label-ish name or few distinct values."""
    if not np.issubdtype(array.dtype, np.integer):
        return False
    if array.size == 0 or array.min() < 0:
        return False
    if any(h in name.lower() for h in _LABEL_HINTS):
        return True
    step = max(1, array.size // 2_000_000)
    return len(np.unique(array.ravel()[::step])) <= _MAX_LABEL_VALUES


def read_volume(path: str | Path, *, as_labels: bool | None = None) -> tuple:
    """One file or DICOM folder -> napari LayerData ``(data, kwargs, "image"|"labels")``.

    ``as_labels`` None decides with :func:`looks_like_labels`.
    """
    from maesil_core.data.io import _read_any, load_labels, load_volume, strip_suffix

    path = Path(path)
    raw, _, _ = _read_any(path)
    name = strip_suffix(path.name)
    parent = path.parent.name if path.is_file() else ""
    if as_labels is None:
        as_labels = looks_like_labels(np.asanyarray(raw), name)
    if as_labels:
        if parent and name.lower() in _GENERIC_LABEL_NAMES:
            name = f"{parent} {name}"
        return labels_layer_data(load_labels(path), name)
    if parent and name.lower() in _GENERIC_IMAGE_NAMES:
        name = parent
    vol = load_volume(path)
    return image_layer_data(vol.array, vol.affine, name, is_hu=vol.is_hu, source=str(path))


def image_layer_data(
    array: np.ndarray,
    affine: np.ndarray,
    name: str,
    *,
    is_hu: bool = True,
    source: str = "",
    window: tuple[float, float] | None = None,
) -> tuple:
    """A CT array (X, Y, Z) + RAS affine -> Image LayerData with a CT window."""
    data, geo, meta = volume_to_layer(np.asarray(array, dtype=np.float32), affine)
    if window is None:
        if is_hu:
            window = CT_WINDOW
        else:
            lo, hi = np.percentile(data[:: max(1, data.shape[0] // 16)], [0.5, 99.5])
            window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
            from napari.utils.notifications import show_warning

            show_warning(
                f"{name}: values are not Hounsfield units (nothing below -500); shown with a "
                "percentile window. Training uses intensity='auto' -> percentile scaling."
            )
    meta.update({"kind": "image", "is_hu": bool(is_hu), "source": source})
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": [float(window[0]), float(window[1])],
        "metadata": {META_KEY: meta},
        **geo,
    }
    return data, kwargs, "image"


def labels_layer_data(vol: Any, name: str, names: dict[int, str] | None = None) -> tuple:
    """A label ``Volume`` -> Labels LayerData; organ names as features if known."""
    from maesil_core.errors import MaesilError

    if names is None:
        try:
            from maesil_core.data.io import read_label_names

            names = read_label_names(vol.path) if vol.path else None
        except MaesilError:
            names = None
    data, geo, meta = volume_to_layer(vol.array, vol.affine)
    if data.max(initial=0) < 256:
        data = data.astype(np.uint8)
    meta.update({"kind": "labels", "source": vol.path, "label_names": names or {}})
    kwargs = {"name": name, "metadata": {META_KEY: meta}, **geo}
    if names:
        kwargs["features"] = label_features(names, int(data.max(initial=0)))
    return data, kwargs, "labels"


def label_features(names: dict[int, str], max_id: int) -> dict[str, list]:
    """A features table indexed by label id (row i = id i) so hovering shows the name."""
    top = max(max_id, max(names, default=0))
    ids = list(range(top + 1))
    return {"index": ids, "name": [names.get(i, "background" if i == 0 else "") for i in ids]}
