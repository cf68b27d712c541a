"""MAE-3D and SimMIM, the two masked-image-modelling baselines of MIM-Med3D (Chen et al., WACV 2023).

- :class:`MAE3D`   MAE on 3D patches: random patch masking at a high ratio, the encoder sees the
  visible tokens only, a light transformer decoder predicts every patch, MSE on masked patches.
  It is :class:`~.maesil.MAESIL` with the masking fixed to ``"random"`` (MIM-Med3D's choice);
  the MIM-Med3D sizes (96^3 input, 16^3 patches, decoder 512 x 8) are the ``mim-med3d`` preset.
- :class:`SimMIM`  the encoder runs over the FULL grid with a learnable mask token in place of
  every masked patch embedding; a single linear head maps each encoded token back to its voxels;
  the loss (L1, SimMIM's choice; ``extra["simmim_loss"] = "mse"`` switches) is on masked patches.

Both expose ``.encoder`` (:class:`~.vit3d.ViTEncoder3D`) for segmentation fine-tuning, and
``forward`` / ``to_voxels`` / ``reconstruct`` with the contract of :class:`~.maesil.MAESIL`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import ModelConfig
from .base import PretrainOutput
from .losses import masked_patch_loss
from .maesil import MAESIL
from .masking import TokenMask, paste_visible
from .patches import patchify, unpatchify
from .vit3d import ViTEncoder3D, init_vit_weights


class MAE3D(MAESIL):
    """3D MAE (MIM-Med3D): MAESIL's model with uniformly random patch masking.

    ``cfg.mask_mode`` is ignored for training (always ``"random"``); ``reconstruct(mode=...)``
    still accepts another mode for side-by-side evaluation.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(dataclasses.replace(cfg, mask_mode="random"))


class SimMIM(nn.Module):
    """SimMIM in 3D: mask tokens inside the encoder over the full grid, a linear head, loss on masked patches."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = tuple(cfg.grid)
        self.patch = tuple(cfg.patch)
        self.encoder = ViTEncoder3D(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.head = nn.Linear(cfg.embed_dim, math.prod(cfg.patch) * cfg.in_channels)
        init_vit_weights(self.head)
        nn.init.normal_(self.mask_token, std=0.02)
        self.loss_kind = cfg.options.simmim_loss

    _check_input = MAESIL._check_input

    def forward_encoder(self, x: torch.Tensor, mask: TokenMask | torch.Tensor) -> torch.Tensor:
        """x (B, C, D, H, W), mask (B, L) bool / TokenMask -> (B, L, E) over the whole grid."""
        m = mask.mask if isinstance(mask, TokenMask) else mask
        enc = self.encoder
        tokens = enc.patch_embed(x)  # (B, L, E)
        w = m.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        tokens = tokens + enc.pos_embed_for(enc.grid_of(x))
        for blk in enc.blocks:
            tokens = blk(tokens)
        return enc.norm(tokens)

    def forward_loss(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        mask: TokenMask | torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L1 or L2 over the masked patches' voxels, padding (valid == 0) left out."""
        m = mask.mask if isinstance(mask, TokenMask) else mask
        v = None if valid is None else patchify(valid.expand_as(x), self.patch)
        return masked_patch_loss(pred, patchify(x, self.patch), m, v, kind=self.loss_kind)

    def to_voxels(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pred (B, L, P) -> (B, C, D, H, W)."""
        return unpatchify(pred, self.grid, self.patch)

    def forward(
        self,
        x: torch.Tensor,
        mask: TokenMask | torch.Tensor | None = None,
        *,
        generator=None,
        valid: torch.Tensor | None = None,
    ) -> PretrainOutput:
        self._check_input(x)
        if mask is None:
            mask = TokenMask.draw(self.cfg, x.shape[0], device=x.device, generator=generator)
        mask = TokenMask.of(mask, self.grid)
        pred = self.head(self.forward_encoder(x, mask))  # (B, L, P)
        loss = self.forward_loss(x, pred, mask, valid)
        with torch.no_grad():  # mean |error| over the masked voxels, read at log time
            l1 = masked_patch_loss(pred.detach(), patchify(x, self.patch), mask.mask, kind="l1")
        return PretrainOutput(loss=loss, pred=pred, mask=mask, logs={"masked_l1": l1})

    @torch.no_grad()
    def reconstruct(
        self,
        x: torch.Tensor,
        *,
        mode: str | None = None,
        ratio: float | None = None,
        mask: torch.Tensor | None = None,
        generator=None,
        return_raw: bool = False,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Same contract as :meth:`MAESIL.reconstruct`: input on visible, prediction on masked. ``valid`` is
        unused: no interpolation prior to keep off the padding."""
        self._check_input(x)
        if mask is None:
            mask = TokenMask.draw(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            )
        m = mask.mask if isinstance(mask, TokenMask) else mask
        raw = self.to_voxels(x, self.head(self.forward_encoder(x, m)).to(x.dtype))
        return paste_visible(x, raw, m, self.grid, self.patch, return_raw)
