"""Finding CT files and feeding them to training.

- :func:`resolve_inputs` turns files, folders, globs, ``.txt`` lists and MSD
  ``dataset.json`` files into a list of volumes (a DICOM series folder counts as one).
- :func:`resolve_pairs` pairs images with label maps for fine-tuning.
- :func:`check_inputs` reads headers only, so a bad file fails before training starts.
- :func:`make_pretrain_loader` builds the MONAI dataset + DataLoader of superpatches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from monai.data import DataLoader as MonaiDataLoader
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from ..config import DataConfig
from ..errors import DataError
from .io import has_image_suffix, is_dicom_dir, is_dicom_file
from .transforms import IMAGE_KEY, pretrain_transforms, unwrap_data_error

#: name fragments that mark label files (skipped when a folder is scanned for images)
LABEL_MARKERS = ("label", "seg", "mask")

_NOTHING_FOUND = (
    "no CT files found in {where}; give .nii/.nii.gz files, DICOM folders, a .txt list "
    "or a dataset.json"
)


def _is_label_name(rel: Path) -> bool:
    return any(m in part.lower() for part in rel.parts for m in LABEL_MARKERS)


def _scan_folder(folder: Path, skip_labels: bool) -> list[Path]:
    """CT files under ``folder`` (recursive); each DICOM series folder counts as one."""
    if is_dicom_dir(folder):
        return [folder]
    found: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        rel = child.relative_to(folder)
        if skip_labels and _is_label_name(rel):
            continue
        if child.is_dir():
            found += _scan_folder(child, skip_labels)
        elif child.is_file() and has_image_suffix(child):
            found.append(child)
    return found


def _read_list(txt: Path) -> list[str]:
    entries = []
    for line in txt.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            p = Path(line).expanduser()
            entries.append(str(p if p.is_absolute() else txt.parent / p))
    return entries


def _read_dataset_json(path: Path, with_labels: bool = False) -> list[Any]:
    """MSD-style ``dataset.json``: ``training`` entries' images (and ``test`` images), read
    with MONAI's datalist loader (paths relative to the file's folder).

    With ``with_labels``, the ``training`` entries as ``{"image", "label"}`` dicts.
    """
    from monai.data import load_decathlon_datalist

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix the dataset file.") from exc
    if not isinstance(meta, dict) or not ({"training", "test"} & set(meta)):
        raise DataError(
            f"{path} is not an MSD-style dataset.json (no 'training' or 'test' list); "
            'write {"training": [{"image": "...", "label": "..."}], "test": ["..."]}.'
        )

    def entries(key: str) -> list[dict[str, Any]]:
        if not meta.get(key):
            return []
        try:
            items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(
                f"{path}: its {key!r} list is not MSD-style ({exc}); write each entry as "
                '{"image": "imagesTr/case.nii.gz", "label": "labelsTr/case.nii.gz"}.'
            ) from exc
        for item in items:
            if "image" not in item or (with_labels and "label" not in item):
                need = "'image' and 'label' for fine-tuning" if with_labels else "an 'image'"
                raise DataError(f"{path}: every {key!r} entry needs {need}.")
        return items

    training = entries("training")
    if with_labels:
        return [{"image": str(e["image"]), "label": str(e["label"])} for e in training]
    return [str(e["image"]) for e in training + entries("test")]


def _resolve_one(item: str | Path, skip_labels: bool, depth: int = 0) -> list[Path]:
    if depth > 5:
        raise DataError(f"{item}: lists nested too deeply; list image files directly.")
    text = str(item)
    path = Path(text).expanduser()
    if path.is_dir():
        found = _scan_folder(path, skip_labels)
        if not found:
            raise DataError(_NOTHING_FOUND.format(where=path))
        return found
    if path.is_file():
        low = path.name.lower()
        if low.endswith(".txt"):
            out: list[Path] = []
            for entry in _read_list(path):
                out += _resolve_one(entry, skip_labels, depth + 1)
            if not out:
                raise DataError(_NOTHING_FOUND.format(where=path))
            return out
        if low.endswith(".json"):
            out = []
            for entry in _read_dataset_json(path):
                out += _resolve_one(entry, False, depth + 1)
            if not out:
                raise DataError(_NOTHING_FOUND.format(where=path))
            return out
        if has_image_suffix(path):
            return [path]
        if is_dicom_file(path):
            return [path.parent]
        raise DataError(
            f"{path} is not a CT file; give .nii/.nii.gz/.nrrd files, DICOM folders, "
            "a .txt list or a dataset.json."
        )
    if any(c in text for c in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        out = []
        for m in matches:
            mp = Path(m)
            if mp.is_file() and not (has_image_suffix(mp) or is_dicom_file(mp)):
                continue
            if skip_labels and mp.is_file() and _is_label_name(Path(mp.name)):
                continue
            out += _resolve_one(mp, skip_labels, depth + 1)
        if not out:
            raise DataError(_NOTHING_FOUND.format(where=f"the pattern {text!r}"))
        return out
    raise DataError(f"{path} does not exist; check the path (or quote a glob pattern).")


def resolve_inputs(
    items: Sequence[str | Path] | str | Path,
    *,
    skip_labels: bool = True,
    follow_links: bool = True,
) -> list[str]:
    """Expand files, folders, globs, ``.txt`` lists and ``dataset.json`` into volume paths.

    Folders are scanned recursively for ``.nii/.nii.gz/.nrrd`` files and DICOM series
    (one entry per series folder); names containing label/seg/mask are skipped there
    (``skip_labels``). Returns absolute paths as strings, in order, without duplicates
    (two links to one file count once); with ``follow_links`` False the paths keep the
    names they were found under (pairing by name needs the link's name, not its target's).
    """
    if isinstance(items, (str, Path)):
        items = [items]
    if not items:
        raise DataError(_NOTHING_FOUND.format(where="the (empty) input list"))
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        for p in _resolve_one(item, skip_labels):
            s = str(Path(p).resolve())
            if s not in seen:
                seen.add(s)
                out.append(s if follow_links else os.path.abspath(p))
    return out


#: file stems that say "the image" / "the label map" of a case folder (ct.nii.gz, labels.nii.gz)
IMAGE_STEMS = ("ct", "image", "img", "imaging", "volume", "scan")
LABEL_STEMS = ("labels", "label", "seg", "segmentation", "mask", "labelmap")
#: name endings of label maps beside their image: case_seg, case_label(s), case_mask
_LABEL_SUFFIX = re.compile(r"[_\-.](seg|segmentation|labels?|mask|labelmap)$", re.IGNORECASE)
#: nnU-Net's channel suffix of images: imagesTr/case_0000.nii.gz <-> labelsTr/case.nii.gz
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def _stem(path: str | Path) -> str:
    from .io import strip_suffix

    return strip_suffix(Path(path).name)


def image_keys(path: str | Path) -> list[str]:
    """The case names an image file may go by, most specific first: ``case.nii.gz`` ->
    ``case``; ``case_0000.nii.gz`` -> ``case_0000``, then ``case`` (nnU-Net's channel
    suffix); ``case1/ct.nii.gz`` -> ``case1`` (a generic name takes its folder's)."""
    stem = _stem(path)
    if stem.lower() in IMAGE_STEMS:
        stem = Path(path).parent.name
    keys = [stem.lower()]
    bare = _CHANNEL_SUFFIX.sub("", stem).lower()
    return keys + [bare] if bare != keys[0] else keys


def label_key(path: str | Path) -> str:
    """The case name of a label map: ``case_seg`` / ``case_label(s)`` / ``case_mask`` ->
    ``case``; ``case1/labels.nii.gz`` -> ``case1``; ``case_labels/labels.nii.gz`` -> ``case``."""
    stem = _stem(path)
    if stem.lower() in LABEL_STEMS:
        stem = Path(path).parent.name
    return _LABEL_SUFFIX.sub("", stem).lower()


def _names(files: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def pair_by_name(images: Sequence[str], labels: Sequence[str]) -> list[tuple[str, str]] | None:
    """Each image with the label map of the same case name (:func:`image_keys`,
    :func:`label_key`); a label map in the image's own folder wins over one elsewhere.
    None when no name matches at all (the caller may then pair in order); DataError naming
    the files when only some match or a name is ambiguous."""
    by_key: dict[str, list[str]] = {}
    for lab in labels:
        by_key.setdefault(label_key(lab), []).append(lab)
    pairs, unpaired = [], []
    for img in images:
        found = next((by_key[k] for k in image_keys(img) if k in by_key), [])
        if len(found) > 1:  # several with that name: the one beside the image
            found = [lab for lab in found if Path(lab).parent == Path(img).parent] or found
        if len(found) > 1:
            raise DataError(
                f"{img} could be paired with several label maps ({_names(found)}); give the "
                "label maps as files in the order of the images, or a dataset.json."
            )
        if found:
            pairs.append((img, found[0]))
        else:
            unpaired.append(img)
    if not pairs:
        return None
    used = {lab for _, lab in pairs}
    spare = [lab for lab in labels if lab not in used]
    twice = sorted({lab for _, lab in pairs if sum(lab == b for _, b in pairs) > 1})
    if twice:
        raise DataError(
            f"the label map {twice[0]} matches several images by name; give the label maps as "
            "files in the order of the images, or a dataset.json."
        )
    if unpaired:
        hint = f" (label maps left over: {_names(spare)})" if spare else ""
        raise DataError(
            f"no label map found for {_names(unpaired)}{hint}: name each label map after its "
            "image (case.nii.gz <-> case_seg.nii.gz / case_label(s).nii.gz, ct.nii.gz <-> "
            "labels.nii.gz in one folder, nnU-Net case_0000.nii.gz <-> case.nii.gz), or give "
            "the label maps as files in the order of the images."
        )
    return pairs


def resolve_pairs(
    images: Sequence[str | Path] | str | Path,
    labels: Sequence[str | Path] | str | Path | None = None,
) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` for fine-tuning.

    Either ``images`` is a ``dataset.json`` (its ``training`` image/label entries) and
    ``labels`` is None, or both resolve like :func:`resolve_inputs` (label names kept for
    ``labels``, and files found among the images left out of them, so ``--images case/
    --labels case/`` works) and are paired by case name (:func:`pair_by_name`: ``ct`` /
    ``labels`` in one folder, ``case`` / ``case_seg`` or ``case_label(s)``, nnU-Net's
    ``case_0000`` / ``case``); when no name matches, in order (folders sorted by name), if
    the counts agree. Every pairing error names the files it found.
    """
    if isinstance(images, (str, Path)):
        images = [images]
    if labels is None:
        if len(images) == 1 and str(images[0]).lower().endswith(".json"):
            path = Path(images[0])
            if not path.is_file():
                raise DataError(f"{path} does not exist; check the path.")
            pairs = _read_dataset_json(path, with_labels=True)
            if not pairs:
                raise DataError(f"{path} has no 'training' image/label pairs.")
            for pair in pairs:
                for key in ("image", "label"):
                    if not Path(pair[key]).exists():
                        raise DataError(f"{pair[key]} (listed in {path}) does not exist.")
            return pairs
        raise DataError(
            "fine-tuning needs label maps: give labels (files/folder/.txt) or a dataset.json "
            "with image/label pairs."
        )
    image_files = resolve_inputs(images, follow_links=False)
    found_labels = resolve_inputs(labels, skip_labels=False, follow_links=False)
    is_image = {os.path.realpath(f) for f in image_files}
    label_files = [f for f in found_labels if os.path.realpath(f) not in is_image]
    if not label_files:
        raise DataError(
            f"no label maps found in {_names([str(x) for x in labels])}: only the images "
            f"{_names(image_files)}; name label maps labels.nii.gz, case_seg.nii.gz, ... or "
            "give them as files."
        )
    if len(image_files) == len(label_files) == 1:
        return [{"image": image_files[0], "label": label_files[0]}]
    pairs = pair_by_name(image_files, label_files)
    if pairs is None:
        if len(image_files) != len(label_files):
            raise DataError(
                f"found {len(image_files)} images ({_names(image_files)}) but "
                f"{len(label_files)} label maps ({_names(label_files)}), and no names that "
                "pair them; give one label map per image named after it (case_seg.nii.gz, "
                "labels.nii.gz beside ct.nii.gz), files in the same order, or a dataset.json."
            )
        pairs = list(zip(image_files, label_files))
    return [{"image": i, "label": lab} for i, lab in pairs]


def check_inputs(files: Sequence[str | Path]) -> list[str]:
    """Cheap header check of every file (no voxel data read): exists, readable, 3D.

    Raises a DataError naming the first bad file; returns the files as strings.
    NaN checks need the voxels: they happen in ``load_volume`` when each file is loaded.
    """
    import nibabel as nib

    out = []
    for f in files:
        p = Path(f)
        if not p.exists():
            raise DataError(f"{p} does not exist; check the path.")
        if p.is_dir():
            if not is_dicom_dir(p):
                raise DataError(
                    f"{p} is a folder without DICOM files; give .nii/.nii.gz files or a "
                    "DICOM series folder."
                )
        elif p.name.lower().endswith((".nii", ".nii.gz")):
            try:
                img = nib.load(str(p))
                shape = tuple(img.shape)
            except Exception as exc:
                raise DataError(
                    f"{p} is not a readable NIfTI file ({type(exc).__name__}); "
                    "re-copy or re-export it, or leave it out."
                ) from exc
            spatial = [s for s in shape[3:] if s != 1]
            if len(shape) < 3 or min(shape[:3]) < 2:
                raise DataError(f"{p} is a 2D image (shape {shape}); give 3D CT volumes.")
            if spatial:
                raise DataError(
                    f"{p} has shape {shape} (several channels or time points); give single "
                    "3D volumes."
                )
        elif not has_image_suffix(p):
            raise DataError(f"{p} is not a CT file; give .nii/.nii.gz/.nrrd or DICOM folders.")
        out.append(str(p))
    return out


def describe_scans(files: Sequence[str | Path], limit: int = 10) -> str:
    """What a run is about to train on, for the user: the number of scans and, for the
    first ``limit``, their shape and spacing from the headers (:func:`~.io.read_header`)::

        found 2 scans:
          abdomen_ct/ct.nii.gz   122 x 101 x 30   3.00 x 3.00 x 3.00 mm   NIfTI
          dicom_ct               512 x 512 x 20   0.98 x 0.98 x 2.00 mm   DICOM
    """
    from .io import read_header

    files = list(files)
    rows = []
    for f in files[:limit]:
        p = Path(f)
        name = p.name if p.is_dir() else f"{p.parent.name}/{p.name}"
        try:
            h = read_header(p)
        except DataError as exc:
            rows.append((name, "?", str(exc), ""))
            continue
        shape = " x ".join(str(v) for v in h.shape)
        spacing = " x ".join(f"{v:.2f}" for v in h.spacing) + " mm"
        rows.append((name, shape, spacing, h.kind))
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    n = len(files)
    lines = [f"found {n} scan{'s' if n != 1 else ''}:"]
    for name, shape, spacing, kind in rows:
        lines.append(
            f"  {name:<{widths[0]}}  {shape:>{widths[1]}}  {spacing:<{widths[2]}}  {kind}".rstrip()
        )
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)


def _cache_key(data_cfg: DataConfig, superpatch: Sequence[int]) -> str:
    """Hash of the settings that change the cached (deterministic) part of the chain."""
    spec = json.dumps(
        [
            data_cfg.spacing,
            data_cfg.window(),
            data_cfg.intensity,
            data_cfg.foreground_crop,
            list(superpatch),
            "pad-sentinel",  # padding is stored as PAD_SENTINEL; older caches padded with 0
        ],
        default=list,
    )
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


def _collate_trim(batch: list, batch_size: int) -> dict:
    """Flatten the per-volume crop lists, keep the first ``batch_size``, then
    ``list_data_collate``. Trimming before collating skips stacking crops that would be
    dropped (when the batch does not divide evenly into the volumes' crops)."""
    items = [i for b in batch for i in (b if isinstance(b, list) else [b])]
    return list_data_collate(items[:batch_size])


class _UnwrapDataErrors:
    """Dataset mixin: re-raise the DataError that MONAI wrapped in a RuntimeError."""

    def _transform(self, index):  # Dataset, CacheDataset, PersistentDataset
        try:
            return super()._transform(index)  # type: ignore[misc]
        except RuntimeError as exc:
            err = unwrap_data_error(exc)
            if err is exc:
                raise
            raise err from None

    def _load_cache_item(self, idx):  # CacheDataset, while filling the cache
        try:
            return super()._load_cache_item(idx)  # type: ignore[misc]
        except RuntimeError as exc:
            err = unwrap_data_error(exc)
            if err is exc:
                raise
            raise err from None


class EndlessSampler(Sampler[int]):
    """Indices forever: pass after pass over ``base``, calling ``base.set_epoch(pass)``
    before each pass when ``base`` has it (a ``DistributedSampler`` then shards every pass
    exactly as it shards an epoch: disjoint across ranks, reshuffled per pass).

    A DataLoader on it is iterated once and never ends, so its workers and prefetch
    queue run across passes: no drained queue and no worker re-synchronisation at every
    epoch boundary (with a handful of volumes an epoch is only a few batches). A batch may
    straddle two passes, so with fewer volumes than a batch needs a volume can appear twice
    in one batch (with different random crops).
    """

    def __init__(self, base: Sampler[int]):
        self.base = base
        self.epoch = 0  #: the pass now being drawn

    def __iter__(self) -> Iterator[int]:
        while True:
            if hasattr(self.base, "set_epoch"):
                self.base.set_epoch(self.epoch)
            got = False
            for index in self.base:
                got = True
                yield index
            if not got:
                raise DataError("the data loader is empty; give at least one volume.")
            self.epoch += 1


class _Dataset(_UnwrapDataErrors, Dataset):
    pass


class _CacheDataset(_UnwrapDataErrors, CacheDataset):
    pass


class _PersistentDataset(_UnwrapDataErrors, PersistentDataset):
    pass


def default_workers(device: torch.device | str | None = None) -> int:
    """Loader workers when ``DataConfig.num_workers`` is None, for training on ``device``.

    None on the CPU: workers would take cores from the model, and handing a superpatch over
    from a worker costs more CPU than cutting it (BENCHMARKS.md). On a GPU: the CPU cores this
    process may use (``os.sched_getaffinity``; shared among the ``LOCAL_WORLD_SIZE`` processes
    torchrun starts on this machine) less one for the training process itself, at most 16;
    none when that leaves fewer than two.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return 0 if per_process <= 2 else min(per_process - 1, 16)


def augment_on_device(data_cfg: DataConfig, device: torch.device | str | None = None) -> bool:
    """True when the crops are to be augmented on the training device
    (:class:`~maesil_core.data.batch_augment.BatchAugment`) rather than in the loader."""
    if not data_cfg.augment or data_cfg.augment_on == "loader":
        return False
    if data_cfg.augment_on == "device":
        return True
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device.type != "cpu"


def _safe_persistent_dataset(data, transform, folder: Path) -> _PersistentDataset:
    """MONAI's disk cache, read with ``torch.load(weights_only=True)`` only.

    A cache folder is user-writable, so a ``.pt`` planted there must not run code when a
    run reads it: with ``weights_only=True`` torch refuses anything but tensors and plain
    containers, and MONAI then deletes the file and recomputes it (tests/test_train.py
    plants one). MONAI 1.4 read the cache with ``weights_only=False`` and had no option to
    change it: with it, ``cache="disk"`` is refused.
    """
    import inspect

    if "weights_only" not in inspect.signature(PersistentDataset.__init__).parameters:
        import monai

        raise DataError(
            f"cache='disk' needs MONAI 1.5 or newer (MONAI {monai.__version__} unpickles its "
            "disk cache, which can run code planted in the cache folder): upgrade MONAI, or "
            "use cache='memory'."
        )
    return _PersistentDataset(data, transform, cache_dir=folder, weights_only=True)


def make_pretrain_loader(
    files: Sequence[str | Path],
    data_cfg: DataConfig,
    superpatch: Sequence[int],
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | Path | None = None,
    endless: bool = False,
    device: torch.device | str | None = None,
) -> DataLoader:
    """A DataLoader of superpatch batches ``{"image": (B, 1, D, H, W), "valid": (B, 1, D, H,
    W)}``: the image float32 in [0, 1], ``valid`` bool, False on padding (volumes smaller
    than the superpatch), which pretraining losses leave out.

    ``batch_size`` counts superpatches: each step loads ``ceil(batch_size /
    crops_per_volume)`` volumes, draws ``ceil(batch_size / volumes)`` crops from each (at
    most ``crops_per_volume``: only what the batch uses is cut and augmented) and keeps the
    first ``batch_size``. Batches are full unless there are fewer volumes (per rank)
    than a batch needs; then every epoch is one smaller batch.
    ``device`` is the training device: with ``data_cfg.num_workers`` None it chooses the
    worker count (:func:`default_workers`), and the crops are augmented here only when they
    are not to be augmented on the device (:func:`augment_on_device`).
    ``data_cfg.cache``: ``"memory"`` caches the deterministic part (load, RAS, spacing,
    intensity, foreground crop, pad) in RAM (CacheDataset), ``"disk"`` in ``cache_dir``
    (PersistentDataset, one subfolder per preprocessing setting, read with
    ``weights_only=True``: never unpickled), ``"none"`` recomputes.
    The memory cache is not copied per item: the crops are views into the cached volume
    (nothing between cropping and collating writes in place) and collating copies them.
    With ``world_size > 1`` a DistributedSampler shards the volumes; loop with
    :func:`infinite`, which calls ``set_epoch``.
    ``endless=True`` (what training uses): the loader never ends (an
    :class:`EndlessSampler` over the same random or distributed sampler), so workers and
    prefetching run on across epochs; batches are then always full, and ``len(loader)``
    is undefined (``loader.sampler.base`` has the per-pass length).
    """
    files = [str(f) for f in files]
    if not files:
        raise DataError(_NOTHING_FOUND.format(where="the input list"))
    if batch_size < 1:
        raise DataError("batch size must be at least 1.")
    crops = int(data_cfg.crops_per_volume)
    volumes_per_batch = max(1, math.ceil(batch_size / crops))
    transform = pretrain_transforms(
        data_cfg,
        superpatch,
        num_samples=math.ceil(batch_size / volumes_per_batch),
        augment=data_cfg.augment and not augment_on_device(data_cfg, device),
    )
    transform.set_random_state(seed=(seed + 1000 * rank) % (2**32))
    data = [{IMAGE_KEY: f} for f in files]
    if data_cfg.cache == "memory":
        # copy_cache=False: only RandSpatialCropSamplesd and EnsureTyped run on the cached
        # item; they return views and new dicts and write nothing in place, and the collate
        # function's stack copies the crops. (copy_cache=True deep-copied the whole volume
        # for every item.) tests/test_data.py checks the cache is left intact.
        dataset = _CacheDataset(data, transform, num_workers=None, progress=False, copy_cache=False)
    elif data_cfg.cache == "disk":
        root = cache_dir or data_cfg.cache_dir
        if root is None:
            raise DataError("cache='disk' needs a cache folder: pass cache_dir or set cache_dir.")
        folder = Path(root) / f"pretrain-{_cache_key(data_cfg, superpatch)}"
        folder.mkdir(parents=True, exist_ok=True)
        dataset = _safe_persistent_dataset(data, transform, folder)
    else:
        dataset = _Dataset(data, transform)

    per_rank = math.ceil(len(files) / world_size)
    drop_last = per_rank >= volumes_per_batch
    sampler: Sampler[int] | None = None
    generator = torch.Generator().manual_seed(seed + 1000 * rank)
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
    if endless:
        if sampler is None:
            order = torch.Generator().manual_seed(seed + 1000 * rank + 1)
            sampler = RandomSampler(dataset, generator=order)
        sampler = EndlessSampler(sampler)
    workers = default_workers(device) if data_cfg.num_workers is None else data_cfg.num_workers
    return MonaiDataLoader(
        dataset,
        batch_size=volumes_per_batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        collate_fn=partial(_collate_trim, batch_size=batch_size),
        generator=generator,
    )


def infinite(loader: DataLoader, sampler: Any = None) -> Iterator[Any]:
    """Loop over ``loader`` forever, calling ``sampler.set_epoch(epoch)`` each epoch.

    ``sampler`` defaults to the loader's own sampler when it has ``set_epoch``. A loader
    built with ``endless=True`` is iterated once (its :class:`EndlessSampler` moves the
    epochs on).
    """
    if sampler is None:
        sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EndlessSampler):
        yield from loader
        return
    epoch = 0
    while True:
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise DataError("the data loader is empty; give at least one volume.")
        epoch += 1
