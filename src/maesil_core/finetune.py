"""Fine-tune a pretrained encoder into a 3D organ segmenter; segment and evaluate whole CTs.

    from maesil_core import finetune as ft

    result = ft.finetune(["ct.nii.gz"], ["labels.nii.gz"], "runs/seg",
                         pretrained="runs/pretrain", classes=["liver", "spleen"])
    seg = ft.segment("runs/seg", "new_ct.nii.gz")
    seg.save("new_ct_seg.nii.gz")                # + new_ct_seg.json {id: name}
    report = ft.evaluate("runs/seg", ["ct2.nii.gz"], ["labels2.nii.gz"])

Training runs through :func:`maesil_core.train.fit` (the pretraining loop: progress,
cancel, bf16, checkpoints, resume, DDP) with ``kind="segmentation"``: the loss is MONAI's
Dice + cross-entropy on ROI crops drawn around the labels, validation is the per-class Dice
of whole validation volumes (sliding window), and the best one is kept as
``RUN_DIR/best.safetensors``. A segmentation checkpoint carries everything inference needs:
the encoder/decoder architecture, the ROI size, the spacing and HU window, and the label set
(class ids, names, and which source labels they were made from).

Inference (:func:`segment`) resamples the CT like training, runs MONAI's
``sliding_window_inference`` (windows batched on the compute device, the whole volume and the
blended logits kept on the CPU), takes the argmax and maps it back onto the input's own voxel
grid (orientation, spacing, shape) by MONAI's inverse transforms, nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint, load_weights, resolve_checkpoint
from .config import Int3, ModelConfig, RunConfig, as_int3, preset
from .data.io import Volume, load_labels, load_volume, save_volume, strip_suffix
from .data.labels import (
    LabelSet,
    find_label_names,
    from_classes,
    from_label_maps,
    read_mapping_file,
)
from .errors import Cancelled, CheckpointError, ConfigError, DataError
from .models.segmenter import UNETRSegmenter, architecture_mismatch, make_segmenter
from .train import FitResult, fit
from .train import distributed as D

ProgressFn = Callable[[dict[str, Any]], None]
CancelFlag = Callable[[], bool] | threading.Event | None

KIND = "segmentation"


@dataclass
class SegmentationConfig:
    """Fine-tuning and inference settings beyond the RunConfig (saved in the checkpoint)."""

    roi: Int3 | None = None  #: training crop / inference window (voxels); None: the superpatch
    feature_size: int = 16  #: decoder width at full resolution (UNETR's feature_size)
    layers: list[int] | None = None  #: encoder blocks feeding the decoder; None: evenly spaced
    norm: str = "instance"  #: decoder normalisation (MONAI norm name)
    freeze_encoder: bool = False  #: train the decoder only
    layer_decay: float = 1.0  #: layer-wise lr decay (< 1 lowers the lr of early blocks)
    pos_weight: float = 2.0  #: crops centred on a labelled voxel : crops centred anywhere
    neg_weight: float = 1.0
    eval_every: int | None = None  #: steps between validations (None: ~10 per run)
    overlap: float = 0.25  #: sliding-window overlap at inference and validation
    blend: str = "gaussian"  #: "gaussian" or "constant" window blending
    sw_batch_size: int = 4  #: windows per forward pass at inference
    #: keep only each class's largest connected component at inference and validation
    #: (MONAI KeepLargestConnectedComponent): removes stray voxels, but also the second part of
    #: a class that has two (e.g. "kidneys" = left + right), hence off by default
    largest_component: bool = False

    def __post_init__(self) -> None:
        if self.roi is not None:
            self.roi = as_int3(self.roi, "roi")

    def validate(self, cfg: RunConfig) -> SegmentationConfig:
        roi = self.roi_for(cfg)
        if any(r % p for r, p in zip(roi, cfg.model.patch)):
            raise ConfigError(
                f"ROI {list(roi)} is not a multiple of the patch {list(cfg.model.patch)}."
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}.")
        if self.blend not in ("gaussian", "constant"):
            raise ConfigError(f"blend must be gaussian or constant, got {self.blend!r}.")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer decay must be in (0, 1], got {self.layer_decay}.")
        if self.feature_size < 1 or self.sw_batch_size < 1:
            raise ConfigError("feature_size and sw_batch_size must be positive.")
        return self

    def roi_for(self, cfg: RunConfig) -> Int3:
        return tuple(self.roi) if self.roi else tuple(cfg.model.superpatch)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roi"] = list(self.roi) if self.roi else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _cancel_fn(cancel: CancelFlag) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


# --------------------------------------------------------------------------- model


def build_segmenter(cfg: RunConfig, seg: SegmentationConfig, num_classes: int) -> torch.nn.Module:
    """UNETR on the ViT encoder, or the conv segmenter for ae / vae / vq-vae configs."""
    model = make_segmenter(
        cfg.model,
        num_classes,
        feature_size=seg.feature_size,
        layers=seg.layers,
        norm_name=seg.norm,
    )
    if seg.freeze_encoder:
        model.freeze_encoder(True)
    if seg.layer_decay < 1:
        model.param_lr_scale = model.lr_scales(seg.layer_decay)
    return model


def load_pretrained_encoder(
    model: UNETRSegmenter, pretrained: str | Path | Checkpoint
) -> Checkpoint:
    """Copy a pretraining checkpoint's encoder into ``model``; CheckpointError if it differs."""
    ckpt = pretrained if isinstance(pretrained, Checkpoint) else load_checkpoint(pretrained)
    check_same_encoder(ckpt, model.cfg)
    model.load_encoder(ckpt.state_dict, str(ckpt.path))
    return ckpt


