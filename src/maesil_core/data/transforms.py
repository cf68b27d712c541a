"""MONAI dictionary transforms on keys ``"image"`` (and optionally ``"label"``).

Chain (see :func:`load_transforms` / :func:`pretrain_transforms`)::

    path -> LoadVolumed -> Orientationd(RAS) -> Spacingd -> IntensityToUnitd
         [-> CropForegroundd -> SpatialPadd -> RandSpatialCropSamplesd -> SplitPaddingd
          -> RandFlipd x 3 -> RandRotate90d -> RandAdjustContrastd -> EnsureTyped]

After loading, ``image`` is a MONAI ``MetaTensor`` ``(1, X, Y, Z)`` whose ``affine`` is RAS mm;
after ``Orientationd("RAS")`` the spatial axes are the ``(D, H, W)`` of ``config.py``.
Spatial transforms record themselves on the MetaTensor, so :mod:`.inverse` can put a
result computed on the transformed grid back onto the input's voxel grid (orientation,
spacing, shape).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropSamplesd,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacingd,
    SpatialPadd,
    Transform,
)

from ..config import DataConfig
from ..errors import Cancelled, DataError
from .io import HU_MIN_THRESHOLD, Volume, load_labels, load_volume
from .slabs import c_contiguous

IMAGE_KEY = "image"
LABEL_KEY = "label"
#: (1, D, H, W) bool: True on voxels of the scan, False on padding added to reach the superpatch
VALID_KEY = "valid"

#: what pretraining pads with before cropping: outside [0, 1], so padding stays recognisable
#: after the random crop (:class:`SplitPaddingd` turns it into ``VALID_KEY`` and zeros)
PAD_SENTINEL = -1.0

#: voxels above this (after mapping to [0, 1]) count as foreground for CropForegroundd
FOREGROUND_THRESHOLD = 0.02

#: percentiles mapped to 0 and 1 by intensity="percentile"
PERCENTILES = (0.5, 99.5)


def volume_to_metatensor(vol: Volume, check: Callable[[], Any] | None = None) -> MetaTensor:
    """``Volume`` -> channel-first ``MetaTensor`` (1, X, Y, Z) with RAS affine and metadata.

    ``check`` is called between the slabs of a transposing copy (see :func:`c_order`)."""
    affine = torch.as_tensor(np.asarray(vol.affine), dtype=torch.float64)
    meta = {
        "filename_or_obj": vol.path,
        "original_affine": np.asarray(vol.affine, dtype=np.float64),
        "spatial_shape": np.asarray(vol.array.shape),
        "original_channel_dim": "no_channel",
        "space": "RAS",
        "is_hu": bool(vol.is_hu),
    }
    array = c_order(vol.array, check)
    return MetaTensor(torch.from_numpy(array[None]), affine=affine, meta=meta)


def c_order(array: np.ndarray, check: Callable[[], Any] | None = None) -> np.ndarray:
    """``array`` C-contiguous in its own dtype, a transposed volume copied slab by slab with
    ``check()`` between slabs (it raises to stop: :class:`StopIfCancelled`); see
    :func:`.slabs.c_contiguous`."""
    return c_contiguous(array, check=check)


class LoadVolumed(MapTransform):
    """Load ``data[key]`` (a path, a :class:`Volume` or a MetaTensor) as a MetaTensor.

    Uses :func:`~maesil_core.data.io.load_volume` (NIfTI, NRRD, DICOM series folders), so
    every bad input (missing, corrupt, 2D, NaN voxels) raises a DataError naming the file.
    Keys in ``label_keys`` are read with :func:`load_labels` (integer maps).
    We wrap our reader rather than MONAI ``LoadImaged``: MONAI's ``PydicomReader`` does
    read the shared DICOM series, but this way NIfTI, NRRD and DICOM share one code path
    with one set of error messages and the HU check.
    """

    def __init__(
        self,
        keys: KeysCollection = (IMAGE_KEY, LABEL_KEY),
        label_keys: Sequence[str] = (LABEL_KEY,),
        allow_missing_keys: bool = True,
        cancel: Any = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = set(label_keys)
        #: checked while a transposed volume is copied (None: never stops)
        self.stop = StopIfCancelled(cancel) if cancel is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                continue
            if isinstance(value, Volume):
                vol = value
                integer = np.issubdtype(np.asarray(vol.array[:0]).dtype, np.integer)
                if key not in self.label_keys and not integer and not np.isfinite(vol.array).all():
                    n = int((~np.isfinite(vol.array)).sum())
                    raise DataError(
                        f"{vol.path} contains {n} NaN/infinite voxels; replace them "
                        "(e.g. with -1024) or leave the file out."
                    )
            elif key in self.label_keys:
                vol = load_labels(value)
            else:
                vol = load_volume(value, check=self._check)
            d[key] = volume_to_metatensor(vol, self._check)
        return d

    def _check(self) -> None:
        if self.stop is not None:
            self.stop(None)


class CheckFinited(MapTransform):
    """Raise a DataError naming the file if ``data[key]`` has NaN or infinite voxels."""

    def __init__(self, keys: KeysCollection = IMAGE_KEY, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", f"input {key!r}")
                raise DataError(
                    f"{name} contains {bad} NaN/infinite voxels; replace them "
                    "(e.g. with -1024) or leave the file out."
                )
        return d


class IntensityToUnitd(MapTransform):
    """Map CT intensities to [0, 1] following ``DataConfig.intensity``.

    ``"hu"``: clip ``hu_window`` (low..high HU) to [0, 1] (MONAI ``ScaleIntensityRange``).
    ``"percentile"``: the 0.5..99.5 percentiles to [0, 1], clipped
    (``ScaleIntensityRangePercentiles``). ``"auto"``: ``"hu"`` when the volume's minimum
    is below -500, otherwise ``"percentile"`` with a one-time warning per file.
    """

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        intensity: str = "auto",
        window: tuple[float, float] = (-175.0, 250.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if intensity not in ("auto", "hu", "percentile"):
            raise DataError(f"intensity must be auto, hu or percentile, got {intensity!r}.")
        self.intensity = intensity
        low, high = (float(v) for v in window)
        self.hu = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        self.percentile = ScaleIntensityRangePercentiles(
            lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
        )
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, data_cfg: DataConfig, keys: KeysCollection = IMAGE_KEY):
        return cls(keys, intensity=data_cfg.intensity, window=data_cfg.window())

    def mode_for(self, image: Any) -> str:
        """``"hu"`` or ``"percentile"`` for this image (resolving ``"auto"``)."""
        if self.intensity != "auto":
            return self.intensity
        if float(torch.as_tensor(image).min()) < HU_MIN_THRESHOLD:
            return "hu"
        name = str(getattr(image, "meta", {}).get("filename_or_obj", "input"))
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"{name} does not look like CT in Hounsfield units (no values below "
                f"{HU_MIN_THRESHOLD:g}); scaling its {PERCENTILES[0]}..{PERCENTILES[1]} "
                "percentiles to [0, 1] instead (--intensity hu or percentile to choose).",
                UserWarning,
                stacklevel=2,
            )
        return "percentile"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            mode = self.mode_for(image)
            out = self.hu(image) if mode == "hu" else self.percentile(image)
            if isinstance(out, MetaTensor):
                out.meta["intensity"] = mode
            d[key] = out
        return d


class SplitPaddingd(MapTransform):
    """Split an image padded with :data:`PAD_SENTINEL` into the image (padding set to 0,
    the value of air) and ``data["valid"]`` (1, D, H, W) bool, False on padding.

    Pretraining losses skip the padded voxels: a volume smaller than the superpatch would
    otherwise fill most of the loss with constant padding (a model learns to predict it
    too dark). Never writes in place: the crops it receives are views into a cache. bool
    rather than float: a quarter of the bytes to collate and hand over from workers.
    """

    def __init__(self, key: str = IMAGE_KEY, valid_key: str = VALID_KEY) -> None:
        super().__init__(key)
        self.valid_key = valid_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).as_subclass(torch.Tensor)  # no metadata overhead
            valid = image > 0.5 * PAD_SENTINEL
            if bool(valid.all()):  # the common case: keep the crop a view, no copy
                d[self.valid_key] = torch.ones((), dtype=torch.bool).expand(image.shape)
                continue
            d[self.valid_key] = valid
            d[key] = image.clamp(min=0.0)  # the sentinel -> 0; the scan is already >= 0
        return d


def unwrap_data_error(exc: BaseException) -> BaseException:
    """The DataError (or Cancelled) behind MONAI's ``RuntimeError("applying transform ...")``
    wrappers, else ``exc`` itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (DataError, Cancelled)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


