"""Patches <-> voxels: the one ``patchify`` / ``unpatchify`` of every patch-based model.

A volume (B, C, D, H, W) on a grid of patches ``patch`` = (pd, ph, pw) becomes L = gd*gh*gw
tokens of P = pd*ph*pw*C values: token i is the i-th patch in C order over the grid
(gd, gh, gw), the order :class:`~.vit3d.PatchEmbed3D` flattens them in, each flattened as
(pd, ph, pw, C) like MAE's ``models_mae.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grid_of(shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Patches per axis of a spatial ``shape`` (D, H, W) that ``patch`` divides."""
    return tuple(int(s) // int(p) for s, p in zip(shape, patch))  # type: ignore[return-value]


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, L, P); each row is one patch flattened as (pd, ph, pw, C)."""
    b, c, *spatial = x.shape
    (gd, gh, gw), (pd, ph, pw) = grid_of(spatial, patch), patch
    x = x.reshape(b, c, gd, pd, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gd, gh, gw, pd, ph, pw, C)
    return x.reshape(b, gd * gh * gw, pd * ph * pw * c)


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """(B, L, P) -> (B, C, D, H, W) on ``grid``; the exact inverse of :func:`patchify`."""
    b = tokens.shape[0]
    (gd, gh, gw), (pd, ph, pw) = grid, patch
    c = tokens.shape[-1] // (pd * ph * pw)
    x = tokens.reshape(b, gd, gh, gw, pd, ph, pw, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gd, pd, gh, ph, gw, pw)
    return x.reshape(b, c, gd * pd, gh * ph, gw * pw)
