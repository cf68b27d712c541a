"""Run directories: creating one without losing an earlier run, and what a resumed run
continues with.

A run directory (``--out``) holds ``config.json``, ``metrics.csv``, ``loss.png``,
``tensorboard/``, ``checkpoints/`` and, for fine-tuning, ``best.safetensors`` / ``best.json``
(:data:`RUN_OUTPUTS`). A new run refuses a directory that holds one unless ``force``; a
resumed one needs a checkpoint in it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import Checkpoint, list_checkpoints, load_checkpoint
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
