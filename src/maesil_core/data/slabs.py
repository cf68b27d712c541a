"""Whole-volume array work a slab at a time, so a cancel flag is checked every fraction of a
second (NumPy cannot be stopped inside one call on a 100 M-voxel array).

``check`` is a ``() -> None`` that raises :class:`~maesil_core.errors.Cancelled` once the
user asked to stop (:func:`maesil_core.progress.stop_fn`); None never stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

#: voxels written at a time when fresh memory is first touched (16 MB of float32)
TOUCH_CHUNK = 1 << 22
#: slices of a label map's slowest axis that :func:`label_values` reads at a time
VALUE_SLAB = 16

Check = Callable[[], Any] | None


def empty_touched(shape: tuple[int, ...], dtype: Any, check: Check = None) -> np.ndarray:
    """``np.empty(shape, dtype)`` with its memory taken up in order, ``TOUCH_CHUNK`` voxels
    at a time, ``check()`` between chunks. A loop that then writes slabs across the array's
    slow axis (``out[..., z:z + 8]``, ``out[:, j, :]``) would otherwise fault every page of
    it in its first slab: 0.5-0.9 s at 512 x 512 x 400, before the first check."""
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, TOUCH_CHUNK):
        if check is not None:
            check()
        flat[start : start + TOUCH_CHUNK] = 0
    return out


def c_contiguous(array: np.ndarray, dtype: Any = None, check: Check = None) -> np.ndarray:
    """``np.ascontiguousarray(array, dtype)``; a transposed 3D volume (nibabel's Fortran
    order, a memory-mapped ``.nii``, a napari layer's (z, y, x) seen as (X, Y, Z)) is copied
    one 2D slab of its middle axis at a time: each slab fits in the cache, where one
    transposing copy of a 512 x 512 x 400 volume jumps across 200 MB (2 s instead of 12 s on
    a busy 2-core machine; each slab is also a short hold of the GIL, so a viewer's thread
    keeps running). ``check()`` is called every 4 slabs."""
    dtype = np.dtype(dtype if dtype is not None else np.asarray(array[:0]).dtype)
    if array.ndim != 3 or (array.flags.c_contiguous and array.dtype == dtype):
        return np.ascontiguousarray(array, dtype=dtype)
    out = empty_touched(array.shape, dtype, check)
    for j in range(array.shape[1]):
        if check is not None and j % 4 == 0:
            check()
        out[:, j, :] = array[:, j, :]
    return out


def slowest_axis_slabs(array: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Views of ``array`` ``size`` slices at a time along the axis whose slices are
    contiguous in memory (the last for a Fortran-ordered volume, the first for C order)."""
    axis = int(np.argmax([abs(s) for s in array.strides]))
    for start in range(0, array.shape[axis], size):
        yield array[(slice(None),) * axis + (slice(start, start + size),)]


def value_range(array: np.ndarray, check: Check = None) -> tuple[float, float]:
    """``(min, max)`` of a non-empty array, ``VALUE_SLAB`` slices at a time, ``check()``
    before each slab."""
    low, high = np.inf, -np.inf
    for slab in slowest_axis_slabs(array, VALUE_SLAB) if array.ndim else [array]:
        if check is not None:
            check()
        if slab.size:
            low, high = min(low, float(np.min(slab))), max(high, float(np.max(slab)))
    return low, high


def label_values(array: np.ndarray, check: Check = None) -> np.ndarray:
    """The distinct values of a label map, sorted: ``np.unique(array)``, found
    ``VALUE_SLAB`` slices at a time along the axis whose slices are contiguous in memory
    (a Fortran-ordered NIfTI map or a napari layer seen as (X, Y, Z): the last), with
    ``check()`` before each slab. The whole-array ``np.unique`` of a 512 x 512 x 400 map
    copies it flat first and cannot be stopped: 2.8 s a call on an idle core."""
    array = np.asarray(array)
    if array.ndim == 0 or array.size == 0:
        return np.unique(array)
    parts = []
    for slab in slowest_axis_slabs(array, VALUE_SLAB):
        if check is not None:
            check()
        parts.append(np.unique(slab))
    return np.unique(np.concatenate(parts))
