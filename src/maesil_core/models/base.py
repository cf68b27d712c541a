"""What every pretraining model returns, so one training loop serves all methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PretrainOutput:
    """Result of ``model(x)`` for any pretraining method.

    loss: scalar tensor to minimise.
    pred: (B, C, D, H, W) the model's reconstruction of the input, in voxel space.
    mask: (B, 1, D, H, W) 1.0 where the input was hidden from the model, else 0.0
          (all zeros for plain autoencoders, which see everything).
    logs: extra scalars to log (e.g. ``{"kl": ..., "codebook_usage": ...}``).
    """

    loss: torch.Tensor
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)
