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
import errno
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import Cancelled, MaesilError
from . import info, interop, pretrain, probe, reconstruct, segmentation
from .common import (
    EXIT_USAGE,
    SIGNALS,
    Progress,
    add_command,
    add_run_options,
    install_stop_signals,
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
    """Run one ``maesil`` command; its exit status. The SIGINT / SIGTERM handlers it sets
    are the caller's again when it returns (a test or a notebook calling it in-process)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            for signum, handler in before.items():
                if handler is not None:  # None: not set from Python, nothing to restore
                    signal.signal(signum, handler)


def _main(argv: Sequence[str] | None) -> int:
    install_stop_signals()
    try:  # building the parser imports torch (seconds): a signal may come meanwhile
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        given = list(sys.argv[1:] if argv is None else argv)
        return _interrupted(str(given[0]) if given else "")
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
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {Path(exc.filename).parent}" if exc.filename else ""
        print(
            f"maesil {args.command}: error: disk full{where} ({exc.strerror}); nothing "
            "half-written was kept: free some space and run the command again (a training "
            "run continues from its last checkpoint with --resume).",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:  # only if it ran: an import cut short by a signal must not be retried here
        distributed = sys.modules.get("maesil_core.train.distributed")
        if distributed is not None:
            distributed.cleanup()


def _interrupted(command: str) -> int:
    """The one line for a command stopped by SIGINT / SIGTERM before it could stop cleanly
    (while starting, reading data, or a second Ctrl-C); 128 + the signal's number."""
    signum = SIGNALS[-1] if SIGNALS else signal.SIGINT
    name = signal.Signals(signum).name
    if len(SIGNALS) > 1:  # the second of a training run: its checkpoints so far stay
        what = "aborted; the checkpoints written before are kept"
    else:
        what = "stopped before it finished; nothing was written"
    print(f"\nmaesil{' ' + command if command else ''}: {name}: {what}", file=sys.stderr)
    return 128 + int(signum)


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
