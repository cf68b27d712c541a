"""Labelled data for segmentation: image / label pairs, the label set, cases on the model
grid and the random ROI crops fine-tuning trains on.

    pairs = resolve_labelled(["ct/"], ["labels/"])          # paths or Volumes, paired in order
    loaded = [load_pair(image, label, resample=False) for image, label in pairs]
    labelset = make_label_set([(lab.path, lab.array) for _, lab in loaded], classes=["liver"])
    cases = prepare_cases(loaded, labelset, cfg)            # (1, D, H, W) image + 0..K target
    batches = crop_batches(cases, roi, batch_size, crops_per_volume, seg, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Int3, RunConfig
from ..data.io import Volume, load_labels, load_volume
from ..data.labels import (
    LabelSet,
    find_label_names,
    from_classes,
    from_label_maps,
    read_mapping_file,
)
from ..errors import ConfigError, DataError
from ..progress import CancelFlag, cancel_fn, stop_fn
from .config import SegmentationConfig

# --------------------------------------------------------------------------- data


@dataclass
class Case:
    """One labelled volume on the model grid: image (1, D, H, W) in [0, 1], target 0..K."""

    name: str
    image: torch.Tensor
    target: torch.Tensor


def _as_list(items: Any) -> list[Any]:
    if items is None:
        return []
    if isinstance(items, (str, Path, Volume)):
        return [items]
    return list(items)


def resolve_labelled(
    images: Any, labels: Any, *, what: str = "training"
) -> list[tuple[str | Volume, str | Volume]]:
    """Image/label pairs from paths (files, folders, globs, lists, dataset.json) or Volumes."""
    from ..data.inputs import resolve_pairs

    imgs, labs = _as_list(images), _as_list(labels)
    if not imgs:
        raise DataError(f"no {what} images given.")
    if any(isinstance(v, Volume) for v in imgs + labs):
        if len(imgs) != len(labs):
            raise DataError(
                f"{len(imgs)} {what} images but {len(labs)} label maps; give one label map per image."
            )
        return list(zip(imgs, labs))
    pairs = resolve_pairs(imgs, labs or None)
    return [(p["image"], p["label"]) for p in pairs]


def load_pair(image: str | Volume, label: str | Volume, resample: bool) -> tuple[Volume, Volume]:
    """Read an image and its label map (paths or Volumes); DataError when their grids differ,
    unless ``resample`` puts the labels onto the image's grid by world coordinates."""
    img = image if isinstance(image, Volume) else load_volume(image)
    if isinstance(label, Volume):
        from ..data.io import geometry_mismatch, resample_labels_to

        problem = geometry_mismatch(label, img)
        if problem and not resample:
            raise DataError(
                f"labels {label.path} do not match image {img.path}: {problem}; use labels "
                "made on that image (or `resample_labels` to align them in world coordinates)."
            )
        if problem:
            label = Volume(resample_labels_to(label, img), img.affine.copy(), label.path, False)
        return img, label
    try:
        lab = load_labels(label, reference=img, resample=resample)
    except DataError as exc:
        msg = exc.template.replace("resample_labels_to() / resample=True", "`resample_labels`")
        raise DataError(msg, option="resample_labels") from exc
    return img, lab


def crop_volume(vol: Volume, box: Sequence[tuple[int | None, int | None]], tag: str = "") -> Volume:
    """A sub-volume ``vol.array[x0:x1, y0:y1, z0:z1]`` with its affine shifted to match, so it
    stays aligned in world coordinates (for slabs / crops of one scan as separate volumes)."""
    slices = tuple(slice(a, b) for a, b in box)
    array = np.ascontiguousarray(vol.array[slices])
    start = [s.indices(n)[0] for s, n in zip(slices, vol.array.shape)]
    affine = np.array(vol.affine, dtype=np.float64, copy=True)
    affine[:3, 3] = affine[:3, :3] @ np.asarray(start, float) + affine[:3, 3]
    path = f"{vol.path}{tag or '[' + ','.join(f'{a}:{b}' for a, b in box) + ']'}"
    return Volume(array=array, affine=affine, path=path, is_hu=vol.is_hu)


def label_names_for(label_paths: Sequence[Any], label_names: str | Path | dict | None):
    """``{id: name}`` from ``label_names`` (a label_names.json, or the dict read from one),
    else from the first one found beside the label maps; None when there is none."""
    from ..data.io import read_label_names

    if isinstance(label_names, dict):  # already read
        return label_names
    if label_names is not None:
        return read_label_names(label_names)
    for p in label_paths:
        if isinstance(p, (str, Path)):
            names = find_label_names(p)
            if names:
                return names
    return None


