"""How volumes become napari layers, and back, without losing their place in the patient.

Convention (the same for every layer this plugin makes, so they all line up):

- A volume ``(X, Y, Z)`` with its RAS+ ``affine`` (``maesil_core``'s convention) is
  **reoriented to LPS with nibabel's orientation tools** (``io_orientation`` /
  ``ornt_transform`` / ``apply_orientation``; flips and axis swaps only, no resampling) and
  transposed to napari's ``(z, y, x)`` order. Layer axes are therefore
  ``(Superior, Posterior, Left)``: the slider walks feet -> head, and each axial slice is
  shown the radiological way (anterior at the top, the patient's right on the screen's
  left), whatever the file's own orientation (RAS NIfTI, LPS NIfTI, DICOM, ...).
- napari world coordinates are the DICOM patient coordinates in millimetres
  ``(z, y, x)`` of LPS: ``scale`` is the voxel spacing and ``translate`` the LPS position of
  the first voxel. A residual oblique rotation (tilted gantry) goes into ``rotate``.
- The original file's affine, shape and orientation are kept in
  ``layer.metadata["maesil"]`` so the writer can save a segmentation on the CT's own voxel
  grid with the CT's own affine (it then opens correctly in 3D Slicer or ITK-SNAP).

Any two layers made with :func:`layer_geometry` are aligned in world coordinates, e.g. an
LPS chest CT and its labels, or a DICOM series (LPS) and a NIfTI label map (LAS).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

#: RAS <-> LPS (its own inverse)
FLIP_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_ORNT = axcodes2ornt(("L", "P", "S"))
META_KEY = "maesil"
#: what the layer axes (z, y, x) point to: LPS, indices grow towards these
AXIS_LABELS = ("superior", "posterior", "left")


@lru_cache(maxsize=1)
def layer_units() -> dict[str, Any]:
    """``units`` (mm) and ``axis_labels`` for layer kwargs, where the installed napari
    supports them (0.6 and later); empty otherwise."""
    import inspect

    from napari.layers import Image

    params = inspect.signature(Image.__init__).parameters
    if "units" not in params or "axis_labels" not in params:
        return {}
    return {"units": ("mm", "mm", "mm"), "axis_labels": AXIS_LABELS}


def to_lps(array: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """Reorient ``array`` (X, Y, Z) to LPS axes. Returns ``(array, affine_lps, ornt)``.

    ``affine_lps`` maps the new voxel indices to LPS world mm; ``ornt`` undoes it with
    :func:`from_lps`.
    """
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    ornt = ornt_transform(io_orientation(affine_ras), _LPS_ORNT)
    out = apply_orientation(np.asarray(array), ornt)
    new_affine_ras = affine_ras @ inv_ornt_aff(ornt, np.asarray(array).shape)
    return out, FLIP_LPS @ new_affine_ras, ornt


def layer_geometry(shape_xyz: tuple[int, ...], affine_ras: np.ndarray) -> dict[str, Any]:
    """napari ``scale`` / ``translate`` (and ``rotate`` if oblique) for an LPS-oriented
    array of ``shape_xyz`` whose RAS affine is ``affine_ras`` (already reoriented)."""
    lps = FLIP_LPS @ np.asarray(affine_ras, dtype=np.float64)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    rot_xyz = m / spacing
    geo: dict[str, Any] = {
        "scale": tuple(float(s) for s in spacing[::-1]),
        "translate": tuple(float(t) for t in lps[:3, 3][::-1]),
    }
    rot_zyx = rot_xyz[::-1, ::-1]
    if not np.allclose(rot_zyx, np.eye(3), atol=1e-6):
        geo["rotate"] = rot_zyx
    return geo


def volume_to_layer(
    array: np.ndarray, affine_ras: np.ndarray
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """``(X, Y, Z)`` + RAS affine -> ``(data (z, y, x), geometry kwargs, source meta)``."""
    array = np.asarray(array)
    lps_arr, lps_aff, _ = to_lps(array, affine_ras)
    data = np.ascontiguousarray(lps_arr.transpose(2, 1, 0))
    geo = layer_geometry(lps_arr.shape, FLIP_LPS @ lps_aff)
    return data, geo, source_meta(array.shape, affine_ras)


def volume_geometry(
    shape_xyz: tuple[int, ...], affine_ras: np.ndarray
) -> tuple[tuple[int, int, int], dict[str, Any], dict[str, Any]]:
    """What :func:`volume_to_layer` gives without the voxels: ``(layer shape (z, y, x),
    geometry kwargs, source meta)`` of a volume of ``shape_xyz`` (a file's header)."""
    empty = np.broadcast_to(np.zeros((), np.uint8), tuple(int(s) for s in shape_xyz))
    lps_arr, lps_aff, _ = to_lps(empty, affine_ras)  # views only: nothing allocated
    geo = layer_geometry(lps_arr.shape, FLIP_LPS @ lps_aff)
    return tuple(lps_arr.shape[::-1]), geo, source_meta(shape_xyz, affine_ras)


def source_meta(shape_xyz: tuple[int, ...], affine_ras: np.ndarray) -> dict[str, Any]:
    """The source file's affine, shape and orientation (kept in the layer's metadata)."""
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    return {
        "source_affine": affine_ras.tolist(),
        "source_shape": [int(s) for s in shape_xyz],
        "source_axcodes": "".join(aff2axcodes(affine_ras)),
    }


def layer_affine_ras(
    scale: Any, translate: Any, rotate: Any | None = None, ndim: int = 3
) -> np.ndarray:
    """RAS affine of the ``(X, Y, Z) = data.transpose(2, 1, 0)`` array of a layer."""
    scale = np.asarray(scale, dtype=np.float64)[-3:]
    translate = np.asarray(translate, dtype=np.float64)[-3:]
    rot_zyx = np.eye(3) if rotate is None else np.asarray(rotate, dtype=np.float64)[-3:, -3:]
    lps = np.eye(4)
    lps[:3, :3] = rot_zyx[::-1, ::-1] @ np.diag(scale[::-1])
    lps[:3, 3] = translate[::-1]
    return FLIP_LPS @ lps


def layer_to_volume(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """A napari Image/Labels layer (made by this plugin or not) -> ``(array XYZ, RAS affine)``.

    Layers not made by this plugin are taken to follow the same convention (axes
    ``(z, y, x)`` of LPS, world in mm); a plain array with scale 1 is read as 1 mm voxels.
    """
    data = np.asarray(layer.data)
    if data.ndim != 3:
        from maesil_core.errors import DataError

        raise DataError(
            f"layer {layer.name!r} is {data.ndim}D with shape {data.shape}; "
            "choose a 3D CT layer (a single-channel volume)."
        )
    rotate = np.asarray(layer.rotate)
    affine = layer_affine_ras(layer.scale, layer.translate, rotate)
    return data.transpose(2, 1, 0), affine


def source_order(data_zyx: np.ndarray, meta: dict[str, Any]) -> np.ndarray | None:
    """Layer data back in the source file's voxel order, or None if shapes do not match."""
    try:
        affine = np.asarray(meta["source_affine"], dtype=np.float64)
        shape = tuple(int(s) for s in meta["source_shape"])
    except (KeyError, TypeError, ValueError):
        return None
    lps = np.asarray(data_zyx).transpose(2, 1, 0)
    if sorted(lps.shape) != sorted(shape):
        return None
    back = apply_orientation(lps, ornt_transform(_LPS_ORNT, io_orientation(affine)))
    return back if back.shape == shape else None
