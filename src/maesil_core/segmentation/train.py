"""Fine-tune a pretrained encoder into a 3D organ segmenter.

    from maesil_core.segmentation import finetune
    result = finetune(["ct.nii.gz"], ["labels.nii.gz"], "runs/seg",
                      pretrained="runs/pretrain", classes=["liver", "spleen"])

Training runs through :func:`maesil_core.train.fit` (the pretraining loop: progress,
cancel, bf16, checkpoints, resume, DDP) with ``kind="segmentation"``: the loss is MONAI's
Dice + cross-entropy on ROI crops drawn around the labels (:func:`.data.crop_batches`),
validation is the per-class Dice of whole validation volumes (sliding window), and the best
one is kept as ``RUN_DIR/best.safetensors``. A segmentation checkpoint carries everything
inference needs: the encoder/decoder architecture, the ROI size, the spacing and HU window,
and the label set (class ids, names, and which source labels they were made from).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..config import Int3, ModelConfig, RunConfig, preset
from ..data.labels import LabelSet
from ..errors import CheckpointError, ConfigError, DataError
from ..models.segmenter import UNETRSegmenter, architecture_mismatch, make_segmenter
from ..progress import CancelFlag, ProgressFn
from ..runs import prepare_run_dir, resume_from, resumed_config
from ..train import FitResult, fit
from ..train import distributed as D
from ..train.optim import cpu_computes_bf16
from .config import KIND, SegmentationConfig
from .data import (
    Case,
    crop_batches,
    describe_source,
    is_stored_labelset,
    label_names_for,
    load_pair,
    make_label_set,
    prepare_cases,
    resolve_labelled,
)
from .evaluate import dice_scores
from .infer import predict_index

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
            "`preset` out to take the architecture from the checkpoint."
        )


def _make_validator(
    cases: Sequence[Case],
    labelset: LabelSet,
    roi: Int3,
    seg: SegmentationConfig,
    device_fn: Callable[[], torch.device],
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """``validate(model) -> {"val_dice": mean, "val_dice_<class>": ...}`` over whole cases."""

    def evaluate_cases(model: torch.nn.Module) -> dict[str, float]:
        device = device_fn()
        scores = []
        for case in cases:
            pred = predict_index(model, case.image, roi, seg, len(labelset), device)
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
    run_dir = Path(run_dir)
    seg = seg or SegmentationConfig()
    pretrained_from = None
    start_step = 0
    if resume:
        last = resume_from(run_dir, kind=KIND)
        cfg = resumed_config(last.config, cfg)  # steps, device and threads from ``cfg``
        seg = SegmentationConfig.from_dict(last.meta.extra["segmentation"])
        pretrained = None  # the run's own weights are loaded by fit(resume=True)
        pretrained_from = last.meta.extra.get("pretrained")  # kept as the run's provenance
        labels_map = last.meta.extra["labels"]
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
            raise ConfigError(
                f"`n_labelled` must be at least 1, got {n_labelled}.", option="n_labelled"
            )
        if n_labelled > len(pairs):
            raise DataError(
                f"`n_labelled` {n_labelled} but only {len(pairs)} labelled volumes were given.",
                option="n_labelled",
            )
        pairs = pairs[:n_labelled]
    val_pairs = resolve_labelled(val_images, val_labels, what="validation") if val_images else []
    source_names = label_names_for([lab for _, lab in pairs], label_names)
    # validating on the training pairs themselves (the napari widget's default): load and
    # resample them once
    val_is_train = [tuple(map(id, p)) for p in val_pairs] == [tuple(map(id, p)) for p in pairs]
    loaded = [load_pair(i, lab, resample_labels) for i, lab in pairs]
    val_loaded = (
        loaded if val_is_train else [load_pair(i, b, resample_labels) for i, b in val_pairs]
    )
    if isinstance(labels_map, dict) and "classes" in labels_map and is_stored_labelset(labels_map):
        labelset = LabelSet.from_dict(labels_map)
    else:
        labelset = make_label_set(
            [(lab.path, lab.array) for _, lab in loaded],
            classes=classes,
            labels_map=labels_map,
            source_names=source_names,
            cancel=cancel,
        )

    device = D.select_device(cfg.train.device)
    dist_info = D.init_distributed(device)
    if cfg.train.precision == "auto" and device.type == "cpu" and cpu_computes_bf16():
        # the decoder's full-resolution convolutions are ~99 % of a fine-tuning step; a CPU
        # with AMX runs them twice as fast in bf16 (BENCHMARKS.md), same Dice (RESULTS.md)
        cfg.train.precision = "bf16"
        if progress is not None:
            progress(
                {
                    "phase": "prepare",
                    "message": "fine-tuning in bf16 (this CPU computes bf16 natively, about "
                    "twice as fast as fp32 here; `precision` fp32 to choose)",
                }
            )
    if not resume:
        prepare_run_dir(run_dir, resume=False, force=force)
    D.barrier()

    from ..train.seeding import data_seed, seed_everything

    seed_everything(cfg.train.seed)  # same seed, same decoder initialisation in every arm
    model = build_segmenter(cfg, seg, len(labelset))
    if pre_ckpt is not None:
        load_pretrained_encoder(model, pre_ckpt)
    roi = seg.roi_for(cfg)
    cases = prepare_cases(loaded, labelset, cfg, cancel)
    val_cases = cases if val_is_train else prepare_cases(val_loaded, labelset, cfg, cancel)
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
        "train_images": [describe_source(i) for i, _ in pairs],
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


def _default_eval_every(cfg: RunConfig) -> int:
    log = max(1, cfg.train.log_every)
    every = max(1, cfg.train.steps // 10)
    return max(log, (every // log) * log)


def config_from_pretrained(ckpt: Checkpoint | None, base: RunConfig | None = None) -> RunConfig:
    """Fine-tuning config: ``base`` (default the tiny preset, or the checkpoint's preset, with
    its fine-tuning training settings) with the checkpoint's architecture, spacing, HU window
    and intensity handling."""
    if ckpt is None:
        return base or preset("tiny", "finetune")
    pcfg = ckpt.config
    if base is None:
        try:
            base = preset(pcfg.preset, "finetune")
        except ConfigError:
            base = preset("tiny", "finetune")
    cfg = RunConfig.from_dict(base.to_dict())
    cfg.model = RunConfig.from_dict(pcfg.to_dict()).model
    cfg.data.spacing = pcfg.data.spacing
    cfg.data.hu_window = pcfg.data.hu_window
    cfg.data.intensity = pcfg.data.intensity
    return cfg
