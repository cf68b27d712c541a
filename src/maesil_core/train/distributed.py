"""PyTorch DDP under ``torchrun``: the same command line on one or many GPUs.

``torchrun --nproc-per-node 4 -m maesil_core pretrain ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def select_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` -> the local GPU when there is one, else the CPU.

    ``auto`` / ``cuda`` under torchrun give each process its own GPU (``LOCAL_RANK``, unless
    ``local_rank`` is given), so ``--nproc-per-node 4`` uses four GPUs, not GPU 0 four times.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device cuda was asked for but no CUDA GPU is available; use `device` cpu.",
                option="device",
            )
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s)."
            )
        return torch.device(name)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (a no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
