"""The ``maesil`` command line: one module per command group, registered explicitly.

    maesil pretrain --data scans/ --out runs/tiny --preset tiny
    maesil reconstruct --checkpoint runs/tiny --input scan.nii.gz --out recon/
    maesil info runs/tiny
    maesil finetune / segment / evaluate / probe ...

``python -m maesil_core`` is the same command; multi-GPU:
``torchrun --nproc-per-node 4 -m maesil_core pretrain ...`` (same flags).
A problem with the input or the settings prints one line and exits with status 2.

Adding a command
----------------
Write one module here, ``cli/NAME.py``, with a ``register(sub)`` function that calls
:func:`~.common.add_command` (name, help, the function ``run(args) -> exit status``, the
``--help`` examples) and adds the command's flags; then add the module to :data:`COMMANDS`
below (one line). Shared pieces (the progress line, Ctrl-C handling, the run options of
``pretrain`` / ``finetune``) are in :mod:`.common`. A command module imports the engine
(``..api``, ``..segmentation``, ...) inside ``run``, so ``maesil --help`` stays fast, and never
touches another command module's state. Errors: raise a
:class:`~maesil_core.errors.MaesilError` (exit 2, one line); :func:`main` prints it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import Cancelled, MaesilError
from . import info, interop, pretrain, probe, reconstruct, segmentation
from .common import (
    EXIT_USAGE,
    Progress,
    add_command,
    add_run_options,
    plain_warnings,
    resume_config,
    run_config_from_args,
)

#: the command modules, in the order ``maesil --help`` lists them; each has ``register(sub)``
COMMANDS = (pretrain, reconstruct, info, segmentation, probe, interop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maesil",
        description="Self-supervised 3D pretraining for CT: MAESIL superpatch masked autoencoders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'maesil COMMAND --help' for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"maesil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        with plain_warnings(args.command):
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
        from ..train.distributed import cleanup

        cleanup()


__all__ = [
    "COMMANDS",
    "EXIT_USAGE",
    "Progress",
    "add_command",
    "add_run_options",
    "build_parser",
    "main",
    "resume_config",
    "run_config_from_args",
]
