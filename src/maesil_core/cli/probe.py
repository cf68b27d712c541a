"""``maesil probe``: what a pretrained encoder has learnt, by a linear probe per organ.

    maesil probe --checkpoint runs/ct --images ct.nii.gz --labels labels.nii.gz \\
        --classes liver spleen --test-images other_ct/ --test-labels other_labels.nii.gz --json

Prints per-class Dice of the frozen encoder, of the same architecture at random
initialisation and of raw patch statistics (see :mod:`maesil_core.probe`). Problems with the
input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json

from .common import Progress, add_command, add_threads_option

EXAMPLE = """examples:
  maesil probe --checkpoint runs/ct --images ../shared/data/abdomen_ct/ct.nii.gz \\
      --labels ../shared/data/abdomen_ct/labels.nii.gz --classes liver spleen \\
      --test-images ../shared/data/dicom_ct --test-labels ../shared/data/dicom_ct_labels/labels.nii.gz \\
      --resample-labels --threads 1
  maesil probe --checkpoint runs/ct/checkpoints/step_000300.safetensors --images ct/ --labels labels/ \\
      --test-images test_ct/ --test-labels test_labels/ --classes 5 1 --json

The encoder is frozen; its token features on whole volumes (tiled like 'reconstruct') are
upsampled to voxels and a linear classifier per voxel is trained on --images and scored on
--test-images. The same is done for the architecture at random initialisation (mean of
--random-inits networks) and for (mean, std, min, max) of each patch: an encoder that does not
beat them has learnt nothing a linear read-out can use beyond patch intensities."""


def cmd_probe(args: argparse.Namespace) -> int:
    from .. import probe as pr
    from ..threads import torch_threads
    from ..train.distributed import select_device

    with torch_threads(args.threads, select_device(args.device or "auto")):
        result = pr.probe(
            args.checkpoint,
            list(args.images),
            list(args.labels),
            test_images=list(args.test_images),
            test_labels=list(args.test_labels),
            classes=args.classes,
            label_names=args.label_names,
            labels_map=args.labels_map,
            resample_labels=args.resample_labels,
            seed=args.seed,
            max_voxels=args.max_voxels,
            random_inits=args.random_inits,
            device=args.device or "auto",
            progress=Progress(),
        )
    if args.json:
        print(json.dumps(result.scores))
        return 0
    print(
        f"linear probe, Dice per class on {result.extra['n_test']} test volume(s) "
        f"({result.extra['method']}, step {result.extra['step']}):"
    )
    print(result.table())
    return 0


def add_probe_data_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, prefix: str = ""
) -> None:
    """The probe's labelled data: ``--images``, ``--labels``, ``--test-images``, ... for
    ``maesil probe`` (required); ``--probe-images``, ... with ``prefix="probe-"`` for
    ``maesil pretrain`` (optional; the test CTs default to part of the training ones)."""
    need = not prefix
    held_out = "" if need else " (default: the last of several, or the other half of one)"
    path = {"nargs": "+", "required": need, "metavar": "PATH"}
    p.add_argument(f"--{prefix}images", **path, help="labelled CTs the probe is trained on")
    p.add_argument(f"--{prefix}labels", **path, help="their label maps, same order")
    p.add_argument(f"--{prefix}test-images", **path, help="CTs the probe is scored on" + held_out)
    p.add_argument(f"--{prefix}test-labels", **path, help="their label maps")
    p.add_argument(
        f"--{prefix}classes",
        nargs="+",
        metavar="NAME",
        help="classes, by name or id (default: all labels)",
    )
    p.add_argument(
        f"--{prefix}label-names",
        metavar="FILE",
        help="label_names.json of the source labels (default: beside the labels)",
    )
    if need:  # pretraining's probe takes classes only
        p.add_argument(
            "--labels-map",
            metavar="FILE",
            help="JSON mapping file: select / rename / merge classes",
        )
    p.add_argument(
        f"--{prefix}resample-labels",
        action="store_true",
        help="resample label maps onto their image by world coordinates",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``probe`` to the ``maesil`` parser."""
    p = add_command(
        sub,
        "probe",
        "score a pretrained encoder by a linear probe per organ, beside random init and patch statistics",
        cmd_probe,
        EXAMPLE,
    )
    p.add_argument("--checkpoint", required=True, help="pretraining run dir or .safetensors")
    add_probe_data_options(p)
    p.add_argument(
        "--seed", type=int, default=0, help="training voxels and random inits (default 0)"
    )
    p.add_argument(
        "--max-voxels",
        type=int,
        default=50_000,
        help="training voxels sampled for the classifier (default 50000)",
    )
    p.add_argument(
        "--random-inits",
        type=int,
        default=3,
        help="random initialisations averaged for the random-init reference (default 3)",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N (the encoder only)")
    add_threads_option(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print only {"encoder": {class: dice}, "random_init": {...}, "patch_stats": {...}}',
    )
