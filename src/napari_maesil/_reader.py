"""Reader: NIfTI and NRRD files and DICOM series folders -> napari Image (HU) or Labels layers.

Every volume is reoriented to LPS with nibabel's orientation tools and shown with
``scale`` = voxel spacing and ``translate`` = the LPS position of its first voxel (see
:mod:`napari_maesil._geometry`), so an RAS NIfTI, an LPS NIfTI, a DICOM series and their
label maps all line up in world coordinates (millimetres, DICOM patient space).

Each file is decoded once (``maesil_core.data.io.read_raw``; nibabel / pydicom / pynrrd,
never torch or MONAI: napari runs readers on the Qt thread). Image or labels is decided
from what the header says first: a float (or scaled) file is an image; an integer file is a
label map when the NIfTI intent says so or its name does (``label``, ``seg``, ``mask``);
only an integer file without either is looked at (few distinct values: labels). An integer
CT keeps its dtype (an int16 CT takes half the memory of float32). Label names come from
the label map's own ``<name>.json`` or a ``label_names.json`` beside it
(:func:`maesil_core.data.io.read_label_names`) and are attached as layer ``features`` (hover
shows them). Unreadable input gives a napari error notification (no traceback) and no layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import META_KEY, layer_units, volume_to_layer

#: default CT window for display (HU): maesil's default training window
CT_WINDOW = (-175.0, 250.0)
_LABEL_HINTS = ("label", "seg", "mask", "annot")
_MAX_LABEL_VALUES = 64
#: NIfTI intent code of a label map (NIFTI_INTENT_LABEL)
_NIFTI_INTENT_LABEL = 1002
#: file names that say nothing: the folder name is used instead / as a prefix
_GENERIC_IMAGE_NAMES = ("ct", "image", "img", "volume", "scan")
_GENERIC_LABEL_NAMES = ("labels", "label", "seg", "segmentation", "mask")
#: what the reader opens (the manifest's filename_patterns say the same)
SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm")


def get_reader(path: str | list[str]) -> Any:
    """npe2 reader hook: a reader for NIfTI / NRRD files and DICOM folders, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        return None
    for p in paths:
        if Path(p).is_dir():
            from maesil_core.data.io import is_dicom_dir

            if not is_dicom_dir(p):
                return None
        elif not str(p).lower().endswith(SUFFIXES):
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


def _header_says_labels(path: Path) -> bool | None:
    """True / False when the file's header decides it, None when the data must."""
    if path.is_dir() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header  # the header only: no voxels decoded
    except Exception:  # read_raw reports a bad file with the fix
        return None
    if int(header.get("intent_code", 0)) == _NIFTI_INTENT_LABEL:
        return True
    slope, inter = header.get_slope_inter()
    if not np.issubdtype(header.get_data_dtype(), np.integer) or (
        slope not in (None, 1.0) or inter not in (None, 0.0)
    ):
        return False  # float or scaled intensities: an image
    return None


def read_volume(
    path: str | Path, *, as_labels: bool | None = None, lazy: bool | None = None
) -> tuple:
    """One file or DICOM folder -> napari LayerData ``(data, kwargs, "image"|"labels")``.

    The file is decoded once. ``as_labels`` None decides from the header, else with
    :func:`looks_like_labels`. A large NIfTI CT opened in a viewer is decoded in the
    background (:mod:`napari_maesil._lazy`; ``lazy=False`` reads it here).
    """
    from maesil_core.data.io import labels_from_raw, read_raw, strip_suffix, volume_from_raw

    path = Path(path)
    if as_labels is None:
        as_labels = _header_says_labels(path)
    name = strip_suffix(path.name)
    parent = path.parent.name if path.is_file() else ""
    image_name = parent if parent and name.lower() in _GENERIC_IMAGE_NAMES else name
    if not as_labels and lazy is not False:
        from ._lazy import read_in_background

        pending = read_in_background(path, image_name, as_labels is False)
        if pending is not None:
            return pending
    raw, affine, spath = read_raw(path)
    if as_labels is None:
        as_labels = looks_like_labels(np.asanyarray(raw), name)
    if as_labels:
        if parent and name.lower() in _GENERIC_LABEL_NAMES:
            name = f"{parent} {name}"
        return labels_layer_data(labels_from_raw(raw, affine, spath, dtype=None), name)
    vol = volume_from_raw(raw, affine, spath, keep_integers=True)
    del raw
    return image_layer_data(vol.array, vol.affine, image_name, is_hu=vol.is_hu, source=str(path))


def image_layer_data(
    array: np.ndarray,
    affine: np.ndarray,
    name: str,
    *,
    is_hu: bool = True,
    source: str = "",
    window: tuple[float, float] | None = None,
) -> tuple:
    """A CT array (X, Y, Z) + RAS affine -> Image LayerData with a CT window (an integer
    array keeps its dtype, anything else becomes float32)."""
    data, kwargs, warning = image_layer(array, affine, name, is_hu=is_hu, source=source,
                                        window=window)  # fmt: skip
    if warning:
        from napari.utils.notifications import show_warning

        show_warning(warning)
    return data, kwargs, "image"


def image_layer(
    array: np.ndarray,
    affine: np.ndarray,
    name: str,
    *,
    is_hu: bool = True,
    source: str = "",
    window: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """:func:`image_layer_data`'s ``(data, kwargs, warning)``, touching nothing of napari
    (it also runs in the background reader's thread)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32, copy=False)
    data, geo, meta = volume_to_layer(array, affine)
    warning = ""
    if window is None:
        if is_hu:
            window = CT_WINDOW
        else:
            lo, hi = np.percentile(data[:: max(1, data.shape[0] // 16)], [0.5, 99.5])
            window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
            warning = (
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
        **layer_units(),
    }
    return data, kwargs, warning


def labels_layer_data(vol: Any, name: str, names: dict[int, str] | None = None) -> tuple:
    """A label ``Volume`` -> Labels LayerData; organ names as features if known."""
    from maesil_core.errors import MaesilError

    if names is None:
        try:
            from maesil_core.data.io import read_label_names

            names = read_label_names(vol.path) if vol.path else None
        except MaesilError:
            names = None
    array = np.asarray(vol.array)
    top = int(array.max(initial=0))
    if top < 256 and array.dtype != np.uint8 and array.min(initial=0) >= 0:
        array = array.astype(np.uint8)  # before reorienting: one copy, a quarter of int32
    data, geo, meta = volume_to_layer(array, vol.affine)
    meta.update({"kind": "labels", "source": vol.path, "label_names": names or {}})
    kwargs = {"name": name, "metadata": {META_KEY: meta}, **geo, **layer_units()}
    if names:
        kwargs["features"] = label_features(names, top)
    return data, kwargs, "labels"


def label_features(names: dict[int, str], max_id: int) -> dict[str, list]:
    """A features table indexed by label id (row i = id i) so hovering shows the name."""
    top = max(max_id, max(names, default=0))
    ids = list(range(top + 1))
    return {"index": ids, "name": [names.get(i, "background" if i == 0 else "") for i in ids]}
