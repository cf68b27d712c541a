"""How many CPU threads torch computes with: ``0`` / ``auto`` is one per free core.

torch starts one intra-op thread per physical core. On a machine shared with other jobs
those threads spin-wait for each other (OpenMP) on cores that other processes hold: on 2
busy cores the 3 mm smoke preset (then called tiny) pretrained 24x slower with 2 threads than with 1
(BENCHMARKS.md, "CPU threads"). ``auto`` therefore counts the cores this process may run
on (``os.sched_getaffinity``, at most torch's own default), subtracts the 1-minute load
average (the processes already running or waiting for a core) and keeps the rest, at
least one (divided among the processes ``torchrun`` starts on the machine)::

    threads = max(1, min(cores, round(cores - load)))

An explicit ``OMP_NUM_THREADS`` is the user's choice and wins over the guess. Whatever is
chosen is set with ``torch.set_num_threads`` for one run and restored afterwards
(:func:`torch_threads`), so a caller in the same process (napari) keeps its own setting.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: the ``threads`` value that means "choose": TrainConfig.threads, ``--threads auto`` / 0
AUTO = 0

#: torch's own default (one per physical core), read once before anything changes it
_TORCH_DEFAULT = torch.get_num_threads()


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count of a run and why: ``auto`` False when the user gave it."""

    threads: int
    auto: bool
    cores: int = 0
    load: float = 0.0
    reason: str = ""

    def describe(self) -> str:
        """One line for the user, e.g. ``1 CPU thread (auto: 2 cores, load average 9.5)``."""
        s = "" if self.threads == 1 else "s"
        if not self.auto:
            return f"{self.threads} CPU thread{s} (--threads)"
        if self.reason:
            return f"{self.threads} CPU thread{s} ({self.reason})"
        return (
            f"{self.threads} CPU thread{s} (auto: {self.cores} cores, load average "
            f"{self.load:.1f}; --threads N to choose)"
        )


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at most torch's default."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, _TORCH_DEFAULT))


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int | None = None, load: float | None = None) -> ThreadChoice:
    """One thread per core not already busy (see the module doc); ``OMP_NUM_THREADS`` wins."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), True, reason=f"OMP_NUM_THREADS={env}")
    cores = usable_cores() if cores is None else int(cores)
    load = load_average() if load is None else float(load)
    free = cores - load if math.isfinite(load) else 1
    # torchrun on CPUs: the processes of this machine share its free cores
    sharing = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return ThreadChoice(max(1, min(cores, round(free)) // sharing), True, cores, load)


def choose_threads(threads: int | None) -> ThreadChoice:
    """``threads`` > 0 as given; 0 / None: :func:`auto_threads`."""
    if threads:
        return ThreadChoice(int(threads), False)
    return auto_threads()


@contextlib.contextmanager
def torch_threads(threads: int | None, device: torch.device | str | None = None) -> Iterator:
    """Compute with ``threads`` torch threads (0 / None: auto) inside the block, then put
    back the count there was before; yields the :class:`ThreadChoice` (None on a GPU, where
    torch's CPU threads are left alone)."""
    if device is not None and torch.device(device).type != "cpu":
        yield None
        return
    choice = choose_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)


__all__ = [
    "AUTO",
    "ThreadChoice",
    "auto_threads",
    "choose_threads",
    "load_average",
    "torch_threads",
    "usable_cores",
]