def make_label_set(
    label_maps: Sequence[tuple[str, np.ndarray]],
    *,
    classes: Sequence[str | int] | None = None,
    labels_map: str | Path | dict | None = None,
    source_names: dict[int, str] | None = None,
    cancel: CancelFlag = None,
) -> LabelSet:
    """The label set from ``classes`` or ``labels_map``, else every label present.

    Each map's values are found once, slab by slab
    (:func:`~maesil_core.data.slabs.label_values`), ``cancel`` checked between slabs."""
    from ..data.labels import from_mapping
    from ..data.slabs import label_values

    stop = stop_fn(cancel)
    label_maps = [(name, label_values(arr, stop)) for name, arr in label_maps]

    if classes and labels_map:
        raise ConfigError("give either `classes` or `labels_map`, not both.", option="classes")
    if labels_map is not None:
        if isinstance(labels_map, dict):
            labelset = from_mapping(labels_map, source_names)
        else:
            labelset = read_mapping_file(labels_map, source_names)
    elif classes:
        labelset = from_classes(list(classes), source_names)
    else:
        labelset = from_label_maps([a for _, a in label_maps], source_names)
    labelset.check_present(label_maps)
    for name, arr in label_maps:
        values = {int(v) for v in np.unique(arr) if v > 0}
        unknown = sorted(values - set(source_names)) if source_names else []
        if unknown and classes is None and labels_map is None:
            raise DataError(
                f"{name} holds label ids {unknown[:5]} that the label names do not list; "
                "select classes with `classes` or `labels_map`."
            )
    return labelset


def prepare_cases(
    pairs: Sequence[tuple[Volume, Volume]],
    labelset: LabelSet,
    cfg: RunConfig,
    cancel: CancelFlag = None,
) -> list[Case]:
    """Resample/normalise each pair like pretraining, labels mapped to 0..K (nearest).

    ``cancel``: checked between pairs, between the slabs of each label look-up and
    between the loading steps of each.
    """
    from ..data.transforms import inference_transforms

    is_cancelled = cancel_fn(cancel)
    stop = stop_fn(cancel)
    transform = inference_transforms(cfg.data, cancel=is_cancelled)
    cases = []
    for img, lab in pairs:
        stop()
        index = labelset.to_index(lab.array, dtype=np.int32, check=stop)  # slab by slab
        target = Volume(index, img.affine, lab.path, False)
        out = transform({"image": img, "label": target})
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
        tgt = torch.as_tensor(out["label"]).as_subclass(torch.Tensor).round().long()
        cases.append(Case(img.name if img.path else "volume", image.contiguous(), tgt.contiguous()))
    return cases


def pad_with_air(case: Case, roi: Int3, margin: float) -> Case:
    """``case`` with ``margin`` x the ROI of air (0, label background) added on both sides of
    the two in-plane axes (the model grid is RAS: D = right-left, H = anterior-posterior),
    so training crops at the body's edge see the air around it as whole scans show it (a
    512 x 512 DICOM series is two thirds air); head-feet is left as it is (a scan ends
    inside the body)."""
    if margin <= 0:
        return case
    pd, ph = (int(round(margin * r)) for r in roi[:2])
    pad = (0, 0, ph, ph, pd, pd)  # last axis first: W, H, D
    image = torch.nn.functional.pad(case.image, pad, value=0.0)  # (1, D + 2pd, H + 2ph, W)
    target = torch.nn.functional.pad(case.target, pad, value=0)
    return Case(case.name, image, target)


def crop_batches(
    cases: Sequence[Case],
    roi: Int3,
    batch_size: int,
    crops_per_volume: int,
    seg: SegmentationConfig,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches ``{"image": (B,1,*roi) float, "label": (B,1,*roi) long}`` of random crops,
    ``pos_weight : neg_weight`` of them centred on a labelled voxel (MONAI RandCropByPosNegLabeld),
    from the cases padded with ``seg.air_margin`` of air in-plane (:func:`pad_with_air`).
    Where the labelled and the background voxels are is found once per case (MONAI
    FgBgToIndicesd), not at every crop."""
    from monai.transforms import FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd

    crops = max(1, int(crops_per_volume))
    pad = SpatialPadd(("image", "label"), spatial_size=roi, mode="constant", value=0)
    indices = FgBgToIndicesd("label")
    prepared = []
    for case in cases:
        case = pad_with_air(case, roi, seg.air_margin)
        prepared.append(indices(pad({"image": case.image, "label": case.target})))
    crop = RandCropByPosNegLabeld(
        ("image", "label"),
        label_key="label",
        spatial_size=roi,
        pos=seg.pos_weight,
        neg=seg.neg_weight,
        num_samples=crops,
        fg_indices_key="label_fg_indices",
        bg_indices_key="label_bg_indices",
    )
    crop.set_random_state(seed=seed % 2**32)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    pending: list[dict[str, torch.Tensor]] = []
    while True:
        while len(pending) < batch_size:
            if not order:
                order = list(rng.permutation(len(prepared)))
            for sample in crop(prepared[order.pop()]):
                pending.append(
                    {
                        "image": torch.as_tensor(sample["image"]).as_subclass(torch.Tensor),
                        "label": torch.as_tensor(sample["label"]).as_subclass(torch.Tensor),
                    }
                )
        take, pending = pending[:batch_size], pending[batch_size:]
        yield {
            "image": torch.stack([t["image"] for t in take]).float(),
            "label": torch.stack([t["label"] for t in take]).long(),
        }


def is_stored_labelset(d: dict) -> bool:
    """True for a :meth:`LabelSet.to_dict` (what a checkpoint stores), not a mapping file."""
    return all(isinstance(c, dict) and "source_ids" in c for c in d["classes"])


def describe_source(item: Any) -> str:
    """A path or Volume as the checkpoint records where it trained."""
    return item.path if isinstance(item, Volume) else str(item)