def check_same_encoder(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """CheckpointError naming what differs when ``ckpt``'s encoder is not the one ``cfg`` builds."""
    problem = architecture_mismatch(ckpt.config.model, cfg)
    if problem:
        raise CheckpointError(
            f"{ckpt.path} has another encoder than this segmenter ({problem}; checkpoint vs "
            "segmenter): fine-tune with the pretrained run's preset/config, or leave "
            "--preset out to take the architecture from the checkpoint."
        )


def resolve_segmentation_checkpoint(path: str | Path) -> Path:
    """A run directory -> its ``best.safetensors`` if there is one, else its newest checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "best.safetensors").is_file() and (p / "best.json").is_file():
        return p / "best.safetensors"
    return resolve_checkpoint(p)


def load_segmenter(
    checkpoint: str | Path,
) -> tuple[UNETRSegmenter, RunConfig, SegmentationConfig, LabelSet, Checkpoint]:
    """Rebuild a fine-tuned segmenter (eval mode, CPU) with its configs and label set."""
    path = resolve_segmentation_checkpoint(checkpoint)
    try:
        ckpt = load_checkpoint(path, kind=KIND)
    except CheckpointError as exc:
        if "checkpoint is needed" in str(exc):
            raise CheckpointError(
                f"{path} is a {_kind_of(path)} checkpoint, not a segmentation model; fine-tune "
                "it first: maesil finetune --pretrained ... --images ... --labels ... --out RUN"
            ) from exc
        raise
    extra = ckpt.meta.get("extra", {})
    if "labels" not in extra or "segmentation" not in extra:
        raise CheckpointError(f"{path} lacks its label set / segmentation settings.")
    cfg = ckpt.config
    seg = SegmentationConfig.from_dict(extra["segmentation"])
    labels = LabelSet.from_dict(extra["labels"])
    model = make_segmenter(
        cfg.model, len(labels), feature_size=seg.feature_size, layers=seg.layers, norm_name=seg.norm
    )
    load_weights(model, ckpt.state_dict, str(path))
    return model.eval(), cfg, seg, labels, ckpt


def _kind_of(path: Path) -> str:
    from .checkpoint import read_meta

    meta = read_meta(path)
    return f"{meta.get('kind', 'pretrain')} ({meta.get('method')})"


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
    from .data.datasets import resolve_pairs

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


def _load_pair(image: str | Volume, label: str | Volume, resample: bool) -> tuple[Volume, Volume]:
    img = image if isinstance(image, Volume) else load_volume(image)
    if isinstance(label, Volume):
        from .data.io import geometry_mismatch, resample_labels_to

        problem = geometry_mismatch(label, img)
        if problem and not resample:
            raise DataError(
                f"labels {label.path} do not match image {img.path}: {problem}; use labels "
                "made on that image (or --resample-labels to align them in world coordinates)."
            )
        if problem:
            label = Volume(resample_labels_to(label, img), img.affine.copy(), label.path, False)
        return img, label
    try:
        lab = load_labels(label, reference=img, resample=resample)
    except DataError as exc:
        msg = str(exc).replace("resample_labels_to() / resample=True", "--resample-labels")
        raise DataError(msg) from exc
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


def _label_names_for(label_paths: Sequence[Any], label_names: str | Path | None):
    from .data.io import read_label_names

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
) -> LabelSet:
    """The label set from ``--classes`` or ``--labels-map``, else every label present."""
    from .data.labels import from_mapping

    if classes and labels_map:
        raise ConfigError("give either --classes or --labels-map, not both.")
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
                "select classes with --classes or --labels-map."
            )
    return labelset


def prepare_cases(
    pairs: Sequence[tuple[Volume, Volume]], labelset: LabelSet, cfg: RunConfig
) -> list[Case]:
    """Resample/normalise each pair like pretraining, labels mapped to 0..K (nearest)."""
    from .data.transforms import inference_transforms

    transform = inference_transforms(cfg.data)
    cases = []
    for img, lab in pairs:
        target = Volume(labelset.to_index(lab.array).astype(np.int32), img.affine, lab.path, False)
        out = transform({"image": img, "label": target})
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
        tgt = torch.as_tensor(out["label"]).as_subclass(torch.Tensor).round().long()
        cases.append(Case(img.name if img.path else "volume", image.contiguous(), tgt.contiguous()))
    return cases


def crop_batches(
    cases: Sequence[Case],
    roi: Int3,
    batch_size: int,
    crops_per_volume: int,
    seg: SegmentationConfig,
    seed: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches ``{"image": (B,1,*roi) float, "label": (B,1,*roi) long}`` of random crops,
    ``pos_weight : neg_weight`` of them centred on a labelled voxel (MONAI RandCropByPosNegLabeld)."""
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    crops = max(1, int(crops_per_volume))
    transform = Compose(
        [
            SpatialPadd(("image", "label"), spatial_size=roi, mode="constant", value=0),
            RandCropByPosNegLabeld(
                ("image", "label"),
                label_key="label",
                spatial_size=roi,
                pos=seg.pos_weight,
                neg=seg.neg_weight,
                num_samples=crops,
            ),
        ],
        lazy=False,
    )
    transform.set_random_state(seed=seed % 2**32)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    pending: list[dict[str, torch.Tensor]] = []
    while True:
        while len(pending) < batch_size:
            if not order:
                order = list(rng.permutation(len(cases)))
            case = cases[order.pop()]
            for sample in transform({"image": case.image, "label": case.target}):
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


# --------------------------------------------------------------------------- sliding window


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` runs over ``shape``."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(s, r) for s, r in zip(shape, roi)]
    interval = _get_scan_interval(size, list(roi), len(roi), [overlap] * len(roi))
    return len(dense_patch_slices(size, list(roi), interval))


@torch.no_grad()
def sliding_window_logits(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    *,
    overlap: float = 0.25,
    blend: str = "gaussian",
    sw_batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Logits (K+1, D, H, W) on the CPU for ``image`` (1, D, H, W) on the model grid.

    Windows of ``roi`` go to ``device`` ``sw_batch_size`` at a time; the volume and the
    blended output stay on the CPU, so memory on the device is bounded by the window batch.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    roi = tuple(int(r) for r in roi)
    x = torch.as_tensor(image).as_subclass(torch.Tensor).float()[None]  # (1, 1, D, H, W)
    total = count_windows(x.shape[2:], roi, overlap)
    done = [0]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        if cancel is not None and cancel():
            raise Cancelled()
        out = model(batch.to(device))
        done[0] += batch.shape[0]
        if progress is not None:
            progress(min(done[0], total), total)
        return out.float()

    out = sliding_window_inference(
        x,
        roi,
        sw_batch_size,
        predictor,
        overlap=overlap,
        mode=blend,
        padding_mode="constant",
        cval=0.0,
        sw_device=device,
        device=torch.device("cpu"),
    )
    return torch.as_tensor(out).as_subclass(torch.Tensor)[0]


def keep_largest_component(index: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """An index map (D, H, W) of classes 0..K with each class 1..K reduced to its largest
    connected component (full 26-connectivity), the rest set to background.

    MONAI's ``KeepLargestConnectedComponent`` (``independent=True``: each class on its own).
    """
    from monai.transforms import KeepLargestConnectedComponent

    arr = np.asarray(index)
    if num_classes < 1 or not arr.any():
        return arr
    keep = KeepLargestConnectedComponent(
        applied_labels=list(range(1, num_classes + 1)), is_onehot=False, independent=True
    )
    out = keep(torch.as_tensor(arr)[None])  # channel-first (1, D, H, W)
    return np.asarray(torch.as_tensor(out).as_subclass(torch.Tensor)[0]).astype(arr.dtype)


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class Dice (K,) of index maps (D, H, W) via MONAI ``compute_dice``; NaN where the
    class is absent from the reference (MONAI's ``ignore_empty``)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    p = one_hot(pred.reshape(1, 1, *pred.shape).long(), num_classes + 1)
    t = one_hot(target.reshape(1, 1, *target.shape).long(), num_classes + 1)
    return compute_dice(p, t, include_background=False, ignore_empty=True)[0]


def _make_validator(
    cases: Sequence[Case],
    labelset: LabelSet,
    roi: Int3,
    seg: SegmentationConfig,
    device_fn: Callable[[], torch.device],
) -> Callable[[torch.nn.Module], dict[str, float]]:
    def evaluate_cases(model: torch.nn.Module) -> dict[str, float]:
        device = device_fn()
        scores = []
        for case in cases:
            logits = sliding_window_logits(
                model,
                case.image,
                roi,
                overlap=seg.overlap,
                blend=seg.blend,
                sw_batch_size=seg.sw_batch_size,
                device=device,
            )
            pred = logits.argmax(0)
            if seg.largest_component:
                pred = torch.as_tensor(keep_largest_component(pred, len(labelset)))
            scores.append(dice_scores(pred, case.target[0], len(labelset)))
        per_class = torch.stack(scores).nanmean(0)  # (K,)
        out = {"val_dice": float(per_class.nanmean())}
        for name, v in zip(labelset.names, per_class.tolist()):
            out[f"val_dice_{name}"] = float(v)
        return out

    return evaluate_cases


# --------------------------------------------------------------------------- fine-tuning


def finetune(
    images: Any,
    labels: Any,
    run_dir: str | Path,
    cfg: RunConfig | None = None,
    *,
    pretrained: str | Path | None = None,
    seg: SegmentationConfig | None = None,
    classes: Sequence[str | int] | None = None,
    label_names: str | Path | None = None,
    labels_map: str | Path | dict | None = None,
    n_labelled: int | None = None,
    val_images: Any = None,
    val_labels: Any = None,
    resample_labels: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> FitResult:
    """Fine-tune a UNETR segmenter on labelled CT; returns the run's :class:`FitResult`.

    ``images`` / ``labels``: paths (files, folders, globs, .txt lists; or a dataset.json as
    ``images`` with ``labels=None``) or :class:`Volume` objects, paired in order.
    ``pretrained``: a pretraining checkpoint (run dir or file) whose ``encoder.*`` weights
    start the encoder (ae / vae / vq-vae: whose ``enc.*`` / ``dec.*`` weights start the conv
    segmenter, see :mod:`.models.conv_segmenter`); None trains from scratch. Without ``cfg``
    the architecture, spacing and HU window come from ``pretrained`` (else the tiny preset);
    with ``cfg`` its encoder must match the checkpoint's (CheckpointError naming what differs).
    ``classes`` (names or ids) / ``labels_map`` (mapping file) choose the classes;
    ``label_names`` is the source ``label_names.json`` (default: beside the labels).
    ``n_labelled`` keeps the first N training pairs. ``val_images``/``val_labels`` are
    scored every ``seg.eval_every`` steps (per-class Dice); the best is kept as best.safetensors.
    """
    from .api import prepare_run_dir, resumed_config

    run_dir = Path(run_dir)
    seg = seg or SegmentationConfig()
    pretrained_from = None
    start_step = 0
    if resume:
        prepare_run_dir(run_dir, resume=True, force=False)
        from .checkpoint import list_checkpoints

        last = load_checkpoint(list_checkpoints(run_dir)[-1], kind=KIND, weights_too=False)
        cfg = resumed_config(last.config, cfg)  # steps, device and threads from ``cfg``
        seg = SegmentationConfig.from_dict(last.meta["extra"]["segmentation"])
        pretrained = None  # the run's own weights are loaded by fit(resume=True)
        pretrained_from = last.meta["extra"].get("pretrained")  # kept as the run's provenance
        labels_map = last.meta["extra"]["labels"]
        start_step = last.step
    pre_ckpt = load_checkpoint(pretrained) if pretrained is not None else None
    if pre_ckpt is not None:
        pretrained_from = str(pre_ckpt.path)
    if cfg is None:
        cfg = config_from_pretrained(pre_ckpt)
    cfg = cfg.validate()
    seg.validate(cfg)
    if pre_ckpt is not None:  # refuse another encoder before anything is written
        check_same_encoder(pre_ckpt, cfg.model)

    # ---- labelled data (checked before anything is written)
    pairs = resolve_labelled(images, labels)
    if n_labelled is not None:
        if n_labelled < 1:
            raise ConfigError(f"--n-labelled must be at least 1, got {n_labelled}.")
        if n_labelled > len(pairs):
            raise DataError(
                f"--n-labelled {n_labelled} but only {len(pairs)} labelled volumes were given."
            )
        pairs = pairs[:n_labelled]
    val_pairs = resolve_labelled(val_images, val_labels, what="validation") if val_images else []
    source_names = _label_names_for([lab for _, lab in pairs], label_names)
    loaded = [_load_pair(i, lab, resample_labels) for i, lab in pairs]
    val_loaded = [_load_pair(i, lab, resample_labels) for i, lab in val_pairs]
    if isinstance(labels_map, dict) and "classes" in labels_map and _is_stored(labels_map):
        labelset = LabelSet.from_dict(labels_map)
    else:
        labelset = make_label_set(
            [(lab.path, lab.array) for _, lab in loaded],
            classes=classes,
            labels_map=labels_map,
            source_names=source_names,
        )

    device = D.select_device(cfg.train.device)
    dist_info = D.init_distributed(device)
    if not resume:
        prepare_run_dir(run_dir, resume=False, force=force)
    D.barrier()

    from .train.loop import data_seed, seed_everything

    seed_everything(cfg.train.seed)  # same seed, same decoder initialisation in every arm
    model = build_segmenter(cfg, seg, len(labelset))
    if pre_ckpt is not None:
        load_pretrained_encoder(model, pre_ckpt)
    roi = seg.roi_for(cfg)
    cases = prepare_cases(loaded, labelset, cfg)
    val_cases = prepare_cases(val_loaded, labelset, cfg)
    batches = crop_batches(
        cases,
        roi,
        cfg.train.batch_size,
        cfg.data.crops_per_volume,
        seg,
        seed=data_seed(cfg.train.seed, start_step) + 1000 * dist_info.rank,
    )

    from monai.losses import DiceCELoss

    criterion = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits = m(batch["image"])
        loss = criterion(logits.float(), batch["label"])
        return loss, {}

    evaluate_fn = None
    eval_every = None
    if val_cases:
        evaluate_fn = _make_validator(val_cases, labelset, roi, seg, lambda: device)
        eval_every = seg.eval_every or _default_eval_every(cfg)
        if eval_every % cfg.train.log_every:
            cfg.train.log_every = math.gcd(eval_every, cfg.train.log_every)

    extra = {
        "segmentation": seg.to_dict(),
        "labels": labelset.to_dict(),
        "pretrained": pretrained_from,
        "n_train": len(cases),
        "n_val": len(val_cases),
        "train_images": [_describe(i) for i, _ in pairs],
    }
    return fit(
        model,
        batches,
        cfg,
        run_dir,
        loss_fn=loss_fn,
        kind=KIND,
        extra_meta=extra,
        evaluate=evaluate_fn,
        eval_every=eval_every,
        best_metric="val_dice" if evaluate_fn else None,
        progress=progress,
        cancel=cancel,
        resume=resume,
        device=device,
    )


def _is_stored(d: dict) -> bool:
    return all(isinstance(c, dict) and "source_ids" in c for c in d["classes"])


def _describe(item: Any) -> str:
    return item.path if isinstance(item, Volume) else str(item)


def _default_eval_every(cfg: RunConfig) -> int:
    log = max(1, cfg.train.log_every)
    every = max(1, cfg.train.steps // 10)
    return max(log, (every // log) * log)


def config_from_pretrained(ckpt: Checkpoint | None, base: RunConfig | None = None) -> RunConfig:
    """Fine-tuning config: ``base`` (default the tiny preset, or the checkpoint's preset)
    with the checkpoint's architecture, spacing, HU window and intensity handling."""
    if ckpt is None:
        return base or preset("tiny")
    pcfg = ckpt.config
    if base is None:
        try:
            base = preset(pcfg.preset)
        except ConfigError:
            base = preset("tiny")
    cfg = RunConfig.from_dict(base.to_dict())
    cfg.model = RunConfig.from_dict(pcfg.to_dict()).model
    cfg.data.spacing = pcfg.data.spacing
    cfg.data.hu_window = pcfg.data.hu_window
    cfg.data.intensity = pcfg.data.intensity
    return cfg


# --------------------------------------------------------------------------- inference


@dataclass
class Segmentation:
    """A label map on the input's own voxel grid (X, Y, Z) with the input's affine."""

    labels: np.ndarray
    affine: np.ndarray
    classes: dict[int, str]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``path`` (.nii.gz, uint8/int16) and, same stem, ``.json`` ``{id: name}``."""
        path = Path(path)
        names_path = path.with_name(strip_suffix(path.name) + ".json")
        if names_path.exists() and not overwrite:
            raise DataError(f"{names_path} exists; pass --force / overwrite=True to replace it.")
        dtype = np.uint8 if max(self.classes, default=0) < 256 else np.int16
        written = save_volume(self.labels, self.affine, path, overwrite=overwrite, dtype=dtype)
        from .checkpoint import atomic_write_text

        atomic_write_text(
            names_path, json.dumps({str(k): v for k, v in self.classes.items()}, indent=2)
        )
        return written, names_path


def segment(
    checkpoint: str | Path,
    image: str | Path | Volume,
    *,
    overlap: float | None = None,
    blend: str | None = None,
    sw_batch_size: int | None = None,
    largest_component: bool | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    _model: Any = None,
) -> Segmentation:
    """Segment a whole CT (file, DICOM folder or Volume) with a fine-tuned checkpoint.

    Windows run on ``device`` (``sw_batch_size`` at a time), the volume stays on the CPU;
    the argmax is mapped back to the input's grid (nearest) and to the checkpoint's class ids.
    ``largest_component`` keeps only each class's largest connected component on the input's
    grid (:func:`keep_largest_component`); None: the checkpoint's
    ``SegmentationConfig.largest_component`` (default off: a class may have two parts).
    Other None arguments also take the checkpoint's settings.
    """
    from .data.transforms import inference_transforms, invert_to_input

    model, cfg, seg, labelset, ckpt = _model or load_segmenter(checkpoint)
    overlap = seg.overlap if overlap is None else float(overlap)
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}.")
    blend = blend or seg.blend
    largest_component = seg.largest_component if largest_component is None else largest_component
    if blend not in ("gaussian", "constant"):
        raise ConfigError(f"blend must be gaussian or constant, got {blend!r}.")
    vol = image if isinstance(image, Volume) else load_volume(image)
    transform = inference_transforms(cfg.data)
    sample = transform({"image": vol})
    dev = D.select_device(device)
    model = model.to(dev).eval()
    is_cancelled = _cancel_fn(cancel)

    def window_progress(done: int, total: int) -> None:
        if progress is not None:
            progress({"phase": "segment", "step": done, "steps": total})

    logits = sliding_window_logits(
        model,
        sample["image"],
        seg.roi_for(cfg),
        overlap=overlap,
        blend=blend,
        sw_batch_size=sw_batch_size or seg.sw_batch_size,
        device=dev,
        progress=window_progress,
        cancel=is_cancelled,
    )
    index = logits.argmax(0, keepdim=True).float()  # (1, D, H, W)
    del logits
    back = invert_to_input(index, sample, transform, nearest=True)
    index_in = np.rint(np.asarray(back)[0]).astype(np.int64)
    if index_in.shape != vol.array.shape:
        raise RuntimeError(f"inverse geometry gave {index_in.shape}, input is {vol.array.shape}")
    if largest_component:  # on the output grid, so the saved map has one piece per class
        index_in = keep_largest_component(index_in, len(labelset))
    return Segmentation(
        labels=labelset.index_to_ids(index_in),
        affine=np.asarray(vol.affine),
        classes=labelset.id_to_name(),
        source=vol.path,
        extra={
            "checkpoint": str(ckpt.path),
            "overlap": overlap,
            "blend": blend,
            "largest_component": bool(largest_component),
        },
    )


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Per case and class: Dice and 95% Hausdorff distance (mm) on the input's grid."""

    rows: list[dict[str, Any]]
    classes: dict[int, str]

    def summary(self) -> dict[str, dict[str, float]]:
        """``{class name: {"dice": mean, "hd95": mean}}`` over cases (NaNs skipped)."""
        out = {}
        for cid, name in self.classes.items():
            rows = [r for r in self.rows if r["id"] == cid]
            out[name] = {
                "dice": _nanmean([r["dice"] for r in rows]),
                "hd95": _nanmean([r["hd95_mm"] for r in rows]),
            }
        return out

    def mean_dice(self) -> float:
        return _nanmean([v["dice"] for v in self.summary().values()])

    def table(self) -> str:
        lines = [f"{'case':<24} {'class':<16} {'dice':>7} {'hd95_mm':>9}"]
        for r in self.rows:
            lines.append(
                f"{r['case'][:24]:<24} {r['class'][:16]:<16} {_f(r['dice'], 4):>7} "
                f"{_f(r['hd95_mm'], 2):>9}"
            )
        for name, s in self.summary().items():
            lines.append(
                f"{'mean':<24} {name[:16]:<16} {_f(s['dice'], 4):>7} {_f(s['hd95'], 2):>9}"
            )
        lines.append(f"{'mean':<24} {'all classes':<16} {_f(self.mean_dice(), 4):>7}")
        return "\n".join(lines)

    def save_csv(self, path: str | Path) -> Path:
        from .checkpoint import atomic_write_text

        path = Path(path)
        lines = ["case,class,id,dice,hd95_mm"]
        for r in self.rows:
            lines.append(
                f"{r['case']},{r['class']},{r['id']},{_f(r['dice'], 6)},{_f(r['hd95_mm'], 4)}"
            )
        for cid, (name, s) in zip(self.classes, self.summary().items()):
            lines.append(f"mean,{name},{cid},{_f(s['dice'], 6)},{_f(s['hd95'], 4)}")
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _f(v: float, digits: int) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def evaluate(
    checkpoint: str | Path,
    images: Any,
    labels: Any,
    *,
    labels_map: str | Path | None = None,
    label_names: str | Path | None = None,
    resample_labels: bool = False,
    overlap: float | None = None,
    largest_component: bool | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> Evaluation:
    """Segment each image and score it against its label map (Dice, HD95 via MONAI).

    Reference labels are mapped through the checkpoint's label set (its source ids), or
    through ``labels_map`` when the reference uses another labelling. ``overlap`` and
    ``largest_component`` are passed to :func:`segment` (None: the checkpoint's settings).
    """
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    loaded_model = load_segmenter(checkpoint)
    labelset = loaded_model[3]
    pairs = resolve_labelled(images, labels, what="evaluation")
    if labels_map is not None:
        names = _label_names_for([lab for _, lab in pairs], label_names)
        ref_set = read_mapping_file(labels_map, names)
        if ref_set.names != labelset.names:
            raise DataError(
                f"the labels map gives classes {ref_set.names} but the model segments "
                f"{labelset.names}; map the reference onto the model's classes (same names, same order)."
            )
    else:
        ref_set = labelset
    loaded = [_load_pair(i, lab, resample_labels) for i, lab in pairs]
    rows = []
    is_cancelled = _cancel_fn(cancel)
    for n, (img, lab) in enumerate(loaded):
        if is_cancelled():
            raise Cancelled()
        result = segment(
            checkpoint,
            img,
            overlap=overlap,
            largest_component=largest_component,
            device=device,
            _model=loaded_model,
        )
        pred_idx = _ids_to_index(result.labels, labelset)
        ref_idx = ref_set.to_index(lab.array)
        k = len(labelset)
        dice = dice_scores(torch.as_tensor(pred_idx), torch.as_tensor(ref_idx), k)
        p = one_hot(torch.as_tensor(pred_idx)[None, None].long(), k + 1)
        t = one_hot(torch.as_tensor(ref_idx)[None, None].long(), k + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty classes; we report NaN
            hd = compute_hausdorff_distance(
                p, t, include_background=False, percentile=95, spacing=list(img.spacing)
            )[0]
        case = img.name
        for i, c in enumerate(labelset.classes):
            ref_has = bool((ref_idx == i + 1).any())
            pred_has = bool((pred_idx == i + 1).any())
            hd_v = float(hd[i]) if ref_has and pred_has else float("nan")
            rows.append(
                {
                    "case": case,
                    "class": c.name,
                    "id": c.id,
                    "dice": float(dice[i]) if ref_has else float("nan"),
                    "hd95_mm": hd_v if math.isfinite(hd_v) else float("nan"),
                }
            )
        if progress is not None:
            progress({"phase": "evaluate", "step": n + 1, "steps": len(loaded)})
    return Evaluation(rows=rows, classes=labelset.id_to_name())


def _ids_to_index(ids: np.ndarray, labelset: LabelSet) -> np.ndarray:
    lut = np.zeros(max(labelset.ids) + 1, dtype=np.int64)
    for i, cid in enumerate(labelset.ids, start=1):
        lut[cid] = i
    return lut[np.asarray(ids).astype(np.int64)]


__all__ = [
    "Evaluation",
    "Segmentation",
    "SegmentationConfig",
    "config_from_pretrained",
    "evaluate",
    "finetune",
    "keep_largest_component",
    "load_segmenter",
    "segment",
    "sliding_window_logits",
]
