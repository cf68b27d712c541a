"""The optimisation pieces of a step: AdamW groups, the learning-rate schedule, precision."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, embeddings and tokens; fused on CUDA.

    A model may carry ``param_lr_scale`` ({parameter name: factor}, e.g. layer-wise lr
    decay when fine-tuning); each group then keeps an ``lr_scale`` applied to the schedule.
    """
    scales = getattr(model, "param_lr_scale", None) or {}
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith("token") or "pos_embed" in name
        buckets.setdefault((no_wd, float(scales.get(name, 1.0))), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_wd else cfg.weight_decay,
            "lr_scale": scale,
        }
        for (no_wd, scale), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.min_lr`` at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` times each group's ``lr_scale`` (layer-wise decay) into the optimiser."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def cpu_computes_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (Intel AMX tiles, PyTorch's own check):
    there oneDNN runs bf16 convolutions about twice as fast as fp32 (the smoke UNETR
    fine-tuning step 2.0x, benchmarks/finetune_rate.py); elsewhere bf16 is emulated, slower."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def autocast_dtype(cfg: TrainConfig | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (``cfg``: its TrainConfig, or the precision itself, as
    inference passes it); None means fp32.

    ``auto``: bf16 on GPUs that support it, else fp32. ``bf16``: bf16 on the CPU (PyTorch's
    CPU autocast) and on GPUs that support it; asked for on a GPU without bf16 it is a
    ConfigError, not a silent fp32 run.
    """
    precision = cfg if isinstance(cfg, str) else cfg.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(
            f"precision must be auto, bf16 or fp32, got {precision!r}.", option="precision"
        )
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise ConfigError(
                f"precision bf16 was asked for, but {torch.cuda.get_device_name(device)} has "
                "no bf16; use `precision` fp32 (or auto).",
                option="precision",
            )
        return None
    if precision == "bf16":
        if device.type == "cpu":
            return torch.bfloat16
        raise ConfigError(
            f"precision bf16 is not available on device {device.type}; use `precision` fp32.",
            option="precision",
        )
    return None
