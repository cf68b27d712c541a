"""Feeding CT to pretraining: :func:`make_pretrain_loader` builds the MONAI dataset +
DataLoader of superpatches (cached, endless, one stream per rank); which files are read is
:mod:`.inputs`' job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from .inputs import NOTHING_FOUND
from .transforms import IMAGE_KEY, pretrain_transforms, unwrap_data_error


#: name fragments that mark label files (skipped when a folder is scanned for images)
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
    cancel: Any = None,
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
    ``cancel`` (an Event or a callable): filling the memory cache stops between the loading
    steps of a volume once it is set (:class:`~maesil_core.errors.Cancelled`).
    """
    files = [str(f) for f in files]
    if not files:
        raise DataError(NOTHING_FOUND.format(where="the input list"))
    if batch_size < 1:
        raise DataError("batch size must be at least 1.")
    crops = int(data_cfg.crops_per_volume)
    volumes_per_batch = max(1, math.ceil(batch_size / crops))
    transform = pretrain_transforms(
        data_cfg,
        superpatch,
        num_samples=math.ceil(batch_size / volumes_per_batch),
        augment=data_cfg.augment and not augment_on_device(data_cfg, device),
        cancel=cancel,
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
