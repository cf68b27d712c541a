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
:class:`~maesil_core.errors.MaesilError` (exit 2, one line); :func:`main` prints it with the
settings it names written as this command's flags (:func:`flag_names`).
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


#: settings whose name in the Python API / configs differs from their flag's ``dest``
API_NAMES = {"run_dir": "out", "image": "input", "num_workers": "workers", "hu_window": "window"}


def flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """``{setting: flag}`` of one command (``{"n_labelled": "--n-labelled", "run_dir":
    "--out", ...}``): how the CLI writes the settings an error names
    (:meth:`~maesil_core.errors.MaesilError.render`)."""
    sub = parser._subparsers._group_actions[0].choices.get(command) if parser._subparsers else None
    if sub is None:
        return {}
    flags = {a.dest: a.option_strings[-1] for a in sub._actions if a.option_strings}
    flags.update({api: flags[dest] for api, dest in API_NAMES.items() if dest in flags})
    return flags


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
        message = exc.render(flag_names(parser, args.command))
        print(f"maesil {args.command}: error: {message}", file=sys.stderr)
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
    "flag_names",
    "main",
    "resume_config",
    "run_config_from_args",
]
