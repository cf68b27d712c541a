"""``maesil finetune`` / ``segment`` / ``evaluate``: organ segmentation from a pretrained encoder.

    maesil finetune --images ct/ --labels labels/ --pretrained runs/pre --out runs/seg --classes liver spleen
    maesil segment --checkpoint runs/seg --input new_ct.nii.gz --out new_ct_seg.nii.gz
    maesil evaluate --checkpoint runs/seg --images test_ct/ --labels test_labels/

Problems with the input (labels of another geometry, unknown classes, count mismatch, a
pretraining checkpoint given to ``segment``) print one line and exit with status 2.

Longer than 500 lines: three commands of one task, each with its flags, examples and the
checks of its outputs before any work; split, they would share every helper.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from ..errors import ConfigError
from .common import (
    Progress,
    add_command,
    add_run_options,
    add_threads_option,
    check_output_dir,
    check_output_file,
    install_cancel,
    resume_config,
    run_config_from_args,
    stopped_early,
)

EXAMPLES = {
    "finetune": """examples:
  maesil finetune --images ../shared/data/abdomen_ct/ct.nii.gz --labels ../shared/data/abdomen_ct/labels.nii.gz \\
      --pretrained runs/ct --out runs/seg --classes liver spleen --steps 300
  maesil finetune --images ct/ --labels labels/ --out runs/scratch --classes 5 1     # from scratch, ids
  maesil finetune --images ct/ --labels labels/ --labels-map organs.json --pretrained runs/ct \\
      --out runs/seg --n-labelled 2 --layer-decay 0.75 --val-images val_ct/ --val-labels val_labels/
  maesil finetune --images dataset.json --out runs/seg --pretrained runs/ct --freeze-encoder
  maesil finetune --images ct/ --labels labels/ --out runs/seg --resume --steps 600   # continue a run

--resume continues with the run's saved settings (architecture, classes, ROI, schedule):
give --images / --labels (and --val-images / --val-labels) again; --steps N extends the run.

organs.json chooses, renames and merges classes of the source labels (names from the
label_names.json beside the labels, or ids):
  {"liver": "liver", "spleen": 1, "kidneys": ["kidney_left", "kidney_right"]}""",
    "segment": """examples:
  maesil segment --checkpoint runs/seg --input ../shared/data/abdomen_ct/ct.nii.gz --out seg.nii.gz
  maesil segment --checkpoint runs/seg/best.safetensors --input dicom_folder/ --out seg.nii.gz --overlap 0.5 --device cuda
  maesil segment --checkpoint runs/seg --input ct.nii.gz --out seg.nii.gz --largest-component  # no stray voxels
writes seg.nii.gz (labels on the input's voxel grid, with its affine) and seg.json ({id: name}).""",
    "evaluate": """examples:
  maesil evaluate --checkpoint runs/seg --images ../shared/data/abdomen_ct/ct.nii.gz --labels ../shared/data/abdomen_ct/labels.nii.gz
  maesil evaluate --checkpoint runs/seg --images ../shared/data/dicom_ct --labels ../shared/data/dicom_ct_labels/labels.nii.gz --resample-labels --csv eval.csv
  maesil evaluate --checkpoint runs/seg --images test_ct/ --labels test_labels/ --largest-component  # HD95 without stray voxels""",
}


BODY_MASK_HELP = (
    "keep labels inside the patient's body, found from the intensities (above -500 HU, "
    "holes such as the lungs filled slice by slice): a model asked about the air around the "
    "body may call it an organ. Default: the checkpoint's setting, on unless fine-tuned with "
    "--no-body-mask; --no-body-mask labels the whole scan"
)

LARGEST_COMPONENT_HELP = (
    "keep only the largest connected component of each class, removing stray voxels away "
    "from the organ (MONAI KeepLargestConnectedComponent). Default: the checkpoint's setting, "
    "off unless fine-tuned with --largest-component, because a class can have several parts "
    "(e.g. 'kidneys' = left + right would lose one kidney)"
)


def _paths(values: list[str] | None) -> list[str] | None:
    return list(values) if values else None


