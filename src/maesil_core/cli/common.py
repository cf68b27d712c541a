"""What every ``maesil`` command shares: the progress line, Ctrl-C handling, the run
options of ``pretrain`` / ``finetune`` (flags -> :class:`~maesil_core.config.RunConfig`) and
:func:`add_command`, which each command module's ``register(sub)`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: exit status of a problem with the input or the settings (one line on stderr)
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    func: Command,
    examples: str | None = None,
) -> argparse.ArgumentParser:
    """A ``maesil NAME`` subcommand running ``func(args) -> exit status``, with ``examples``
    (text after ``examples:``) at the end of its ``--help``."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


class Progress:
    """Progress of a long command on stderr, drawn by tqdm.

    On a terminal: a live tqdm bar per phase (training steps, sliding windows, cases, tiles)
    with loss, volumes/s, lr and validation Dice after it. Elsewhere (a log file, a batch
    job): the same line in ASCII every ``every_s`` seconds and at the end of a phase, one per
    line, so logs stay readable. Under ``torchrun`` only rank 0 prints. Rates and the time
    left count from the first step this command saw (a resumed run starts at its step).
    What happens before the first step (``phase`` ``prepare``: the scans found, the CPU
    threads, the step a run resumes from) prints as plain lines on stdout.
    """

    #: what the steps of each phase count
    UNITS = {"train": "step", "segment": "window", "evaluate": "case", "reconstruct": "tile"}

    def __init__(self, stream=None, every_s: float = 5.0):
        stream = sys.stderr if stream is None else stream  # the stderr of now, not of import
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every_s = every_s
        self.quiet = int(os.environ.get("RANK", "0") or 0) != 0
        self._bar: Any = None
        self._key: tuple[str, int] | None = None
        self._first = (0, time.monotonic())  # (step, time) where the current phase started
        self._last = 0.0

    @staticmethod
    def _postfix(info: dict[str, Any]) -> str:
        parts = []
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4g}")
        if "volumes_per_s" in info:
            parts.append(f"{info['volumes_per_s']:.2f} vol/s")
        if "lr" in info:
            parts.append(f"lr {info['lr']:.2e}")
        for key in sorted(info):
            if key.startswith("val_") and isinstance(info[key], float):
                parts.append(f"{key} {info[key]:.3f}")
        return " | ".join(parts)

    def __call__(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        phase = info.get("phase", "train")
        if phase == "checkpoint":
            self._write(f"  checkpoint: {info.get('checkpoint')}")
            return
        if phase == "prepare":  # what happens before the first step: lines on stdout
            if info.get("message"):
                print(str(info["message"]), flush=True)
            return
        final = phase in ("done", "cancelled")
        step, steps = int(info.get("step", 0)), max(1, int(info.get("steps", 0) or 1))
        unit = "step" if final else self.UNITS.get(phase, "step")
        key = (unit, steps)
        if key != self._key and not final:  # a new phase: its own bar, rate and time left
            self.close()
            self._key = key
            self._first = (step, time.monotonic())
            if self.tty:
                self._bar = tqdm(
                    total=steps, initial=step, unit=unit, file=self.stream, dynamic_ncols=True
                )
        postfix = self._postfix(info)
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
            if final or step >= steps:
                self.close()
            return
        now = time.monotonic()
        if final or step >= steps or now - self._last >= self.every_s:
            first_step, t0 = self._first
            line = tqdm.format_meter(
                step, steps, now - t0, ascii=True, unit=unit, postfix=postfix or None,
                ncols=120, initial=first_step,
            )  # fmt: skip
            self._write(line + (f" ({phase})" if final else ""))
            self._last = now

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the current phase's bar (the next report starts a new one)."""
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._key = None


@contextlib.contextmanager
def plain_warnings(command: str, stream=None) -> Iterator[None]:
    """Inside the block, a warning prints as one line, ``maesil COMMAND: warning: TEXT``,
    without Python's source line, and each text once (a scan read twice, by the training
    and the validation chain, warns once)."""
    shown: set[str] = set()
    before = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        if text in shown:
            return
        shown.add(text)
        out = stream if stream is not None else sys.stderr
        out.write(f"maesil {command}: warning: {text}\n")
        out.flush()

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


#: exit status of a training run stopped early by SIGINT / SIGTERM after writing a
#: checkpoint: EX_TEMPFAIL, "try again" (--resume); a scheduler tells it from a finished run
EXIT_STOPPED = 75
#: the signals received, newest last (for the exit status and the message)
SIGNALS: list[int] = []


def install_stop_signals() -> None:
    """SIGINT and SIGTERM stop the command at once (a KeyboardInterrupt that :func:`main`
    turns into one line and status 128 + the signal): set first thing, so a signal while
    the command starts is no traceback and SIGTERM no silent kill."""

    def handler(signum, frame):
        SIGNALS.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def install_cancel() -> threading.Event:
    """First Ctrl-C / SIGTERM: stop after this step and write a checkpoint. Second: abort."""
    event = threading.Event()

    def handler(signum, frame):
        SIGNALS.append(signum)
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        name = signal.Signals(signum).name
        sys.stderr.write(
            f"\n{name}: stopping after this step (checkpoint follows); Ctrl-C again to abort\n"
        )

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return event


def stopped_early(
    command: str, run: str | Path, step: int, history: list[dict[str, float]] | None = None
) -> int:
    """The line a training run stopped by a signal ends with (stderr), and its status. The
    run's ``loss.png`` is drawn here from ``history``: a stopping run leaves it out."""
    if history:
        from ..figures import plot_loss

        plot_loss(history, Path(run) / "loss.png")
    by = f" by {signal.Signals(SIGNALS[-1]).name}" if SIGNALS else ""
    print(
        f"maesil {command}: stopped early{by} at step {step}, resumable: "
        f"maesil {command} --out {run} --resume",
        file=sys.stderr,
    )
    return EXIT_STOPPED


# --------------------------------------------------------------------------- outputs


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be made or written
    (a read-only folder or mount, a path under a file); nothing is created here."""
    from ..errors import ConfigError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder (or move the file away).")
    _check_writable(path, flag)
    return path


def check_output_file(
    path: str | Path, flag: str = "--out", *, force: bool = False, example: str = "out.nii.gz"
) -> Path:
    """Refuse, before any work, an output file that is a folder, exists (without ``force``)
    or cannot be written where it is asked for; nothing is created here."""
    from ..errors import ConfigError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name (e.g. {path / example}).")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it or choose another {flag}.")
    _check_writable(path.parent, flag)
    return path


def _check_writable(folder: Path, flag: str) -> None:
    """ConfigError unless a file can be created in ``folder`` or, when it does not exist yet,
    in its nearest existing parent (probed with an unnamed temporary file: ``os.access``
    says yes to root on a read-only folder)."""
    import tempfile

    from ..errors import ConfigError

    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} {folder}: {existing} is a file, so no folder can be made there; "
            f"choose another {flag}."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{flag} {folder}: cannot write in {existing} ({exc.strerror or exc}); choose "
            f"another {flag} or make the folder writable."
        ) from exc


# --------------------------------------------------------------------------- config from flags


THREADS_HELP = (
    "CPU threads for torch: a number, or auto (default): one per core that other jobs "
    "leave free by the load average, at least 1 (on a busy machine a second thread makes "
    "training many times slower); OMP_NUM_THREADS, when set, is taken as given"
)


def parse_threads(text: str) -> int:
    """``--threads`` values: ``auto`` (0, as in ``TrainConfig.threads``) or a count."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of threads, got {text!r}")
    return value


