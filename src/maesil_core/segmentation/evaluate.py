"""Score a fine-tuned segmenter against reference label maps: Dice and HD95 per class.

    report = evaluate("runs/seg", ["ct2.nii.gz"], ["labels2.nii.gz"])
    print(report.table()); report.save_csv("eval.csv")

Each CT is segmented on its own grid by one :class:`~.infer.Segmenter` (loaded once) and
compared with its reference there (MONAI ``compute_dice``, ``compute_hausdorff_distance``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.labels import LabelSet, apply_lut, read_mapping_file
from ..errors import Cancelled, DataError
from ..progress import CancelFlag, ProgressFn, cancel_fn
from .data import label_names_for, load_pair, resolve_labelled
from .infer import Segmenter


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class Dice (K,) of index maps (D, H, W); NaN where the class is absent from the
    reference. What MONAI's ``compute_dice(one_hot(pred), one_hot(target),
    include_background=False, ignore_empty=True)`` gives (a test checks it), counted from the
    index maps without their one-hots (K + 1 float copies: 4.6 GB each for 10 classes at
    512 x 512 x 400)."""
    conf = confusion(np.asarray(pred), np.asarray(target), num_classes + 1)
    inter = np.diag(conf)[1:].astype(np.float64)
    in_pred, in_ref = conf.sum(1)[1:], conf.sum(0)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(in_ref > 0, 2 * inter / (in_pred + in_ref), np.nan)
    return torch.as_tensor(dice, dtype=torch.float32)


def confusion(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """Voxel counts (n, n) of (predicted index, reference index) pairs of two index maps of
    one shape, 4 M voxels at a time (a 32 MB temporary whatever the volume's size)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and reference {target.shape} differ")
    p, t = pred.reshape(-1), target.reshape(-1)
    counts = np.zeros(n * n, np.int64)
    chunk = 1 << 22
    for start in range(0, p.size, chunk):
        pair = p[start : start + chunk].astype(np.int64) * n + t[start : start + chunk]
        counts += np.bincount(pair, minlength=n * n)[: n * n]
    return counts.reshape(n, n)


def hd95_scores(
    pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> list[float]:
    """95 % Hausdorff distance (mm) per class 1..K of index maps (X, Y, Z), NaN unless the
    class is in both; MONAI ``compute_hausdorff_distance`` on one class at a time, cut to
    the box that holds it in either map (what MONAI crops to itself), so no whole-volume
    one-hot is made."""
    from monai.metrics import compute_hausdorff_distance

    out = []
    for i in range(1, num_classes + 1):
        p, t = pred == i, target == i
        if not p.any() or not t.any():
            out.append(float("nan"))
            continue
        either = p | t
        box = []
        for axis in range(either.ndim):
            other = tuple(a for a in range(either.ndim) if a != axis)
            hit = np.flatnonzero(either.any(axis=other))
            box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
        box = tuple(box)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty classes; we report NaN
            hd = compute_hausdorff_distance(
                torch.as_tensor(p[box])[None, None],
                torch.as_tensor(t[box])[None, None],
                include_background=True,
                percentile=95,
                spacing=list(spacing),
            )
        value = float(hd.reshape(-1)[0])
        out.append(value if math.isfinite(value) else float("nan"))
    return out


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
        from ..files import atomic_write_csv

        rows = [{**r, "dice": _f(r["dice"], 6), "hd95_mm": _f(r["hd95_mm"], 4)} for r in self.rows]
        for cid, (name, s) in zip(self.classes, self.summary().items()):
            rows.append(
                {"case": "mean", "class": name, "id": cid, "dice": _f(s["dice"], 6),
                 "hd95_mm": _f(s["hd95"], 4)}
            )  # fmt: skip
        fields = ["case", "class", "id", "dice", "hd95_mm"]
        return atomic_write_csv(path, fields, ({k: r[k] for k in fields} for r in rows))


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
    body_mask: bool | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> Evaluation:
    """Segment each image and score it against its label map (Dice, HD95 via MONAI).

    Reference labels are mapped through the checkpoint's label set (its source ids), or
    through ``labels_map`` when the reference uses another labelling. ``overlap`` and
    ``largest_component`` and ``body_mask`` are passed to :meth:`Segmenter.segment` (None:
    the checkpoint's settings).
    """
    segmenter = Segmenter.load(checkpoint)
    labelset = segmenter.labels
    pairs = resolve_labelled(images, labels, what="evaluation")
    if labels_map is not None:
        names = label_names_for([lab for _, lab in pairs], label_names)
        ref_set = read_mapping_file(labels_map, names)
        if ref_set.names != labelset.names:
            raise DataError(
                f"the labels map gives classes {ref_set.names} but the model segments "
                f"{labelset.names}; map the reference onto the model's classes (same names, same order)."
            )
    else:
        ref_set = labelset
    rows = []
    is_cancelled = cancel_fn(cancel)
    k = len(labelset)
    for n, (image, label) in enumerate(pairs):  # one case in memory at a time
        if is_cancelled():
            raise Cancelled()
        img, lab = load_pair(image, label, resample_labels)
        result = segmenter.segment(
            img,
            overlap=overlap,
            largest_component=largest_component,
            body_mask=body_mask,
            device=device,
        )
        pred_idx = _ids_to_index(result.labels, labelset)  # (X, Y, Z) uint8 indices
        del result
        ref_idx = ref_set.to_index(lab.array)
        case, spacing = img.name, list(img.spacing)
        del img, lab
        dice = dice_scores(pred_idx, ref_idx, k)
        hd = hd95_scores(pred_idx, ref_idx, k, spacing)
        for i, c in enumerate(labelset.classes):
            rows.append(
                {
                    "case": case,
                    "class": c.name,
                    "id": c.id,
                    "dice": float(dice[i]),
                    "hd95_mm": hd[i],
                }
            )
        if progress is not None:
            progress({"phase": "evaluate", "step": n + 1, "steps": len(pairs)})
    return Evaluation(rows=rows, classes=labelset.id_to_name())


def _ids_to_index(ids: np.ndarray, labelset: LabelSet) -> np.ndarray:
    """Output ids -> class indices 0..K, uint8 (up to 255 classes)."""
    lut = np.zeros(max(labelset.ids) + 1, dtype=np.uint8 if len(labelset) < 256 else np.int16)
    for i, cid in enumerate(labelset.ids, start=1):
        lut[cid] = i
    return apply_lut(lut, np.asarray(ids))
