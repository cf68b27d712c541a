"""Random streams of a run: seeding, the RNG state a checkpoint keeps, and one stream per
DDP rank.

A new run seeds every generator from ``seed + rank``. A checkpoint keeps rank 0's RNG
states (torch, NumPy, Python, CUDA) as tensors, arrays and JSON
(:mod:`maesil_core.resume_state`). A resumed single-process run restores them and goes on
exactly where it stopped; a resumed DDP run gives each rank a fresh stream derived from
``(seed, rank, step)`` (:func:`rank_seed`): restoring rank 0's state on every rank would
make all ranks draw the same masks and crops.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank`` of a run continuing at ``step``: distinct for every
    (seed, rank, step), mixed by NumPy's SeedSequence (a hash, not a sum that collides)."""
    return int(
        np.random.SeedSequence([int(seed) % 2**32, int(rank), int(step)]).generate_state(1)[0]
    )


def data_seed(seed: int, start_step: int = 0) -> int:
    """Seed of the batch stream of a run that starts at ``start_step``: ``seed`` for a new
    run; a resumed run gets a fresh stream instead of replaying the crops of steps 0, 1, ...
    (the data loader's state is not saved: with worker processes it cannot be, exactly)."""
    return seed if start_step == 0 else (seed + 1_000_003 * start_step) % 2**31


def rng_state() -> dict[str, Any]:
    """The global generators' states: torch (uint8 tensor), NumPy (its ``get_state()``
    tuple with the key array), Python (``getstate()``, plain ints), CUDA (one per GPU)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (as stored: lists where tuples were fine)."""
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def resume_rng(saved: dict[str, Any] | None, seed: int, rank: int, world_size: int, step: int):
    """The random streams of a run resumed at ``step``: ``saved`` restored in a single
    process; with several ranks (or nothing saved) each rank's own stream from
    :func:`rank_seed`."""
    if saved and world_size == 1:
        set_rng_state(saved)
    else:
        seed_everything(rank_seed(seed, rank, step))
