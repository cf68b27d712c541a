"""``maesil reconstruct``: mask and reconstruct a whole CT with a pretrained model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Progress, add_command, add_threads_option, check_output_dir

EXAMPLES = """examples:
  maesil reconstruct --checkpoint runs/demo --input scan.nii.gz --out recon/
  maesil reconstruct --checkpoint runs/demo/checkpoints/step_000300.safetensors --input dicom_folder/ --out recon/ --mask-mode block --mask-ratio 0.6"""


def run(args: argparse.Namespace) -> int:
    from .. import api
    from ..checkpoint import load_checkpoint
    from ..errors import ConfigError
    from ..figures import REFERENCE_PANEL, reconstruction_figure, reconstruction_title

    out = check_output_dir(args.out)
    targets = [out / f"{n}.nii.gz" for n in api.Reconstruction.FILES]
    targets.append(out / "figure.png")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.force:
        raise ConfigError(
            f"{out} already holds a reconstruction ({existing[0]}); pass --force "
            "to overwrite it or choose another --out."
        )
    cfg = load_checkpoint(args.checkpoint).config
    rec = api.reconstruct(
        args.checkpoint,
        args.input,
        mask_mode=args.mask_mode,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        device=args.device or "auto",
        threads=args.threads,
        precision=args.precision,
        progress=Progress(),
    )
    written = rec.save(out, overwrite=args.force)
    window = cfg.data.window() if rec.units == "HU" else None
    panels = {
        "CT": rec.image,
        "masked": rec.masked,
        "reconstruction": rec.reconstruction,
        REFERENCE_PANEL: rec.interpolation,  # the score to beat, as a picture
        "error": rec.error,
    }
    fig = reconstruction_figure(
        out / "figure.png",
        panels,
        rec.affine,
        window=window,
        title=reconstruction_title(
            Path(args.input).name,
            rec.extra["method"],
            cfg.model.mask_mode if args.mask_mode is None else args.mask_mode,
            rec.scores,
        ),
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"figure: {fig}")
    print(
        f"masked region: PSNR {rec.scores['psnr']:.2f} dB  SSIM {rec.scores['ssim']:.4f}  "
        f"MSE {rec.scores['mse']:.5f} (intensities scaled to [0, 1])"
    )
    if "interpolation_psnr" in rec.scores:
        s = rec.scores
        print(
            f"  to beat, interpolating the visible voxels: PSNR "
            f"{s['interpolation_psnr']:.2f} dB  SSIM {s['interpolation_ssim']:.4f}"
        )
        print(
            f"  masked-voxel MSE {s['mse'] / s['mean_fill_mse']:.2f}x that of filling them with "
            f"the mean of the visible voxels (interpolation: "
            f"{s['interpolation_mse'] / s['mean_fill_mse']:.2f}x)"
        )
    if args.json:
        print(json.dumps(rec.scores))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "reconstruct",
        "mask and reconstruct a whole CT with a pretrained model",
        run,
        EXAMPLES,
    )
    p.add_argument("--checkpoint", required=True, help="run directory or .safetensors file")
    p.add_argument("--input", required=True, help="CT file or DICOM folder")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--mask-mode", choices=["dual", "random", "block"], help="default: the model's")
    p.add_argument("--mask-ratio", type=float, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto (default): bf16 on a GPU that has it, fp32 on the CPU",
    )
    add_threads_option(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")
