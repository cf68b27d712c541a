"""Large CTs are decoded in the background: the viewer paints at once.

napari runs readers on the Qt thread, and a 512 x 512 x 400 ``.nii.gz`` takes seconds to
decompress. For a NIfTI CT above :data:`LAZY_BYTES` (decoded) opened in a viewer, the
reader returns at once with what the header says (shape, placement in patient space,
dtype) and a blank placeholder array (dask: its slabs are zeros); a job thread decodes
the file (once) and the Qt thread swaps the finished array into the layer
(``layer.data = array``, tens of milliseconds). Meanwhile the layer's
``metadata["maesil"]["loading"]`` is True, napari's activity dock shows the reading, and
the widgets refuse the layer with a message saying it is still being read.
"""

from __future__ import annotations

import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ._geometry import META_KEY, layer_units, volume_geometry

#: NIfTI CTs larger than this once decoded are read in the background (a 512 x 512 x 400
#: int16 CT is 200 MB; the shared 512 x 512 x 61 chest CT, 32 MB, is read at once)
LAZY_BYTES = 64 * 2**20
#: how often the Qt thread looks whether a background read is done (ms)
POLL_MS = 50
#: slab thickness of the placeholder (slices)
_SLAB = 16

#: load id -> what the Qt thread needs to finish it
_pending: dict[str, dict[str, Any]] = {}
#: one Qt timer polls every pending read (created on the Qt thread, never deleted)
_timer: list[Any] = []


def read_in_background(path: Path, name: str, known_image: bool) -> tuple | None:
    """Placeholder LayerData for a large NIfTI CT in a viewer (decoding started), or None
    when the file should be read now (small, not NIfTI, not a CT, no viewer)."""
    header = _large_ct_header(path, known_image)
    if header is None:
        return None
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.current_viewer()
    if viewer is None or QApplication.instance() is None:
        return None
    shape_xyz, affine, dtype = header
    shape_zyx, geo, meta = volume_geometry(shape_xyz, affine)
    load_id = uuid.uuid4().hex
    meta.update(
        {
            "kind": "image",
            "is_hu": True,  # until the voxels say otherwise
            "source": str(path),
            "loading": True,
            "load_id": load_id,
        }
    )
    from napari.utils import progress

    from ._reader import CT_WINDOW
    from ._worker import Job

    # nibabel only: no need to wait for the heavy imports of the widgets' jobs
    job = Job(_decode, path, name, owner=f"Open {path.name}", after_preload=False).start()
    _pending[load_id] = {
        "job": job,
        "viewer": weakref.ref(viewer),
        "name": name,
        "activity": progress(total=0, desc=f"Reading {path.name}"),
    }
    if not _timer:
        timer = QTimer()
        timer.setInterval(POLL_MS)
        timer.timeout.connect(_poll_all)
        _timer.append(timer)
    _timer[0].start()
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": list(CT_WINDOW),
        "metadata": {META_KEY: meta},
        **geo,
        **layer_units(),
    }
    return _placeholder(shape_zyx, dtype), kwargs, "image"


def is_loading(layer: Any) -> bool:
    """True while a layer's file is still being decoded in the background."""
    return bool((getattr(layer, "metadata", {}).get(META_KEY) or {}).get("loading", False))


def _large_ct_header(path: Path, known_image: bool) -> tuple | None:
    """``(shape (X, Y, Z), RAS affine, layer dtype)`` of a large 3D NIfTI CT, else None."""
    if not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        stored = np.dtype(header.get_data_dtype())
        slope, inter = header.get_slope_inter()
    except Exception:  # the synchronous path reports a bad file with the fix
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 2:
        return None  # 2D / 4D: the synchronous path says what is wrong
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    if np.issubdtype(stored, np.integer) and not scaled:
        if not known_image and not np.issubdtype(stored, np.signedinteger):
            return None  # an unsigned map may be labels: the voxels decide
        dtype = stored
    else:
        dtype = np.dtype(np.float32)
    if int(np.prod(shape)) * dtype.itemsize < LAZY_BYTES:
        return None
    return shape, np.asarray(img.affine, dtype=np.float64), dtype


def _placeholder(shape_zyx: tuple[int, int, int], dtype: np.dtype) -> Any:
    """A blank dask array of the layer's shape (its slabs are made on demand: no memory)."""
    import dask.array as da

    return da.zeros(shape_zyx, dtype=dtype, chunks=(_SLAB, *shape_zyx[1:]))


def _decode(path: Path, name: str, *, progress: Any, cancel: Any) -> dict[str, Any]:
    """In the job's thread: decode once, reorient, window; returns what the layer needs."""
    from maesil_core.data.io import read_raw, volume_from_raw

    from ._reader import image_layer

    progress({"phase": "read", "message": f"reading {path.name}"})
    raw, affine, spath = read_raw(path)
    vol = volume_from_raw(raw, affine, spath, keep_integers=True)
    del raw
    data, kwargs, warning = image_layer(
        vol.array, vol.affine, name, is_hu=vol.is_hu, source=str(path)
    )
    del vol
    return {
        "data": data,
        "kwargs": kwargs,
        "warning": warning,
        "range": (float(data.min()), float(data.max())),
    }


def _poll_all() -> None:
    for load_id in list(_pending):
        _poll(load_id)
    if not _pending and _timer:
        _timer[0].stop()


def _poll(load_id: str) -> None:
    entry = _pending[load_id]
    job = entry["job"]
    job.poll()
    if job.result is None:
        return
    entry["activity"].close()
    del _pending[load_id]
    layers = _layers_of(load_id, entry["viewer"]())
    from napari.utils.notifications import show_error, show_warning

    result = job.result
    if result.error:
        show_error(f"napari-maesil could not open {entry['name']}: {result.error}")
        for layer, viewer in layers:
            viewer.layers.remove(layer)
        return
    out = result.value
    meta = out["kwargs"]["metadata"][META_KEY]
    for layer, _ in layers:
        layer.data = out["data"]
        low, high = out["range"]
        layer.contrast_limits_range = (low, high if high > low else low + 1.0)
        layer.contrast_limits = out["kwargs"]["contrast_limits"]
        layer.metadata[META_KEY] = {**meta, "loading": False}
    if out["warning"] and layers:
        show_warning(out["warning"])


def _layers_of(load_id: str, viewer: Any) -> list[tuple[Any, Any]]:
    """The layers (with their viewer) made from the placeholder ``load_id``."""
    import napari

    viewers = [viewer] if viewer is not None else []
    viewers += [v for v in getattr(napari.Viewer, "_instances", ()) if v is not viewer]
    found = []
    for v in viewers:
        for layer in v.layers:
            if (layer.metadata.get(META_KEY) or {}).get("load_id") == load_id:
                found.append((layer, v))
    return found
