"""Run directories: creating one without losing an earlier run, and what a resumed run
continues with.

A run directory (``--out``) holds ``config.json``, ``metrics.csv``, ``loss.png``,
``tensorboard/``, ``checkpoints/`` and, for fine-tuning, ``best.safetensors`` / ``best.json``
(:data:`RUN_OUTPUTS`). A new run refuses a directory that holds one unless ``force``; a
resumed one needs a checkpoint in it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import CKPT_DIR, Checkpoint, list_checkpoints, load_checkpoint
from .config import RunConfig
from .errors import ConfigError
from .train import distributed as D

RUN_OUTPUTS = (
    "checkpoints",
    "metrics.csv",
    "loss.png",
    "config.json",
    "tensorboard",
    "best.safetensors",
    "best.json",
)


def prepare_run_dir(run_dir: str | Path, *, resume: bool, force: bool) -> Path:
    """Create ``run_dir``; refuse to overwrite an earlier run unless ``force`` (or ``resume``)."""
    run_dir = Path(run_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; `run_dir` needs a directory.", option="run_dir")
    has_run = run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_OUTPUTS)
    if resume:
        if not list_checkpoints(run_dir):
            raise ConfigError(
                f"`resume`: {run_dir} has no checkpoint to resume from; start without `resume`.",
                option="resume",
            )
        remove_stale_temporaries(run_dir)
        return run_dir
    if has_run:
        if not force:
            raise ConfigError(
                f"{run_dir} already holds a run; pass `resume` to continue it, `force` to "
                "overwrite it, or choose another `run_dir`.",
                option="run_dir",
            )
        if D.launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
            return run_dir
        for name in RUN_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    return run_dir


def resumed_config(saved: RunConfig, cfg: RunConfig | None) -> RunConfig:
    """The config a resumed run continues with: the run's own ``saved`` one, with from ``cfg``
    only the step count (never fewer than planned: a preset must not cut the schedule short),
    the device and the CPU threads (the machine may differ from the run's first one)."""
    if cfg is not None:
        saved.train.steps = max(saved.train.steps, cfg.train.steps)
        saved.train.device = cfg.train.device
        saved.train.threads = cfg.train.threads
    return saved


def resume_from(run_dir: str | Path, *, kind: str | None = None) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that a ``--resume`` continues (metadata only: the
    weights are loaded by :func:`~maesil_core.train.fit`); ConfigError when there is none,
    CheckpointError when it is of another ``kind``."""
    prepare_run_dir(run_dir, resume=True, force=False)
    return load_checkpoint(list_checkpoints(run_dir)[-1], kind=kind, weights_too=False)


#: the lock a run holds on its folder while it runs (fcntl.flock: released by the kernel
#: when the process ends, also by kill -9, so a dead run never blocks the next one)
LOCK_NAME = ".maesil.lock"
#: files.atomic_write's temporary names: ``.TARGET.`` + mkstemp's 8 characters + a suffix
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp|\.nii\.gz|\.nii)$")


@contextmanager
def claimed_run_dir(run_dir: str | Path, *, resume: bool) -> Iterator[None]:
    """Hold ``run_dir`` for one run: a second run on it meanwhile (also with ``force`` or
    ``resume``) is refused with a ConfigError naming the first one's pid; and a new run that
    fails before its first checkpoint (a bad scan found while loading, a loss that became
    NaN, Ctrl-C while reading the data) leaves ``run_dir`` as it found it: what the run
    created there is removed, and the folder itself if the run made it, so a plain rerun is
    not told the folder "already holds a run". A resumed run, or one with a checkpoint
    written, keeps everything (the checkpoint is what a rerun resumes). Under torchrun only
    rank 0 locks and cleans."""
    run_dir = Path(run_dir).expanduser()
    main_rank = not D.launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0
    existed = run_dir.is_dir()
    before = set(os.listdir(run_dir)) if existed else set()
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # folders it will make
    lock = None
    try:
        if main_rank and (run_dir.is_dir() or not (resume or run_dir.exists())):
            lock = _lock(run_dir)
        yield
    finally:  # failed, or cancelled before its first checkpoint: leave nothing
        if lock is not None:  # no file left: a run folder holds only its outputs
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            lock.close()  # releases the flock
        if not resume and main_rank and run_dir.is_dir() and not list_checkpoints(run_dir):
            for name in set(os.listdir(run_dir)) - before:
                target = run_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            for folder in made:  # run_dir first, then the parents it made, while empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


def _lock(run_dir: Path):
    """An open file holding an exclusive flock on ``run_dir/.maesil.lock`` (this pid in it),
    or a ConfigError when another process holds it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held until the run ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ConfigError(
            f"{run_dir} is in use by another maesil run (pid {holder}); wait for it to end "
            "or choose another `run_dir`.",
            option="run_dir",
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """What a killed run left half-written: atomic writes' temporary files (``.NAME.*``) in
    the run and its checkpoints, and checkpoint pieces without their ``.json`` (the last
    file a checkpoint writes). Called by a run that holds the folder."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CKPT_DIR
    for folder in (run_dir, ckpt_dir):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and _TEMPORARY.match(p.name):
                    p.unlink(missing_ok=True)
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob("step_*"):
            if p.is_file() and not (ckpt_dir / (p.name.split(".")[0] + ".json")).is_file():
                p.unlink(missing_ok=True)
