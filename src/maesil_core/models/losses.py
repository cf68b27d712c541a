"""Reconstruction losses shared by the pretraining models.

Both take an optional ``valid`` weight, 1.0 on voxels of the scan and 0.0 on the padding
that brought a small volume up to the superpatch size (``batch["valid"]`` from
:func:`~maesil_core.data.make_pretrain_loader`): padding is constant and easy to predict,
and left in the loss it would outweigh the anatomy of a thin scan.
"""

from __future__ import annotations

import torch


def masked_patch_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor | None = None,
    kind: str = "mse",
) -> torch.Tensor:
    """Mean error over the voxels of the masked patches that are not padding.

    pred, target (B, L, P) patch values; mask (B, L) bool, True = masked; valid (B, L, P)
    weights or None (every voxel counts); kind "mse" or "l1". Without padding this is the
    MAE loss: the mean over masked patches of each patch's mean squared error.
    Returns 0 (no gradient signal) when every masked voxel is padding.
    """
    diff = pred.float() - target.float()
    err = diff.abs() if kind == "l1" else diff.pow(2)  # (B, L, P)
    weight = mask.to(err.dtype).unsqueeze(-1).expand_as(err)  # (B, L, P)
    if valid is not None:
        weight = weight * valid.to(err.dtype)
    return (err * weight).sum() / weight.sum().clamp(min=1e-6)


def valid_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None):
    """MSE of pred against target (B, C, D, H, W) over the voxels where valid (B, 1, D, H, W)
    is 1; the plain MSE when valid is None."""
    err = (pred.float() - target.float()).pow(2)
    if valid is None:
        return err.mean()
    weight = valid.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp(min=1e-6)
