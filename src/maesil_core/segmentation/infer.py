"""Segment whole CTs with a fine-tuned checkpoint.

    segmenter = Segmenter.load("runs/seg")          # best.safetensors of the run, else its newest
    result = segmenter.segment("new_ct.nii.gz")     # labels on the input's own grid
    result.save("new_ct_seg.nii.gz")                # + new_ct_seg.json {id: name}

The CT is resampled and normalised as in training, MONAI's ``sliding_window_inference`` runs
the windows on the compute device (``sw_batch_size`` at a time; the volume and the blended
logits stay on the CPU), the argmax goes back onto the input's own voxel grid (orientation,
spacing, shape) by MONAI's inverse transforms, nearest neighbour, and class indices become
the checkpoint's class ids.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint, load_weights, read_meta, resolve_checkpoint
from ..config import RunConfig
from ..data.io import Volume, load_volume, save_volume, strip_suffix, write_label_names
from ..data.labels import LabelSet
from ..errors import Cancelled, CheckpointError, ConfigError, DataError
from ..models.segmenter import make_segmenter
from ..progress import CancelFlag, CancelHooks, ProgressFn, cancel_fn
from ..train import distributed as D
from ..train.optim import autocast_dtype
from .config import KIND, SegmentationConfig


def resolve_segmentation_checkpoint(path: str | Path) -> Path:
    """A run directory -> its ``best.safetensors`` if there is one, else its newest checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "best.safetensors").is_file() and (p / "best.json").is_file():
        return p / "best.safetensors"
    return resolve_checkpoint(p)