def cmd_finetune(args: argparse.Namespace) -> int:
    from .. import segmentation as ft
    from ..checkpoint import load_checkpoint

    if not args.images:
        raise ConfigError(
            "--images is required (CT files, folders, a .txt list or a dataset.json), also "
            "with --resume."
        )
    if args.roi and (len(args.roi) not in (1, 3) or min(args.roi) < 1):
        raise ConfigError(
            f"--roi {' '.join(map(str, args.roi))}: give one positive number or three (D H W "
            "voxels, multiples of the patch size)."
        )
    check_output_dir(args.out)
    if args.resume:  # the run's own settings; only --steps / --device / --threads from the flags
        cfg = resume_config(args)
    else:
        cfg = finetune_config(args, load_checkpoint(args.pretrained) if args.pretrained else None)
    seg = ft.SegmentationConfig(
        roi=tuple(args.roi) if args.roi else None,
        feature_size=args.feature_size,
        freeze_encoder=args.freeze_encoder,
        layer_decay=args.layer_decay,
        eval_every=args.eval_every,
        overlap=args.overlap,
        largest_component=args.largest_component,
        body_mask=args.body_mask,
        air_margin=ft.SegmentationConfig.air_margin if args.air_margin is None else args.air_margin,
    )
    from ..runs import claimed_run_dir

    cancel = install_cancel()
    with claimed_run_dir(args.out, resume=args.resume):
        result = ft.finetune(
            _paths(args.images),
            _paths(args.labels),
            args.out,
            cfg,
            pretrained=args.pretrained,
            seg=seg,
            classes=args.classes,
            label_names=args.label_names,
            labels_map=args.labels_map,
            n_labelled=args.n_labelled,
            val_images=_paths(args.val_images),
            val_labels=_paths(args.val_labels),
            resample_labels=args.resample_labels,
            resume=args.resume,
            force=args.force,
            progress=Progress(),
            cancel=cancel,
        )
    if os.environ.get("RANK", "0") != "0":
        return 0
    state = "stopped early" if result.cancelled else "finished"
    print(f"{state} at step {result.step}; checkpoint: {result.checkpoint}")
    if result.best_checkpoint:
        best = [r for r in result.history if "val_dice" in r]
        top = max(best, key=lambda r: r["val_dice"]) if best else {}
        print(
            f"best validation Dice {top.get('val_dice', float('nan')):.4f} at step "
            f"{int(top.get('step', 0))}: {result.best_checkpoint}"
        )
    print(f"curves: {Path(args.out) / 'loss.png'}; metrics: {Path(args.out) / 'metrics.csv'}")
    if result.cancelled:
        return stopped_early("finetune", args.out, result.step, result.history)
    print(f"segment a CT with: maesil segment --checkpoint {args.out} --input CT --out SEG.nii.gz")
    return 0


def finetune_config(args: argparse.Namespace, pre_ckpt):
    """The fine-tuning RunConfig from the flags and the ``--pretrained`` checkpoint.

    Without ``--pretrained``: ``--preset`` (default tiny) / ``--config`` / flags, as for
    ``pretrain``. With it, the encoder architecture, spacing, HU window and intensity handling
    always come from the checkpoint (``--spacing`` / ``--window`` / ``--intensity`` override
    the last three); ``--preset`` / ``--config`` then only give the training settings (steps,
    batch, lr, ...; default: the checkpoint's own preset), and one that describes another
    encoder is refused (CheckpointError, exit 2) rather than silently replaced.
    """
    from .. import segmentation as ft
    from ..config import PRESETS, config_preset
    from ..errors import CheckpointError
    from ..models.segmenter import architecture_mismatch

    explicit = args.preset is not None or args.config is not None
    if args.preset is None and not (args.config and config_preset(args.config)):
        known = pre_ckpt is not None and pre_ckpt.config.preset in PRESETS
        args.preset = pre_ckpt.config.preset if known else "tiny"
    cfg = run_config_from_args(args, stage="finetune")
    if pre_ckpt is not None:
        # a preset has no method of its own (pretrain --method sets it): compare the encoder the
        # preset gives to the checkpoint's method, so `--preset tiny` fits a tiny ae / vae run
        own = cfg.override("model", method=pre_ckpt.config.model.method).model
        problem = architecture_mismatch(pre_ckpt.config.model, own)
        if explicit and problem:
            given = f"--preset {args.preset}" if args.config is None else f"--config {args.config}"
            raise CheckpointError(
                f"{pre_ckpt.path} has another encoder than this segmenter ({problem}; checkpoint "
                f"vs {given}): the architecture comes from --pretrained; leave --preset out "
                "(training settings from the checkpoint's preset) or give one of the same "
                "architecture."
            )
        base = ft.config_from_pretrained(pre_ckpt, base=cfg)
        cfg.model = base.model
        # the encoder was pretrained at this spacing / window: keep them unless asked otherwise
        if not args.spacing:
            cfg.data.spacing = base.data.spacing
        if not args.window:
            cfg.data.hu_window = base.data.hu_window
        if not args.intensity:
            cfg.data.intensity = base.data.intensity
    return cfg.validate()


