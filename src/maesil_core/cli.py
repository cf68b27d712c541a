"""The ``maesil`` command line.

    maesil pretrain --data scans/ --out runs/tiny --preset tiny
    maesil reconstruct --checkpoint runs/tiny --input scan.nii.gz --out recon/
    maesil info runs/tiny

Multi-GPU: ``torchrun --nproc-per-node 4 -m maesil_core.cli pretrain ...`` (same flags).
A problem with the input or the settings prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import Cancelled, MaesilError

EXIT_USAGE = 2


class Progress:
    """A one-line progress bar on stderr (redrawn on a terminal, periodic lines otherwise)."""

    def __init__(self, stream=None, every_s: float = 5.0):
        stream = sys.stderr if stream is None else stream  # the stderr of now, not of import
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        phase = info.get("phase", "train")
        step, steps = int(info.get("step", 0)), int(info.get("steps", 0) or 1)
        width = 24
        filled = int(width * step / steps)
        bar = "#" * filled + "-" * (width - filled)
        parts = [f"[{bar}] {step}/{steps}"]
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4g}")
        if "volumes_per_s" in info:
            parts.append(f"{info['volumes_per_s']:.2f} vol/s")
        if "lr" in info:
            parts.append(f"lr {info['lr']:.2e}")
        for key in sorted(info):
            if key.startswith("val_") and isinstance(info[key], float):
                parts.append(f"{key} {info[key]:.3f}")
        if info.get("eta_s") is not None and phase == "train":
            parts.append(f"{_hms(info['eta_s'])} left")
        line = " | ".join(parts)
        final = phase in ("done", "cancelled", "checkpoint")
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:140] + ("\n" if final else ""))
        elif final or now - self._last >= self.every_s or step == steps:
            self.stream.write(line + "\n")
            self._last = now
        if phase == "checkpoint":
            self.stream.write(f"  checkpoint: {info.get('checkpoint')}\n")
        self.stream.flush()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _install_cancel() -> threading.Event:
    """First Ctrl-C / SIGTERM: stop after this step and write a checkpoint. Second: abort."""
    event = threading.Event()

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        sys.stderr.write("\nstopping after this step (checkpoint follows); Ctrl-C again to abort\n")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return event


# --------------------------------------------------------------------------- config from flags


def add_run_options(
    p: argparse.ArgumentParser,
    default_steps_help: str = "",
    *,
    preset_default: str | None = "tiny",
    preset_help: str = "named configuration (default: tiny, a CPU-sized model)",
) -> None:
    """Flags shared by ``pretrain`` and ``finetune``."""
    from .config import PRESETS

    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    p.add_argument("--preset", default=preset_default, choices=sorted(PRESETS), help=preset_help)
    p.add_argument(
        "--config",
        type=Path,
        help="JSON file overriding the preset "
        '(e.g. {"model": {"mask_ratio": 0.8}, "train": {"lr": 3e-4}})',
    )
    p.add_argument("--steps", type=int, help="optimiser steps" + default_steps_help)
    p.add_argument("--batch-size", type=int, help="superpatches per step and GPU")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="default: bf16 on GPUs that support it",
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: one per core; 1 is often faster on a shared "
        "or small CPU)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="target voxel spacing in mm (one or three numbers)",
    )
    p.add_argument(
        "--window",
        nargs="+",
        metavar="HU",
        help="HU window: a name (abdomen, lung, bone, brain, soft-tissue, wide) or LOW HIGH",
    )
    p.add_argument(
        "--intensity",
        choices=["auto", "hu", "percentile"],
        help="how voxel values map to [0, 1] (default auto: HU window, or percentiles "
        "for scans not in HU)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint with the run's own settings "
        "(--steps N extends it to N steps, --device / --threads move it; other settings are "
        "ignored). pretrain continues on the run's own scans unless --data is given",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")


def run_config_from_args(args: argparse.Namespace):
    """Preset -> --config file -> individual flags; validated."""
    from .config import ConfigError, load_config, preset

    cfg = preset(args.preset)
    if args.config:
        cfg = load_config(args.config, base=cfg)
    spacing = None
    if args.spacing:
        if len(args.spacing) not in (1, 3):
            raise ConfigError("--spacing takes one number or three (mm).")
        spacing = tuple(args.spacing * 3 if len(args.spacing) == 1 else args.spacing)
    window = None
    if args.window:
        if len(args.window) == 1:
            window = args.window[0]
        elif len(args.window) == 2:
            try:
                window = (float(args.window[0]), float(args.window[1]))
            except ValueError as exc:
                raise ConfigError("--window takes a name or two numbers LOW HIGH.") from exc
        else:
            raise ConfigError("--window takes a name or two numbers LOW HIGH.")
    cfg = cfg.override(
        "data",
        spacing=spacing,
        hu_window=window,
        intensity=args.intensity,
        num_workers=args.workers,
        augment=getattr(args, "augment", None),
    )
    cfg = cfg.override(
        "train",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        threads=args.threads,
    )
    return cfg


def resume_config(args: argparse.Namespace):
    """``--resume``: the run's own saved config with only ``--steps`` (to extend the run),
    ``--device`` and ``--threads`` taken from the command line; the preset's step count must
    not stretch the schedule. None when ``--out`` has no checkpoint (the API then says so)."""
    from .checkpoint import list_checkpoints, read_meta
    from .config import RunConfig

    found = list_checkpoints(args.out)
    if not found:
        return None
    cfg = RunConfig.from_dict(read_meta(found[-1])["config"])
    return cfg.override(
        "train",
        steps=args.steps,
        device=args.device or "auto",
        threads=getattr(args, "threads", None),
    )


# --------------------------------------------------------------------------- commands


def cmd_pretrain(args: argparse.Namespace) -> int:
    from . import api

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
    cancel = _install_cancel()
    result = api.pretrain(
        args.data,
        args.out,
        cfg,
        resume=args.resume,
        force=args.force,
        progress=Progress(),
        cancel=cancel,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    state = "stopped early" if result.cancelled else "finished"
    print(f"{state} at step {result.step}; checkpoint: {result.checkpoint}")
    print(f"loss curve: {Path(args.out) / 'loss.png'}; metrics: {Path(args.out) / 'metrics.csv'}")
    if result.cancelled:
        print(f"continue with: maesil pretrain --out {args.out} --resume ...")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from . import api
    from .checkpoint import load_checkpoint
    from .config import ConfigError
    from .figures import reconstruction_figure

    out = Path(args.out)
    targets = [out / f"{n}.nii.gz" for n in ("masked", "reconstruction", "mask", "error")]
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
        progress=Progress(),
    )
    written = rec.save(out, overwrite=args.force)
    window = cfg.data.window() if rec.units == "HU" else None
    panels = {
        "CT": rec.image,
        "masked": rec.masked,
        "reconstruction": rec.reconstruction,
        "error": rec.error,
    }
    fig = reconstruction_figure(
        out / "figure.png",
        panels,
        rec.affine,
        window=window,
        title=f"{Path(args.input).name}: {rec.extra['method']} {cfg.model.mask_mode if args.mask_mode is None else args.mask_mode} "
        f"mask, PSNR {rec.scores['psnr']:.2f} dB, SSIM {rec.scores['ssim']:.3f} (masked region)",
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    print(f"figure: {fig}")
    print(
        f"masked region: PSNR {rec.scores['psnr']:.2f} dB  SSIM {rec.scores['ssim']:.4f}  "
        f"MSE {rec.scores['mse']:.5f} (intensities scaled to [0, 1])"
    )
    if "interpolation_psnr" in rec.scores:
        print(
            f"  to beat, interpolating the visible voxels: PSNR "
            f"{rec.scores['interpolation_psnr']:.2f} dB  SSIM {rec.scores['interpolation_ssim']:.4f}"
        )
    if args.json:
        print(json.dumps(rec.scores))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import api

    info = api.describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            if not value:
                continue
            value = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
        print(f"{key.ljust(width)}  {value}")
    return 0


# --------------------------------------------------------------------------- parser


EXAMPLES = {
    "pretrain": """examples:
  maesil pretrain --out runs/demo                                 # tiny preset on the built-in CT phantom
  maesil pretrain --data ../shared/data/abdomen_ct/ct.nii.gz ../shared/data/chest_ct --out runs/ct --preset tiny --steps 300
  maesil pretrain --data scans/ dataset.json list.txt 'more/*.nii.gz' --out runs/base --preset base --device cuda
  maesil pretrain --out runs/ct --resume --steps 600               # continue (and extend) a run
  torchrun --nproc-per-node 4 -m maesil_core.cli pretrain --data scans/ --out runs/ddp --preset base""",
    "reconstruct": """examples:
  maesil reconstruct --checkpoint runs/demo --input scan.nii.gz --out recon/
  maesil reconstruct --checkpoint runs/demo/checkpoints/step_000300.safetensors --input dicom_folder/ --out recon/ --mask-mode block --mask-ratio 0.6""",
    "info": """examples:
  maesil info runs/demo
  maesil info runs/demo/checkpoints/step_000300.safetensors --json""",
}


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import available_methods

    parser = argparse.ArgumentParser(
        prog="maesil",
        description="Self-supervised 3D pretraining for CT: MAESIL superpatch masked autoencoders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'maesil COMMAND --help' for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"maesil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]):
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = command("pretrain", "pretrain a 3D encoder on unlabelled CT", cmd_pretrain)
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
        "--mask-mode", choices=["dual", "random", "block"], help="masking (default dual)"
    )
    p.add_argument("--mask-ratio", type=float, help="share of masked patches (default 0.75)")
    add_run_options(p)
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="no random flips, axial turns or contrast jitter of the training crops (on by "
        "default: trained on three scans, it reconstructs a held-out CT 3 dB better)",
    )

    p = command(
        "reconstruct", "mask and reconstruct a whole CT with a pretrained model", cmd_reconstruct
    )
    p.add_argument("--checkpoint", required=True, help="run directory or .safetensors file")
    p.add_argument("--input", required=True, help="CT file or DICOM folder")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--mask-mode", choices=["dual", "random", "block"], help="default: the model's")
    p.add_argument("--mask-ratio", type=float, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")

    p = command("info", "describe a checkpoint", cmd_info)
    p.add_argument("checkpoint", help="run directory or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")

    for extend in _EXTENSIONS:
        extend(sub, command)
    return parser


#: functions ``(subparsers, command)`` adding more commands (segmentation, benchmarks)
_EXTENSIONS: list[Callable[..., None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    if importlib.util.find_spec("maesil_core.cli_segment") is not None:
        from . import cli_segment  # noqa: F401  (registers finetune / segment / evaluate)
    from . import cli_probe  # noqa: F401  (registers probe)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except MaesilError as exc:
        print(f"maesil {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled:
        print(f"maesil {args.command}: cancelled", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"maesil {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmaesil {args.command}: aborted", file=sys.stderr)
        return 130
    finally:
        from .train.distributed import cleanup

        cleanup()


if __name__ == "__main__":
    # ``python -m maesil_core.cli`` (and ``torchrun -m maesil_core.cli``) runs this file as
    # ``__main__``, a second copy of the module: the extensions (finetune / segment /
    # evaluate) register into ``maesil_core.cli``, so run that module's main.
    from maesil_core.cli import main as _main

    sys.exit(_main())
