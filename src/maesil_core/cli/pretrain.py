"""``maesil pretrain``: pretrain a 3D encoder on unlabelled CT (one GPU, many under torchrun)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    Progress,
    add_command,
    add_run_options,
    check_output_dir,
    install_cancel,
    resume_config,
    run_config_from_args,
    stopped_early,
)
from .probe import add_probe_data_options

if TYPE_CHECKING:
    from ..config import ProbeConfig

EXAMPLES = """examples:
  maesil pretrain --out runs/demo                                 # tiny preset on the built-in CT phantom
  maesil pretrain --data ../shared/data/abdomen_ct/ct.nii.gz ../shared/data/chest_ct --out runs/ct --preset tiny
  maesil pretrain --data scans/ dataset.json list.txt 'more/*.nii.gz' --out runs/base --preset base --device cuda
  maesil pretrain --out runs/ct --resume --steps 600               # continue (and extend) a run
  maesil pretrain --data ../shared/data/chest_ct --out runs/probed --preset tiny \\
      --probe-images ../shared/data/abdomen_ct/ct.nii.gz --probe-labels ../shared/data/abdomen_ct/labels.nii.gz \\
      --probe-classes liver spleen --probe-every 100  # + probe_liver, probe_spleen in metrics.csv
  maesil pretrain --data scans/ --out runs/probed --config run.json   # {"preset": "tiny", "probe": {"images": [...], ...}}
  torchrun --nproc-per-node 4 -m maesil_core pretrain --data scans/ --out runs/ddp --preset base"""


def run(args: argparse.Namespace) -> int:
    from .. import api

    check_output_dir(args.out)
    if args.resume:
        cfg = resume_config(args)
    else:
        cfg = run_config_from_args(args)
        if getattr(args, "method", None):
            cfg = cfg.override("model", method=args.method)
        for key in ("mask_mode", "mask_ratio"):
            if getattr(args, key, None) is not None:
                cfg = cfg.override("model", **{key: getattr(args, key)})
        cfg.validate()
    probe = probe_config_from_args(args)
    cancel = install_cancel()
    result = api.pretrain(
        args.data,
        args.out,
        cfg,
        resume=args.resume,
        force=args.force,
        probe=probe,
        progress=Progress(),
        cancel=cancel,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    state = "stopped early" if result.cancelled else "finished"
    print(f"{state} at step {result.step}; checkpoint: {result.checkpoint}")
    print(f"loss curve: {Path(args.out) / 'loss.png'}; metrics: {Path(args.out) / 'metrics.csv'}")
    if result.cancelled:
        return stopped_early("pretrain", args.out, result.step, result.history)
    return 0


#: the probe flags: ``--probe-NAME`` sets ProbeConfig.NAME
PROBE_FLAGS = (
    "images", "labels", "classes", "label_names", "test_images", "test_labels",
    "resample_labels", "every",
)  # fmt: skip


def probe_config_from_args(args: argparse.Namespace) -> ProbeConfig | None:
    """The ProbeConfig of the ``--config`` file's ``"probe"`` section and the ``--probe-*``
    flags (a flag wins over the file), validated; None without either. ``--resume`` reads no
    section of the file (the run's recorded probe goes on, unless flags replace it)."""
    import dataclasses

    from ..config import ConfigError, ProbeConfig, load_probe_config

    config = getattr(args, "config", None)
    base = load_probe_config(config) if config and not args.resume else None
    values = {name: getattr(args, f"probe_{name}", None) for name in PROBE_FLAGS}
    given = {k: v for k, v in values.items() if v is not None and v is not False}  # 0 counts
    if base is None and not given:
        return None
    if base is None:
        return ProbeConfig(**given).validate()
    for images, labels in (("images", "labels"), ("test_images", "test_labels")):
        if (images in given) != (labels in given):  # a flag would pair with the file's other half
            have, lack = (images, labels) if images in given else (labels, images)
            raise ConfigError(
                f"`probe_{have}` replaces the config file's probe {have} but not its {lack}: "
                f"give `probe_{lack}` too (the two go together), or neither.",
                option=f"probe_{lack}",
            )
    try:
        return dataclasses.replace(base, **given).validate()
    except ConfigError as exc:
        raise ConfigError(
            f'{exc.template} (config file {config}: its "probe" section holds these settings '
            'without "--probe-": "images", "labels", "every", ...)',
            option=exc.option,
        ) from exc


def add_probe_options(p: argparse.ArgumentParser) -> None:
    """``--probe-*``: a linear probe of the encoder scored while it trains."""
    g = p.add_argument_group(
        "probe while training",
        "score a linear probe of the frozen encoder every --probe-every steps (per-class "
        "Dice in metrics.csv and TensorBoard as probe_CLASS, beside random init and patch "
        "statistics; see maesil probe)",
    )
    add_probe_data_options(g, prefix="probe-")
    g.add_argument(
        "--probe-every", type=int, metavar="N", help="steps between probe scores (default 100)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    from ..models.registry import available_methods

    p = add_command(sub, "pretrain", "pretrain a 3D encoder on unlabelled CT", run, EXAMPLES)
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="CT files (.nii, .nii.gz, .nrrd), DICOM folders, folders, globs, .txt lists "
        "or a dataset.json; default: the built-in CT phantom",
    )
    p.add_argument(
        "--method", choices=available_methods(), help="pretraining method (default maesil)"
    )
    p.add_argument(
        "--mask-mode",
        choices=["dual", "random", "block"],
        help="masking (default: the preset's; tiny, cpu and mim-med3d random, the others dual)",
    )
    p.add_argument("--mask-ratio", type=float, help="share of masked patches (default 0.75)")
    add_run_options(
        p,
        config_help='JSON file overriding the preset (e.g. {"model": {"mask_ratio": 0.8}, '
        '"train": {"lr": 3e-4}}); its "preset" is the run\'s preset when --preset is not '
        'given, and a "probe" section sets the --probe-* settings (names without --probe-)',
    )
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="no random flips, axial turns or contrast jitter of the training crops (on by "
        "default: trained on three scans, it reconstructs a held-out CT 3 dB better)",
    )
    p.add_argument(
        "--augment-on",
        choices=["auto", "loader", "device"],
        help="where the crops are augmented: in the loader's CPU processes or on the batch on "
        "the training device (default auto: the device when it is a GPU)",
    )
    add_probe_options(p)