def _default_out(input_path: str, fmt: str = "nifti") -> Path:
    from ..data.io import strip_suffix

    p = Path(input_path.rstrip("/"))
    suffix = "_seg.dcm" if fmt == "dicom-seg" else "_seg.nii.gz"
    return Path.cwd() / f"{strip_suffix(p.name)}{suffix}"


def _segment_outputs(args: argparse.Namespace) -> list[Path]:
    """The files ``segment`` will write, checked before the model runs: the label map (NIfTI
    with its class names beside it, or one DICOM-SEG that carries them)."""
    from ..data.io import is_dicom_dir, strip_suffix

    out = Path(args.out) if args.out else _default_out(args.input, args.format)
    example = "seg.dcm" if args.format == "dicom-seg" else "seg.nii.gz"
    check_output_file(out, "--out", force=args.force, example=example)
    if args.format == "dicom-seg":
        if not is_dicom_dir(args.input):
            raise ConfigError(
                f"--format dicom-seg needs a DICOM series folder as --input (a DICOM-SEG "
                f"references the slices it segments); {args.input} is not one: use --format "
                "nifti."
            )
        if out.suffix.lower() != ".dcm":
            raise ConfigError(f"--out {out} must end in .dcm for --format dicom-seg.")
        targets = [out]
    else:
        if not out.name.lower().endswith((".nii.gz", ".nii")):
            raise ConfigError(f"--out {out} must end in .nii.gz or .nii.")
        targets = [out, out.with_name(strip_suffix(out.name) + ".json")]
    for target in targets:  # a folder, an existing file without --force, an unwritable place
        check_output_file(target, "--out", force=args.force, example=example)
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise ConfigError(
            f"--sw-batch-size {args.sw_batch_size}: windows per forward pass must be 1 or more."
        )
    return targets


def _threads(args: argparse.Namespace):
    """The torch threads of an inference command (--threads; auto: one per free core), for
    the command's duration (nothing changes on a GPU)."""
    from ..threads import torch_threads
    from ..train import distributed as D

    return torch_threads(args.threads, D.select_device(args.device or "auto"))