# --------------------------------------------------------------------------- sliding window


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` runs over ``shape`` (padded up to ``roi``).

    Per axis MONAI steps by ``int(roi * (1 - overlap))`` (at least 1; the whole axis when the
    window covers it) and shifts the last window back inside, so an axis of ``size`` voxels
    takes ``ceil((size - roi) / step) + 1`` windows.
    """
    total = 1
    for s, r in zip(shape, roi):
        size = max(int(s), int(r))
        step = int(r) if size == r else max(1, int(r * (1 - overlap)))
        total *= math.ceil((size - r) / step) + 1
    return total


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    *,
    overlap: float = 0.25,
    blend: str = "gaussian",
    sw_batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Logits (K+1, D, H, W) on the CPU for ``image`` (1, D, H, W) on the model grid.

    Windows of ``roi`` go to ``device`` ``sw_batch_size`` at a time; the volume and the
    blended output stay on the CPU, so memory on the device is bounded by the window batch.
    ``amp_dtype`` (e.g. bf16): the windows run under autocast, the logits are blended in
    float32; a window batch whose autocast output is not finite is run again in float32.
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
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
        if amp_dtype is not None and not torch.isfinite(out).all():
            out = model(batch)  # bf16 gave NaN / inf (seen on the CPU): this batch in fp32
        done[0] += batch.shape[0]
        if progress is not None:
            progress(min(done[0], total), total)
        return out.float()

    # a cancel lands between the model's modules too, not only between window batches
    with CancelHooks(model, cancel) if cancel is not None else contextlib.nullcontext():
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


def keep_largest_component(
    index: np.ndarray | torch.Tensor, num_classes: int | Sequence[int]
) -> np.ndarray:
    """A label map (D, H, W) with each class reduced to its largest connected component
    (full 26-connectivity), the rest set to background. ``num_classes`` K: the classes
    1..K of an index map; a sequence: those label ids.

    MONAI's ``KeepLargestConnectedComponent`` (``independent=True``: each class on its own).
    """
    from monai.transforms import KeepLargestConnectedComponent

    arr = np.asarray(index)
    applied = list(range(1, num_classes + 1)) if isinstance(num_classes, int) else list(num_classes)
    if not applied or not arr.any():
        return arr
    keep = KeepLargestConnectedComponent(applied_labels=applied, is_onehot=False, independent=True)
    out = keep(torch.as_tensor(arr)[None])  # channel-first (1, D, H, W)
    return np.asarray(torch.as_tensor(out).as_subclass(torch.Tensor)[0]).astype(arr.dtype)


def predict_index(
    model: nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    seg: SegmentationConfig,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class indices 0..K (D, H, W) on the model grid for ``image`` (1, D, H, W), with the
    checkpoint-time settings of ``seg`` (overlap, blend, window batch, largest component):
    what validation scores during fine-tuning."""
    logits = sliding_window_logits(
        model,
        image,
        roi,
        overlap=seg.overlap,
        blend=seg.blend,
        sw_batch_size=seg.sw_batch_size,
        device=device,
    )
    pred = logits.argmax(0)
    if seg.largest_component:
        pred = torch.as_tensor(keep_largest_component(pred, num_classes))
    return pred


# --------------------------------------------------------------------------- whole CTs


@dataclass
class Segmentation:
    """A label map on the input's own voxel grid (X, Y, Z) with the input's affine."""

    labels: np.ndarray
    affine: np.ndarray
    classes: dict[int, str]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: classes whose volume or share of air is implausible (:mod:`.plausibility`)
    warnings: list[str] = field(default_factory=list)

    def save(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``path`` (.nii.gz, uint8/int16) and, same stem, ``.json`` ``{id: name}``."""
        path = Path(path)
        names_path = path.with_name(strip_suffix(path.name) + ".json")
        if names_path.exists() and not overwrite:
            raise DataError(
                f"{names_path} exists; pass `force` / overwrite=True to replace it.", option="force"
            )
        dtype = np.uint8 if max(self.classes, default=0) < 256 else np.int16
        written = save_volume(self.labels, self.affine, path, overwrite=overwrite, dtype=dtype)
        return written, write_label_names(written, self.classes)  # the reader's convention


@dataclass
class Segmenter:
    """A fine-tuned segmenter ready for inference: the model (eval mode, on the CPU until
    :meth:`segment` moves it), its configs, its label set and the checkpoint it came from.

    Load it once (:meth:`load`) and segment many CTs; :func:`~.evaluate.evaluate` does that.
    """

    model: nn.Module
    cfg: RunConfig
    seg: SegmentationConfig
    labels: LabelSet
    checkpoint: Checkpoint

    @classmethod
    def load(cls, checkpoint: str | Path) -> Segmenter:
        """Rebuild the segmenter of a fine-tuning run (its best checkpoint) or file.

        CheckpointError when it is not a segmentation checkpoint (with the command that
        makes one), lacks its label set, or does not fit its architecture.
        """
        path = resolve_segmentation_checkpoint(checkpoint)
        try:
            ckpt = load_checkpoint(path, kind=KIND)
        except CheckpointError as exc:
            if "checkpoint is needed" in str(exc):
                meta = read_meta(path)
                raise CheckpointError(
                    f"{path} is a {meta.kind} ({meta.method}) "
                    "checkpoint, not a segmentation model; fine-tune it first: maesil finetune "
                    "`pretrained` ... `images` ... `labels` ... `run_dir` RUN"
                ) from exc
            raise
        extra = ckpt.meta.extra
        if "labels" not in extra or "segmentation" not in extra:
            raise CheckpointError(f"{path} lacks its label set / segmentation settings.")
        cfg = ckpt.config
        seg = SegmentationConfig.from_dict(extra["segmentation"])
        labels = LabelSet.from_dict(extra["labels"])
        model = make_segmenter(
            cfg.model,
            len(labels),
            feature_size=seg.feature_size,
            layers=seg.layers,
            norm_name=seg.norm,
        )
        load_weights(model, ckpt.state_dict, str(path))
        return cls(model.eval(), cfg, seg, labels, ckpt)

    def segment(
        self,
        image: str | Path | Volume,
        *,
        overlap: float | None = None,
        blend: str | None = None,
        sw_batch_size: int | None = None,
        largest_component: bool | None = None,
        body_mask: bool | None = None,
        device: str = "auto",
        precision: str = "auto",
        progress: ProgressFn | None = None,
        cancel: CancelFlag = None,
    ) -> Segmentation:
        """Segment a whole CT (file, DICOM folder or Volume).

        Windows run on ``device`` (``sw_batch_size`` at a time), the volume stays on the
        CPU; the argmax is mapped back to the input's grid (nearest) and to the checkpoint's
        class ids. ``largest_component`` keeps only each class's largest connected component
        on the input's grid (:func:`keep_largest_component`). None arguments take the
        checkpoint's settings (``largest_component`` off unless fine-tuned with it: a class
        may have two parts). ``body_mask`` keeps labels inside the patient's body, found from
        the intensities (:func:`~maesil_core.data.body.body_mask`; on unless fine-tuned with
        it off). The result's ``warnings`` say when a class's volume or share of air is
        implausible (:func:`~.plausibility.plausibility_warnings`). ``precision``: ``auto``
        runs the windows in bf16 on a GPU that has it and in fp32 elsewhere; ``bf16`` or
        ``fp32`` choose (bf16 on the CPU is PyTorch's CPU autocast).
        """
        from ..data.inverse import labels_to_input
        from ..data.transforms import inference_transforms

        is_cancelled = cancel_fn(cancel)
        seg = self.seg
        overlap = seg.overlap if overlap is None else float(overlap)
        if not 0 <= overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}.")
        blend = blend or seg.blend
        largest_component = (
            seg.largest_component if largest_component is None else largest_component
        )
        body_mask = seg.body_mask if body_mask is None else body_mask
        if blend not in ("gaussian", "constant"):
            raise ConfigError(f"blend must be gaussian or constant, got {blend!r}.")
        if is_cancelled():
            raise Cancelled()
        if progress is not None:
            progress({"phase": "prepare", "message": "resampling the CT to the model grid"})
        vol = image if isinstance(image, Volume) else load_volume(image)
        transform = inference_transforms(self.cfg.data, cancel=is_cancelled)
        sample = transform({"image": vol})
        dev = D.select_device(device)
        amp_dtype = autocast_dtype(precision, dev)  # a precision the device lacks: refused
        model = self.model.to(dev).eval()

        def window_progress(done: int, total: int) -> None:
            if progress is not None:
                progress({"phase": "segment", "step": done, "steps": total})

        logits = sliding_window_logits(
            model,
            sample["image"],
            seg.roi_for(self.cfg),
            overlap=overlap,
            blend=blend,
            sw_batch_size=sw_batch_size or seg.sw_batch_size,
            device=dev,
            amp_dtype=amp_dtype,
            progress=window_progress,
            cancel=is_cancelled,
        )
        # class ids on the model grid, in the smallest dtype that holds them: the full-size
        # map on the input grid is then the only large array (100 MB in uint8 for 512x512x400)
        ids = self.labels.index_to_ids(logits.argmax(0).numpy())  # (D, H, W)
        del logits
        top = max(self.labels.ids, default=0)
        ids = ids.astype(np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.int32))
        if is_cancelled():
            raise Cancelled()
        if progress is not None:
            progress({"phase": "finish", "message": "labels back on the CT's grid"})
        labels_in = labels_to_input(ids, sample, transform)
        if labels_in.shape != vol.array.shape:
            raise RuntimeError(
                f"inverse geometry gave {labels_in.shape}, input is {vol.array.shape}"
            )
        is_hu = self.cfg.data.intensity == "hu" or (self.cfg.data.intensity == "auto" and vol.is_hu)
        body = None
        if body_mask:  # labels only inside the body, before the largest piece is chosen
            from ..data.body import body_mask as find_body

            body = find_body(vol.array, vol.affine, is_hu=is_hu)
            labels_in[~body] = 0
        if largest_component:  # on the output grid, so the saved map has one piece per class
            labels_in = keep_largest_component(labels_in, self.labels.ids)
        from .plausibility import plausibility_warnings

        classes = self.labels.id_to_name()
        return Segmentation(
            labels=labels_in,
            affine=np.asarray(vol.affine),
            classes=classes,
            source=vol.path,
            extra={
                "checkpoint": str(self.checkpoint.path),
                "overlap": overlap,
                "blend": blend,
                "largest_component": bool(largest_component),
                "body_mask": bool(body_mask),
            },
            warnings=plausibility_warnings(
                labels_in, vol.array, vol.affine, classes, is_hu=is_hu, body=body
            ),
        )


def load_segmenter(checkpoint: str | Path) -> Segmenter:
    """:meth:`Segmenter.load`."""
    return Segmenter.load(checkpoint)


def segment(
    checkpoint: str | Path,
    image: str | Path | Volume,
    *,
    overlap: float | None = None,
    blend: str | None = None,
    sw_batch_size: int | None = None,
    largest_component: bool | None = None,
    body_mask: bool | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> Segmentation:
    """Segment a whole CT with a fine-tuned checkpoint: ``Segmenter.load(checkpoint)``, then
    :meth:`Segmenter.segment` (None arguments: the checkpoint's settings)."""
    return Segmenter.load(checkpoint).segment(
        image,
        overlap=overlap,
        blend=blend,
        sw_batch_size=sw_batch_size,
        largest_component=largest_component,
        body_mask=body_mask,
        device=device,
        precision=precision,
        progress=progress,
        cancel=cancel,
    )
