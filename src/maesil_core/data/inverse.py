"""Results on the model grid back onto the input's own voxel grid (orientation, spacing,
shape): :func:`invert_to_input` through MONAI's ``Invertd`` (any grid, floating point),
:func:`labels_to_input` for label maps by one nearest-neighbour gather (axis-aligned grids,
the label map's own dtype), :func:`to_input_grid` slab by slab for any grid, linear or nearest
(what ``invert_to_input`` gives, without its full-size float copy and sampling grid).

Both take the dict and the ``Compose`` of :func:`.transforms.inference_transforms`, whose
image MetaTensor recorded the spatial operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from .io import Volume
from .transforms import IMAGE_KEY


def invert_to_input(
    pred: Any,
    data: Mapping[Hashable, Any] | Compose | None = None,
    transform: Compose | Mapping[Hashable, Any] | None = None,
    *,
    orig_key: str = IMAGE_KEY,
    nearest: bool = False,
) -> MetaTensor:
    """Map ``pred`` (C, D, H, W) on the transformed grid back to the input voxel grid.

    ``data`` is the dict that ``transform`` (from :func:`inference_transforms`) returned;
    its ``orig_key`` MetaTensor carries the applied spatial operations. Also accepted:
    ``invert_to_input(pred, transform)`` when ``pred`` is that MetaTensor itself (or
    one carrying its ``applied_operations``), and ``invert_to_input(data, transform)``
    with the prediction in ``data["pred"]``. Returns a MetaTensor (C, X, Y, Z) in the
    file's own voxel order with the original affine (``nearest=True`` for label maps).
    Intensity scaling is not undone. Equivalent to ``monai.transforms.Invertd(keys="pred",
    transform=transform, orig_keys="image", nearest_interp=nearest)`` on
    ``{"pred": pred, "image": data["image"]}``.
    """
    if isinstance(data, Compose):  # invert_to_input(pred, transform[, data])
        data, transform = transform, data
    if not isinstance(transform, Compose):
        raise TypeError("invert_to_input needs the Compose that produced the data")
    if isinstance(pred, Mapping):
        data, pred = pred, pred["pred"]
    orig = pred if data is None else data[orig_key]  # type: ignore[index]
    if not isinstance(orig, MetaTensor) or not orig.applied_operations:
        raise TypeError(
            f"pass the dict returned by the transform (its {orig_key!r} MetaTensor records "
            "the operations to invert)"
        )
    pred_t = torch.as_tensor(pred).as_subclass(torch.Tensor)
    if pred_t.ndim == 3:
        pred_t = pred_t[None]
    if tuple(pred_t.shape[1:]) != tuple(orig.shape[1:]):
        raise ValueError(
            f"pred spatial shape {tuple(pred_t.shape[1:])} differs from the transformed "
            f"image {tuple(orig.shape[1:])}"
        )
    inverter = Invertd(
        keys="pred",
        transform=transform,
        orig_keys=orig_key,
        nearest_interp=nearest,
        to_tensor=True,
    )
    # Invertd silently skips plain tensors: give pred the image's metadata and operations
    pred_mt = MetaTensor(pred_t.detach().cpu(), meta=dict(orig.meta))  # meta holds the affine
    pred_mt.applied_operations = list(orig.applied_operations)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a skipped inversion must not pass
        return inverter({"pred": pred_mt, orig_key: orig})["pred"]


def labels_to_input(
    labels: np.ndarray, data: Mapping[Hashable, Any], transform: Compose
) -> np.ndarray:
    """A label map ``labels`` (D, H, W) on the transformed grid -> the input voxel grid
    (X, Y, Z) by nearest neighbour, in ``labels``' own dtype.

    When the two grids differ by flips, axis swaps, scaling and a shift only (every scan
    read without a tilted gantry), each input voxel takes the label at the nearest model
    voxel centre, gathered axis by axis: the output is the only full-size array made (100 MB
    in uint8 for a 512 x 512 x 400 CT, where :func:`invert_to_input` resamples in floating
    point). An oblique grid goes through :func:`invert_to_input`. Voxels outside the model
    grid are 0.
    """
    image = data[IMAGE_KEY]
    labels = np.asarray(labels)
    model_affine = np.asarray(torch.as_tensor(image.affine), dtype=np.float64)
    in_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
    in_shape = tuple(int(s) for s in np.asarray(image.meta["spatial_shape"]).ravel())
    m = np.linalg.inv(model_affine) @ in_affine  # input voxel -> model voxel
    lin = m[:3, :3]
    perm = np.argmax(np.abs(lin), axis=0)  # the model axis that input axis a runs along
    nonzero = np.abs(lin) > 1e-9 * np.abs(lin).max()
    if sorted(perm) != [0, 1, 2] or np.count_nonzero(nonzero) != 3:  # oblique
        pred = torch.from_numpy(labels[None].astype(np.float32))
        back = invert_to_input(pred, data, transform, nearest=True)
        return np.rint(np.asarray(back)[0]).astype(labels.dtype)
    padded = np.pad(labels, [(0, 1)] * 3)  # index n (outside) -> 0
    index = []
    for a in range(3):
        b = int(perm[a])
        coord = np.rint(lin[b, a] * np.arange(in_shape[a]) + m[b, 3]).astype(np.intp)
        coord[(coord < 0) | (coord >= labels.shape[b])] = labels.shape[b]
        index.append(coord)
    # model axes in the order of the input axes, then one gather: out[i, j, k]
    moved = padded.transpose([int(b) for b in perm])
    return moved[np.ix_(*index)]


def iter_input_slabs(
    model_array: np.ndarray,
    model_affine: np.ndarray,
    volume_affine: np.ndarray,
    shape: Sequence[int],
    *,
    nearest: bool = False,
    slab: int = 16,
) -> Iterator[tuple[slice, np.ndarray]]:
    """``model_array`` (D, H, W) on the model grid, resampled onto the input's voxel grid
    (``shape`` (X, Y, Z) with ``volume_affine``) one slab of ``slab`` slices at a time:
    yields ``(z slice, values (X, Y, slab))``.

    What :func:`invert_to_input` gives for an inference chain (orientation and spacing are
    both in the affines: model voxel -> world -> input voxel), without MONAI's full-size
    float32 copy and sampling grid (a 512 x 512 x 400 CT: 0.4 GB + 1.2 GB per array). Linear
    interpolation gives float32 slabs; ``nearest`` keeps ``model_array``'s dtype (labels).
    """
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(np.asarray(model_affine, np.float64)) @ np.asarray(volume_affine)
    rot, shift = matrix[:3, :3], matrix[:3, 3]
    src = np.asarray(model_array)
    if not nearest and src.dtype != np.float32:
        src = src.astype(np.float32)
    nx, ny, nz = (int(v) for v in shape)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        values = affine_transform(
            src,
            rot,
            offset=rot @ np.array([0.0, 0.0, z0]) + shift,
            output_shape=(nx, ny, z1 - z0),
            order=0 if nearest else 1,
            mode="nearest",
            output=src.dtype,
        )
        yield slice(z0, z1), values


def to_input_grid(
    model_array: np.ndarray,
    sample: Mapping[Hashable, Any],
    volume: Volume,
    *,
    nearest: bool = False,
    dtype: Any = None,
    convert: Any = None,
) -> np.ndarray:
    """``model_array`` (D, H, W) from the inference chain's ``sample`` (its ``image``
    MetaTensor's affine) on ``volume``'s own grid, built slab by slab into one array of
    ``dtype`` (default: float32, or the input's dtype with ``nearest``); ``convert(values,
    z)`` maps each slab first (e.g. to HU)."""
    affine = np.asarray(torch.as_tensor(sample[IMAGE_KEY].affine), np.float64)
    shape = volume.array.shape
    out = None
    for z, values in iter_input_slabs(model_array, affine, volume.affine, shape, nearest=nearest):
        if convert is not None:
            values = convert(values, z)
        if out is None:
            out = np.empty(shape, dtype=dtype or values.dtype)
        out[:, :, z] = values
    return out