class StopIfCancelled(Transform):
    """A step between the long steps of a loading chain: raises
    :class:`~maesil_core.errors.Cancelled` once ``cancel`` (an Event or a callable) is set, so
    a 512 x 512 x 400 CT being loaded stops within one step. A deterministic MONAI
    ``Transform`` (a plain callable would end what ``CacheDataset`` caches) and not an
    invertible one (:func:`invert_to_input` passes over it)."""

    def __init__(self, cancel: Any) -> None:
        self.is_cancelled: Callable[[], bool] = getattr(cancel, "is_set", cancel)

    def __call__(self, data: Any) -> Any:
        if self.is_cancelled():
            raise Cancelled()
        return data

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker process gets a copy that never stops: an Event does not pickle,
        # and cancelling is the main process's business (it stops asking for batches)
        return {"is_cancelled": _never}


def _never() -> bool:
    return False


class DataCompose(Compose):
    """MONAI ``Compose`` that lets our DataError and Cancelled through unwrapped (MONAI wraps
    every exception raised inside a transform in a RuntimeError)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as exc:
            err = unwrap_data_error(exc)
            if err is exc:
                raise
            raise err from None


def load_transforms(data_cfg: DataConfig, cancel: Any = None) -> list:
    """Deterministic loading chain: load, RAS, resample to ``data_cfg.spacing``, to [0, 1].

    Works on ``{"image": path}`` and ``{"image": path, "label": path}`` (a path may also be
    a :class:`Volume` already in memory); labels use nearest interpolation and are not
    intensity-scaled (they come out as float32 MetaTensors holding integer ids).
    Resampling computes in float32 (MONAI's default float64 doubled the largest copy of a
    full-size CT, 800 MB for 512 x 512 x 400 voxels). With ``cancel`` (an Event or a
    callable) the chain stops between its steps once it is set (:class:`StopIfCancelled`):
    each key is reoriented and resampled by a transform of its own, a check after each.
    Output ``image``: MetaTensor (1, D, H, W) in [0, 1].
    """
    keys = (IMAGE_KEY, LABEL_KEY)
    stop = [StopIfCancelled(cancel)] if cancel is not None else []
    chain: list = [*stop, LoadVolumed(keys, cancel=cancel), *stop]
    # one key per transform, a check after each: a 512 x 512 x 400 CT and its labels are
    # two whole-volume steps each, so a cancel waits for one of them, not for both
    for key in keys:
        chain += [Orientationd(key, axcodes="RAS", labels=None, allow_missing_keys=True), *stop]
    if data_cfg.spacing is not None:
        for key, mode in zip(keys, ("bilinear", "nearest")):
            spacing = Spacingd(
                key,
                pixdim=tuple(float(s) for s in data_cfg.spacing),
                mode=mode,
                dtype=torch.float32,
                allow_missing_keys=True,
            )
            chain += [spacing, *stop]
    chain.append(IntensityToUnitd.from_config(data_cfg))
    return chain


def _foreground(x: Any) -> Any:
    return x > FOREGROUND_THRESHOLD


def pretrain_transforms(
    data_cfg: DataConfig,
    superpatch: Sequence[int],
    num_samples: int | None = None,
    augment: bool | None = None,
    cancel: Any = None,
) -> Compose:
    """Load, crop the body, pad to ``superpatch``, draw ``num_samples`` (default
    ``crops_per_volume``) random crops and (``augment``, default ``data_cfg.augment``) flip,
    turn and contrast-jitter each.

    Each call returns a list of ``num_samples`` dicts ``{"image": (1, D, H, W),
    "valid": (1, D, H, W)}`` (torch tensors, metadata dropped) with ``(D, H, W) ==
    superpatch``: ``image`` float32 in [0, 1] with padding at 0, ``valid`` bool, False where
    padded.
    """
    roi = tuple(int(s) for s in superpatch)
    chain = list(load_transforms(data_cfg, cancel))
    if data_cfg.foreground_crop:
        chain.append(
            CropForegroundd(
                IMAGE_KEY,
                source_key=IMAGE_KEY,
                select_fn=_foreground,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    chain += [
        SpatialPadd(IMAGE_KEY, spatial_size=roi, mode="constant", value=PAD_SENTINEL),
        RandSpatialCropSamplesd(
            IMAGE_KEY,
            roi_size=roi,
            num_samples=int(num_samples or data_cfg.crops_per_volume),
            random_size=False,
        ),
        SplitPaddingd(IMAGE_KEY),
    ]
    if data_cfg.augment if augment is None else augment:
        chain += augment_transforms(roi)
    chain += [
        EnsureTyped(IMAGE_KEY, dtype=torch.float32, track_meta=False),
        EnsureTyped(VALID_KEY, dtype=torch.bool, track_meta=False),
    ]
    return DataCompose(chain)


def augment_transforms(roi: Sequence[int]) -> list:
    """Random flips along each axis, 90-degree turns in the axial plane (when the crop is
    square there) and a gamma contrast jitter (0.8..1.25; the crop's darkest and brightest
    values, air and bone, stay where they are), each with probability 1/2,
    as in the MONAI pretraining recipes (e.g. MIM-Med3D, Swin UNETR). Flips and turns move
    ``image`` and ``valid`` together."""
    keys = (IMAGE_KEY, VALID_KEY)
    chain: list = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if roi[0] == roi[1]:  # R-L x A-P plane; a turn of a non-square crop changes its shape
        chain.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    chain.append(RandAdjustContrastd(IMAGE_KEY, prob=0.5, gamma=(0.8, 1.25)))
    return chain


def inference_transforms(data_cfg: DataConfig, cancel: Any = None) -> Compose:
    """The deterministic loading chain only, so results can be inverted to the input grid.

    ``data = inference_transforms(cfg)({"image": path})``; ``data["image"]`` is a
    MetaTensor (1, D, H, W) in RAS at ``cfg.spacing``; see :func:`.inverse.invert_to_input`.
    ``cancel``: see :func:`load_transforms`.
    """
    return DataCompose(load_transforms(data_cfg, cancel))
