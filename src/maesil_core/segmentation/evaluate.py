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

from ..data.labels import LabelSet, read_mapping_file
from ..errors import Cancelled, DataError
from ..progress import CancelFlag, ProgressFn, cancel_fn
from .data import label_names_for, load_pair, resolve_labelled
from .infer import Segmenter


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class Dice (K,) of index maps (D, H, W) via MONAI ``compute_dice``; NaN where the
    class is absent from the reference (MONAI's ``ignore_empty``)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    p = one_hot(pred.reshape(1, 1, *pred.shape).long(), num_classes + 1)
    t = one_hot(target.reshape(1, 1, *target.shape).long(), num_classes + 1)
    return compute_dice(p, t, include_background=False, ignore_empty=True)[0]


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
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

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
    loaded = [load_pair(i, lab, resample_labels) for i, lab in pairs]
    rows = []
    is_cancelled = cancel_fn(cancel)
    for n, (img, lab) in enumerate(loaded):
        if is_cancelled():
            raise Cancelled()
        result = segmenter.segment(
            img,
            overlap=overlap,
            largest_component=largest_component,
            body_mask=body_mask,
            device=device,
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