def add_preset_option(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--preset NAME``, its choices listed in ``--help``. The name is checked where the
    config is built (:func:`maesil_core.config.preset`): one line that names the fix, and a
    renamed preset's new name, where argparse's ``choices`` print the usage too."""
    from ..config import PRESETS

    choices = "{" + ",".join(PRESETS) + "}"
    p.add_argument("--preset", default=default, metavar=choices, help=help)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N|auto`` (default auto: :func:`maesil_core.threads.auto_threads`)."""
    p.add_argument("--threads", type=parse_threads, metavar="N|auto", help=THREADS_HELP)


def add_run_options(
    p: argparse.ArgumentParser,
    default_steps_help: str = "",
    *,
    preset_default: str | None = None,
    preset_help: str = "named configuration (default: the --config file's preset, else tiny, "
    "a CPU-sized model)",
    config_help: str = "JSON file overriding the preset "
    '(e.g. {"model": {"mask_ratio": 0.8}, "train": {"lr": 3e-4}})',
    batch_help: str = "superpatches per step and GPU",
) -> None:
    """Flags shared by ``pretrain`` and ``finetune`` (each says what its batch and its
    ``--config`` hold)."""
    p.add_argument("--out", required=True, type=Path, help="run directory (created)")
    add_preset_option(p, preset_default, preset_help)
    p.add_argument("--config", type=Path, help=config_help)
    p.add_argument("--steps", type=int, help="optimiser steps" + default_steps_help)
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument(
        "--accum-steps",
        type=int,
        help="gradient accumulation: optimiser steps of batch size x N superpatches per GPU, "
        "e.g. --batch-size 4 --accum-steps 4 on a smaller card keeps base's 16 and its lr",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="peak learning rate for the whole step (batch x accumulation x GPUs); for another "
        "total scale the preset's by the square root (config.scaled_lr)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        help="default (auto): bf16 on GPUs that support it; finetune also on a CPU that "
        "computes bf16 natively (Intel AMX), about twice as fast there",
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument(
        "--workers",
        type=int,
        help="data loader worker processes (default: none on a CPU, on a GPU the CPU cores "
        "less one, at most 16; the smoke, tiny and cpu presets: none)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default off: on a CPU it took 100-130 s to compile and "
        "gained 2-36 %%; on a GPU not yet measured)",
    )
    add_threads_option(p)
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


def run_config_from_args(args: argparse.Namespace, stage: str = "pretrain"):
    """Preset (its ``stage`` settings) -> --config file -> individual flags; validated."""
    from ..config import ConfigError, start_config

    cfg = start_config(args.preset, args.config, stage)
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
        augment_on=getattr(args, "augment_on", None),
    )
    cfg = cfg.override(
        "train",
        steps=args.steps,
        batch_size=args.batch_size,
        accum_steps=getattr(args, "accum_steps", None),
        lr=args.lr,
        device=args.device,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        threads=args.threads,
        compile=getattr(args, "compile", None),
    )
    return cfg


def resume_config(args: argparse.Namespace):
    """``--resume``: the run's own saved config with only ``--steps`` (to extend the run),
    ``--device`` and ``--threads`` taken from the command line; the preset's step count must
    not stretch the schedule. None when ``--out`` has no checkpoint (the API then says so)."""
    from ..checkpoint import list_checkpoints, read_meta

    found = list_checkpoints(args.out)
    if not found:
        return None
    cfg = read_meta(found[-1]).config
    return cfg.override(
        "train",
        steps=args.steps,
        device=args.device or "auto",
        threads=getattr(args, "threads", None),
    )
