"""What every pretraining model returns, so one training loop serves all methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masking import TokenMask


@dataclass
class PretrainOutput:
    """Result of ``model(x)`` for any pretraining method: what the training step needs.

    loss: scalar tensor to minimise.
    pred: the prediction the loss was computed on: (B, L, P) patches for the masked models
          (MAESIL, MAE, SimMIM; GL-MAE: its global view's patches), (B, C, D, H, W) voxels for
          the conv autoencoders. ``model.to_voxels(x, pred)`` gives the voxel picture.
    mask: the :class:`~.masking.TokenMask` of ``pred``'s tokens (None for the autoencoders,
          which see everything).
    logs: extra scalars to log (e.g. ``{"kl": ..., "codebook_usage": ...}``), floats or
          0-dim tensors (read when a log row is written, not every step).
    """

    loss: torch.Tensor
    pred: torch.Tensor | None = None
    mask: TokenMask | None = None
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)
