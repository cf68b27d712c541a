"""MAE-3D and SimMIM, the two masked-image-modelling baselines of MIM-Med3D (Chen et al., WACV 2023).

- :class:`MAE3D`   MAE on 3D patches: random patch masking at a high ratio, the encoder sees the
  visible tokens only, a light transformer decoder predicts every patch, MSE on masked patches.
  It is :class:`~.maesil.MAESIL` with the masking fixed to ``"random"`` (MIM-Med3D's choice);
  the MIM-Med3D sizes (96^3 input, 16^3 patches, decoder 512 x 8) are the ``mim-med3d`` preset.
- :class:`SimMIM`  the encoder runs over the FULL grid with a learnable mask token in place of
  every masked patch embedding; a single linear head maps each encoded token back to its voxels;
  the loss (L1, SimMIM's choice; ``extra["simmim_loss"] = "mse"`` switches) is on masked patches.

Both expose ``.encoder`` (:class:`~.vit3d.ViTEncoder3D`) for segmentation fine-tuning, and
``reconstruct`` with the signature of :meth:`MAESIL.reconstruct`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import PretrainOutput
from .losses import masked_patch_loss
from .maesil import MAESIL
from .masking import make_mask, mask_to_voxels, paste_visible
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
        # reuse MAESIL's patch helpers without its decoder: a tiny shim keeps one implementation
        self._patches = _PatchHelper(cfg)
        self.grid = tuple(cfg.grid)
        self.patch = tuple(cfg.patch)
        self.encoder = ViTEncoder3D(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.head = nn.Linear(cfg.embed_dim, self._patches.patch_dim)
        init_vit_weights(self.head)
        nn.init.normal_(self.mask_token, std=0.02)
        self.loss_kind = str(cfg.extra.get("simmim_loss", "l1"))
        if self.loss_kind not in ("l1", "mse"):
            raise ConfigError(f"extra simmim_loss must be l1 or mse, got {self.loss_kind!r}.")

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, *self.cfg.superpatch)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"SimMIM expects input (B, {', '.join(map(str, expected))}) = the superpatch "
                f"{list(self.cfg.superpatch)}, got {tuple(x.shape)}: crop or resample the input."
            )

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, D, H, W), mask (B, L) bool -> (B, L, E) over the whole grid."""
        enc = self.encoder
        tokens = enc.patch_embed(x)  # (B, L, E)
        w = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        tokens = tokens + enc.pos_embed_for(enc.grid_of(x))
        for blk in enc.blocks:
            tokens = blk(tokens)
        return enc.norm(tokens)

    def forward_loss(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L1 or L2 over the masked patches' voxels, padding (valid == 0) left out."""
        patchify = self._patches.patchify
        v = None if valid is None else patchify(valid.expand_as(x))
        return masked_patch_loss(pred, patchify(x), mask, v, kind=self.loss_kind)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        generator=None,
        valid: torch.Tensor | None = None,
    ) -> PretrainOutput:
        self._check_input(x)
        if mask is None:
            mask = make_mask(self.cfg, x.shape[0], device=x.device, generator=generator)
        pred = self.head(self.forward_encoder(x, mask))  # (B, L, P)
        loss = self.forward_loss(x, pred, mask, valid)
        with torch.no_grad():
            recon = self._patches.unpatchify(pred.detach().to(x.dtype))
            vox = mask_to_voxels(mask, self.grid, self.patch).to(x.dtype)
            l1 = F.l1_loss(recon * vox, x * vox, reduction="sum") / vox.sum().clamp(min=1)
        return PretrainOutput(loss=loss, pred=recon, mask=vox, logs={"masked_l1": float(l1)})

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
    ) -> tuple[torch.Tensor, ...]:
        """Same contract as :meth:`MAESIL.reconstruct`: input on visible, prediction on masked."""
        self._check_input(x)
        if mask is None:
            mask = make_mask(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            )
        raw = self._patches.unpatchify(self.head(self.forward_encoder(x, mask)).to(x.dtype))
        return paste_visible(x, raw, mask, self.grid, self.patch, return_raw)


class _PatchHelper:
    """patchify / unpatchify of :class:`MAESIL` for a config, without building a model."""

    def __init__(self, cfg: ModelConfig):
        self.grid = tuple(cfg.grid)
        self.patch = tuple(cfg.patch)
        self.patch_dim = int(torch.tensor(cfg.patch).prod()) * cfg.in_channels

    patchify = MAESIL.patchify
    unpatchify = MAESIL.unpatchify
