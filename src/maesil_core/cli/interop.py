"""``maesil export`` and ``maesil import``: checkpoints to and from MONAI's formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command, add_preset_option, check_output_dir, check_output_file

FORMATS = {
    "monai-bundle": "a fine-tuned segmenter as a MONAI Bundle (configs/, models/model.pt, docs/, LICENSE)",
    "monai-vit": "the encoder as a monai.networks.nets.ViT state dict (strict=True)",
    "monai-unetr": "a segmenter of MONAI's UNETR shape as a monai.networks.nets.UNETR state dict",
}

EXPORT_EXAMPLES = """examples:
  maesil export --checkpoint runs/seg --format monai-bundle --out bundles/liver
  python -m monai.bundle run --config_file bundles/liver/configs/inference.json \\
      --bundle_root bundles/liver --dataset_dir scans/ --output_dir out/
  maesil export --checkpoint runs/ct --format monai-vit --out vit.pt   # + vit.json: ViT(**kwargs)
  maesil export --checkpoint runs/ct --format monai-vit --out vit.pt --img-size 96 96 96
  maesil export --checkpoint runs/seg16 --format monai-unetr --out unetr.pt  # patch 16, 12 blocks

formats:
""" + "\n".join(f"  {name:<13} {text}" for name, text in FORMATS.items())

IMPORT_EXAMPLES = """examples:
  maesil import --from monai-vit ssl_vit.pt --preset mim-med3d --out runs/monai_ssl
  maesil import --from monai-vit vit.pt --config vit.json --img-size 96 96 96 --out runs/monai
  maesil finetune --pretrained runs/monai_ssl --images ct/ --labels labels/ --out runs/seg

The weights' shape (width, blocks, patch, MLP) must match the preset / --config, which also
gives what weights cannot tell: the number of heads. The result holds the encoder exactly
(LayerNorm eps 1e-5, MONAI's position embedding) and a fresh reconstruction decoder:
fine-tune or probe it, or continue pretraining (maesil pretrain --out RUN --resume --data ...)
before reconstructing. Which configurations map exactly: docs/interop.md."""


def _img_size(values: list[int] | None) -> tuple[int, ...] | None:
    from ..errors import ConfigError

    if not values:
        return None
    if len(values) not in (1, 3) or min(values) < 1:
        raise ConfigError("--img-size takes one positive number or three (D H W voxels).")
    return tuple(values)


def run_export(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..interop import monai_bundle, monai_vit

    if args.format == "monai-bundle":
        check_output_dir(args.out)
    else:  # an existing file is refused (or replaced with --force) by the exporter
        check_output_file(args.out, force=True, example="vit.pt")
    if args.format == "monai-bundle":
        if args.img_size:
            raise ConfigError(
                "--img-size applies to monai-vit / monai-unetr; a bundle slides windows of the "
                "model's ROI over the whole CT: leave --img-size out."
            )
        out = monai_bundle.export_bundle(args.checkpoint, args.out, force=args.force)
        print(f"MONAI Bundle: {out}")
        print(
            f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json "
            f"--bundle_root {out} --dataset_dir SCANS --output_dir OUT"
        )
        return 0
    export = monai_vit.export_unetr if args.format == "monai-unetr" else monai_vit.export_vit
    result = export(args.checkpoint, args.out, img_size=_img_size(args.img_size), force=args.force)
    print(f"weights: {result.path} (monai.networks.nets.{result.net}, load with strict=True)")
    print(f"kwargs:  {result.kwargs_path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..config import start_config
    from ..interop import monai_vit

    check_output_dir(args.out)
    cfg = start_config(args.preset, args.config)
    path = monai_vit.import_vit(
        args.weights, args.out, cfg, img_size=_img_size(args.img_size), force=args.force
    )
    print(f"checkpoint: {path}")
    print(
        f"fine-tune it: maesil finetune --pretrained {args.out} --images CT --labels LABELS "
        "--out RUN"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        "export a checkpoint as a MONAI Bundle or MONAI ViT / UNETR weights",
        run_export,
        EXPORT_EXAMPLES,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (a segmentation run: its best checkpoint) or .safetensors",
    )
    p.add_argument("--format", required=True, choices=list(FORMATS), help="what to write")
    p.add_argument(
        "--out", required=True, type=Path, help="bundle folder, or weights file (.pt, .safetensors)"
    )
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="VOX",
        help="input size MONAI's ViT / UNETR will take (its position embedding is fixed to "
        "it); default: the superpatch, or the segmentation ROI",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = add_command(
        sub,
        "import",
        "turn MONAI ViT weights into a maesil pretraining checkpoint",
        run_import,
        IMPORT_EXAMPLES,
    )
    p.add_argument(
        "--from", dest="source", required=True, choices=["monai-vit"], help="weights format"
    )
    p.add_argument(
        "weights",
        help="state dict (.pt, .pth, .safetensors) of a MONAI ViT or of a model holding one "
        "(UNETR, ViTAutoEnc); read without unpickling objects",
    )
    add_preset_option(
        p,
        None,
        "architecture and training settings (default: the --config file's preset, else tiny)",
    )
    p.add_argument("--config", type=Path, help="JSON file overriding the preset, e.g. the heads")
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="VOX",
        help="the img_size the ViT was built for (default: the preset's superpatch)",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--force", action="store_true", help="replace the checkpoints in --out")