def cmd_segment(args: argparse.Namespace) -> int:
    from .. import segmentation as ft

    targets = _segment_outputs(args)
    segmenter = ft.Segmenter.load(args.checkpoint)  # a wrong checkpoint: refused before the CT
    with _threads(args):
        result = segmenter.segment(
            args.input,
            overlap=args.overlap,
            blend=args.blend,
            sw_batch_size=args.sw_batch_size,
            largest_component=args.largest_component,
            body_mask=args.body_mask,
            device=args.device or "auto",
            precision=args.precision,
            progress=Progress(),
        )
    if args.format == "dicom-seg":
        from ..interop.dicom_seg import save_dicom_seg

        seg_path = save_dicom_seg(
            targets[0],
            result.labels,
            result.affine,
            result.classes,
            args.input,
            overwrite=args.force,
        )
        print(f"DICOM-SEG: {seg_path} (one segment per class present, referencing {args.input})")
    else:
        seg_path, names_path = result.save(targets[0], overwrite=args.force)
        print(f"labels: {seg_path}")
        print(f"names:  {names_path}")
    import numpy as np

    voxel_ml = abs(float(np.linalg.det(result.affine[:3, :3]))) / 1000.0
    for cid, name in result.classes.items():
        n = int((result.labels == cid).sum())
        print(f"  {cid:>3} {name:<20} {n:>9} voxels  {n * voxel_ml:9.1f} ml")
    for line in result.warnings:
        warnings.warn(line, stacklevel=1)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .. import segmentation as ft

    csv_path = _evaluation_csv(args)  # refuse an existing --csv before the work, not after
    with _threads(args):
        report = ft.evaluate(
            args.checkpoint,
            _paths(args.images),
            _paths(args.labels),
            labels_map=args.labels_map,
            label_names=args.label_names,
            resample_labels=args.resample_labels,
            overlap=args.overlap,
            largest_component=args.largest_component,
            body_mask=args.body_mask,
            device=args.device or "auto",
            progress=Progress(),
        )
    print(report.table())
    report.save_csv(csv_path)
    print(f"saved: {csv_path}")
    return 0


