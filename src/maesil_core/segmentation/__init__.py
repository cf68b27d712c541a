"""Organ segmentation from a pretrained encoder: fine-tune, segment whole CTs, evaluate.

    from maesil_core.segmentation import Segmenter, evaluate, finetune

    finetune(["ct.nii.gz"], ["labels.nii.gz"], "runs/seg", pretrained="runs/pretrain",
             classes=["liver", "spleen"])
    Segmenter.load("runs/seg").segment("new_ct.nii.gz").save("new_ct_seg.nii.gz")
    print(evaluate("runs/seg", ["ct2.nii.gz"], ["labels2.nii.gz"]).table())

- :mod:`.config`    :class:`SegmentationConfig` (ROI, decoder, overlap, ...), saved in checkpoints
- :mod:`.data`      image / label pairs, the label set, cases on the model grid, ROI crops
- :mod:`.train`     the segmenter built on a pretrained encoder, :func:`finetune`
- :mod:`.infer`     sliding-window inference, largest component, :class:`Segmenter`
- :mod:`.evaluate`  Dice and HD95 per class against reference label maps
- :mod:`.plausibility`  warnings for a class full of air or larger than its organ
"""

from .config import KIND, SegmentationConfig
from .data import crop_volume
from .evaluate import Evaluation, dice_scores, evaluate
from .infer import (
    Segmentation,
    Segmenter,
    count_windows,
    keep_largest_component,
    load_segmenter,
    resolve_segmentation_checkpoint,
    segment,
    sliding_window_logits,
)
from .train import (
    build_segmenter,
    check_same_encoder,
    config_from_pretrained,
    finetune,
    load_pretrained_encoder,
)

__all__ = [
    "KIND",
    "Evaluation",
    "Segmentation",
    "SegmentationConfig",
    "Segmenter",
    "build_segmenter",
    "check_same_encoder",
    "config_from_pretrained",
    "count_windows",
    "crop_volume",
    "dice_scores",
    "evaluate",
    "finetune",
    "keep_largest_component",
    "load_pretrained_encoder",
    "load_segmenter",
    "resolve_segmentation_checkpoint",
    "segment",
    "sliding_window_logits",
]