def _evaluation_csv(args: argparse.Namespace) -> Path:
    """``--csv`` (refused when it exists, unless ``--force``), else the first free
    ``evaluation.csv``, ``evaluation-2.csv``, ... in the run: earlier evaluations are kept."""
    if args.csv:
        return check_output_file(args.csv, "--csv", force=args.force, example="evaluation.csv")
    p = Path(args.checkpoint)
    run = p if p.is_dir() else p.parent
    path, n = run / "evaluation.csv", 2
    while path.exists():
        path, n = run / f"evaluation-{n}.csv", n + 1
    return check_output_file(path, "--csv")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``finetune``, ``segment`` and ``evaluate`` to the ``maesil`` parser."""

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        return add_command(sub, name, help, func, EXAMPLES[name])

    p = command(
        "finetune", "fine-tune a pretrained encoder into a 3D organ segmenter", cmd_finetune
    )
    p.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="training CTs (files, folders, .txt, dataset.json)",
    )
    p.add_argument(
        "--labels", nargs="+", metavar="PATH", help="label maps, one per image, same order"
    )
    p.add_argument(
        "--pretrained",
        metavar="CKPT",
        help="pretraining run dir or .safetensors whose encoder starts the segmenter; it also "
        "sets the architecture and the default spacing / HU window (default: from scratch)",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="classes to learn, by name or id (default: all labels)",
    )
    p.add_argument(
        "--label-names",
        metavar="FILE",
        help="label_names.json of the source labels (default: beside the labels)",
    )
    p.add_argument(
        "--labels-map",
        metavar="FILE",
        help="JSON mapping file: select / rename / merge source classes",
    )
    p.add_argument(
        "--n-labelled", type=int, metavar="N", help="use only the first N labelled volumes"
    )
    p.add_argument(
        "--val-images",
        nargs="+",
        metavar="PATH",
        help="validation CTs (best checkpoint by mean Dice)",
    )
    p.add_argument("--val-labels", nargs="+", metavar="PATH", help="validation label maps")
    p.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    p.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        metavar="F",
        help="layer-wise lr decay, e.g. 0.75 (default 1: none)",
    )
    p.add_argument(
        "--roi",
        type=int,
        nargs="+",
        metavar="VOX",
        help="training crop / inference window (default: the superpatch)",
    )
    p.add_argument("--feature-size", type=int, default=16, help="decoder width (default 16)")
    p.add_argument(
        "--eval-every", type=int, help="steps between validations (default: ~10 per run)"
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=0.25,
        help="sliding-window overlap for validation and later inference",
    )
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="store in the checkpoint that segment / evaluate (and validation) keep only the "
        "largest connected component of each class (default off: a class can have several "
        "parts, e.g. 'kidneys')",
    )
    p.add_argument(
        "--no-body-mask",
        dest="body_mask",
        action="store_false",
        default=True,
        help="store in the checkpoint that segment / evaluate label the whole scan, not only "
        "the body (default: inside the body, found from the intensities)",
    )
    p.add_argument(
        "--air-margin",
        type=float,
        metavar="F",
        help="air added around each training volume in-plane, as a share of the ROI on each "
        "side, so crops at the body's edge see the air whole scans have (default 0.5; 0: none)",
    )
    p.add_argument(
        "--resample-labels",
        action="store_true",
        help="resample label maps onto their image by world coordinates",
    )
    add_run_options(
        p,
        config_help="JSON file of training settings, as for pretrain "
        '(e.g. {"train": {"lr": 3e-4, "batch_size": 2}}); with --pretrained its "model" '
        "section must describe the checkpoint's encoder (the architecture comes from there)",
        batch_help="training crops (ROI, default the superpatch) per step and GPU, drawn "
        "2 : 1 around labelled voxels and anywhere (default: the preset's batch size)",
        preset_default=None,  # None: the --pretrained checkpoint's preset (else tiny)
        preset_help="named configuration. Without --pretrained: the architecture and training "
        "settings (default: tiny). With --pretrained the architecture always comes from the "
        "checkpoint (so do spacing, HU window and intensity unless --spacing / --window / "
        "--intensity are given); --preset then only sets the training settings (default: the "
        "checkpoint's own preset) and must be of the same architecture, else the run is "
        "refused (exit 2)",
    )

    p = command("segment", "segment a whole CT with a fine-tuned checkpoint", cmd_segment)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="fine-tuning run dir (its best checkpoint) or .safetensors",
    )
    p.add_argument("--input", required=True, help="CT file or DICOM folder")
    p.add_argument(
        "--out",
        help="output label map: .nii.gz for nifti, .dcm for dicom-seg (default: INPUT_seg.nii.gz "
        "or INPUT_seg.dcm here)",
    )
    p.add_argument(
        "--format",
        choices=["nifti", "dicom-seg"],
        default="nifti",
        help="nifti (default: the label map + its class names as JSON) or dicom-seg (DICOM "
        "Segmentation referencing the input series, one named segment per class; the input "
        "must be a DICOM series folder)",
    )
    p.add_argument(
        "--overlap", type=float, help="sliding-window overlap (default: the checkpoint's, 0.25)"
    )
    p.add_argument(
        "--blend", choices=["gaussian", "constant"], help="window blending (default gaussian)"
    )
    p.add_argument("--sw-batch-size", type=int, help="windows per forward pass (default 4)")
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=LARGEST_COMPONENT_HELP,
    )
    p.add_argument("--body-mask", action=argparse.BooleanOptionalAction, help=BODY_MASK_HELP)
    p.add_argument(
        "--device", help="auto (default), cpu, cuda or cuda:N (the volume stays on the CPU)"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto (default): the windows in bf16 on a GPU that has it, fp32 on the CPU",
    )
    add_threads_option(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = command("evaluate", "Dice and HD95 per organ of a fine-tuned checkpoint", cmd_evaluate)
    p.add_argument("--checkpoint", required=True, help="fine-tuning run dir or .safetensors")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="test CTs")
    p.add_argument(
        "--labels", nargs="+", required=True, metavar="PATH", help="reference label maps"
    )
    p.add_argument(
        "--labels-map",
        metavar="FILE",
        help="mapping of the reference labels onto the model's classes",
    )
    p.add_argument("--label-names", metavar="FILE", help="label_names.json of the reference labels")
    p.add_argument(
        "--resample-labels",
        action="store_true",
        help="resample label maps onto their image by world coordinates",
    )
    p.add_argument("--overlap", type=float, help="sliding-window overlap")
    p.add_argument(
        "--largest-component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=LARGEST_COMPONENT_HELP,
    )
    p.add_argument("--body-mask", action=argparse.BooleanOptionalAction, help=BODY_MASK_HELP)
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--csv",
        metavar="FILE",
        help="where to save the table (default: evaluation.csv in the run, or evaluation-2.csv, "
        "... when it exists)",
    )
    add_threads_option(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --csv")
