"""MAESIL: a 3D masked autoencoder on superpatches, in the style of MAE's ``models_mae.py``.

A superpatch (B, C, D, H, W) of ``cfg.superpatch`` voxels is cut into patches of
``cfg.patch`` voxels, L = gd * gh * gw tokens. A mask (B, L) hides round(ratio * L) of
them (dual masking by default, see :mod:`.masking`); the encoder (:class:`ViTEncoder3D`)
sees only the visible tokens; a light decoder gets the encoded visible tokens back in place
with a learnable mask token everywhere else and predicts the voxels of every patch; the
loss is the MSE on the masked patches only (leaving out voxels that are padding).

Shapes: P = prod(patch) * C values per patch, E = encoder width, E' = decoder width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import PretrainOutput
from .losses import masked_patch_loss
from .masking import make_mask, mask_to_keep_indices, mask_to_voxels, num_masked, paste_visible
from .vit3d import Block, ViTEncoder3D, init_vit_weights, pos_embed_3d_sincos


class MAESIL(nn.Module):
    """Masked autoencoder for 3D CT superpatches. ``forward(x)`` -> :class:`PretrainOutput`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = tuple(cfg.patch)
        self.grid = tuple(cfg.grid)
        self.num_patches = cfg.num_patches
        self.patch_dim = math.prod(cfg.patch) * cfg.in_channels  # P

        # encoder: visible tokens only
        self.encoder = ViTEncoder3D(cfg)

        # decoder: all tokens, mask tokens where hidden
        dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        pos = pos_embed_3d_sincos(dd, self.grid)[None]  # (1, L, E') fixed, not saved
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch_dim)

        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---------------------------------------------------------------- patches <-> voxels

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, L, P); each row is one patch flattened as (pd, ph, pw, C)."""
        b, c = x.shape[:2]
        (gd, gh, gw), (pd, ph, pw) = self.grid, self.patch
        x = x.reshape(b, c, gd, pd, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gd, gh, gw, pd, ph, pw, C)
        return x.reshape(b, gd * gh * gw, pd * ph * pw * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, C, D, H, W); the exact inverse of :meth:`patchify`."""
        b = tokens.shape[0]
        (gd, gh, gw), (pd, ph, pw) = self.grid, self.patch
        c = tokens.shape[-1] // (pd * ph * pw)
        x = tokens.reshape(b, gd, gh, gw, pd, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gd, pd, gh, ph, gw, pw)
        return x.reshape(b, c, gd * pd, gh * ph, gw * pw)

    # ---------------------------------------------------------------- the three stages

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, *self.cfg.superpatch)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"MAESIL expects input (B, {expected[0]}, {', '.join(map(str, expected[1:]))}) = the "
                f"superpatch {list(self.cfg.superpatch)}, got {tuple(x.shape)}: crop or resample "
                "the input to the superpatch size."
            )

    def forward_encoder(
        self, x: torch.Tensor, mask: torch.Tensor, n_masked: int | None = None
    ) -> torch.Tensor:
        """x (B, C, D, H, W), mask (B, L) bool -> latent (B, L_keep, E) of the visible tokens."""
        ids_keep, _ = mask_to_keep_indices(mask, n_masked)
        return self.encoder(x, ids_keep)

    def forward_decoder(
        self, latent: torch.Tensor, mask: torch.Tensor, ids_all: torch.Tensor | None = None
    ) -> torch.Tensor:
        """latent (B, L_keep, E), mask (B, L) -> pred (B, L, P) for every patch.

        ``ids_all`` (B, L) = cat(ids_keep, ids_masked) of ``mask`` may be passed to skip
        recomputing it.
        """
        b, n_keep, _ = latent.shape
        if ids_all is None:
            ids_all = torch.cat(mask_to_keep_indices(mask, self.num_patches - n_keep), dim=1)
        x = self.decoder_embed(latent)  # (B, L_keep, E')
        filler = self.mask_token.to(x.dtype).expand(
            b, self.num_patches - n_keep, -1
        )  # (B, L_mask, E')
        # put visible tokens and mask tokens back into grid order with one scatter;
        # ids_all is a permutation of 0..L-1: visible positions first, then masked ones
        values = torch.cat([x, filler], dim=1)  # (B, L, E')
        x = torch.empty_like(values).scatter(
            1, ids_all.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values
        )  # (B, L, E') in grid order
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, L, P)

    def _target(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patchified target (B, L, P), normalised per patch when ``norm_pix_loss``, and its stats."""
        target = self.patchify(x)
        if not self.cfg.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def forward_loss(
        self,
        x: torch.Tensor,
        pred: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only.

        x (B, C, D, H, W), pred (B, L, P), mask (B, L); valid (B, 1, D, H, W) 0 / False on
        padding, which is left out (None: every voxel counts).
        """
        target, _, _ = self._target(x)
        v = None if valid is None else self.patchify(valid.expand_as(x))  # (B, L, P)
        return masked_patch_loss(pred, target, mask, v)

    def to_voxels(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pred (B, L, P) -> (B, C, D, H, W) in image intensities.

        With ``norm_pix_loss`` the prediction is in per-patch normalised units; it is mapped
        back with the mean and std of the TRUE patches of ``x``, as in MAE's demo. Those
        stats are unknown for masked patches at real inference, so such a picture borrows a
        little information from the hidden input (the shape of the prediction is the model's).
        """
        if self.cfg.norm_pix_loss:
            _, mean, std = self._target(x)
            pred = pred * std + mean
        return self.unpatchify(pred)

    # ---------------------------------------------------------------- public API

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        generator=None,
        valid: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """x (B, C, *superpatch) in [0, 1]; mask (B, L) bool or None (drawn on x.device);
        valid (B, 1, *superpatch) 0 / False on padding the loss leaves out, or None.

        Returns loss, pred (B, C, D, H, W) reconstruction in voxel space (detached, for
        display) and mask (B, 1, D, H, W) float, 1.0 on masked voxels.
        """
        self._check_input(x)
        n_masked = None
        if mask is None:
            mask = make_mask(self.cfg, x.shape[0], device=x.device, generator=generator)
            n_masked = num_masked(self.grid, self.cfg.mask_ratio)
        ids_keep, ids_masked = mask_to_keep_indices(mask, n_masked)
        latent = self.encoder(x, ids_keep)  # (B, L_keep, E): visible tokens only
        pred = self.forward_decoder(latent, mask, torch.cat([ids_keep, ids_masked], 1))  # (B, L, P)
        loss = self.forward_loss(x, pred, mask, valid)
        with torch.no_grad():
            recon = self.to_voxels(x, pred.detach().to(x.dtype))
            vox_mask = mask_to_voxels(mask, self.grid, self.patch).to(x.dtype)
        return PretrainOutput(loss=loss, pred=recon, mask=vox_mask, logs={})

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
        """The MAE "reconstruction + visible" picture.

        Returns ``(recon, voxel_mask)``: recon (B, C, D, H, W) is the input on visible
        patches and the prediction on masked ones; voxel_mask (B, 1, D, H, W) is 1.0 where
        masked. ``return_raw=True`` appends the raw prediction on every patch (B, C, D, H, W).
        A given ``mask`` (B, L) overrides ``mode``/``ratio``.
        """
        self._check_input(x)
        n_masked = None
        if mask is None:
            mask = make_mask(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            )
            n_masked = num_masked(self.grid, self.cfg.mask_ratio if ratio is None else ratio)
        latent = self.forward_encoder(x, mask, n_masked)
        raw = self.to_voxels(x, self.forward_decoder(latent, mask).to(x.dtype))
        return paste_visible(x, raw, mask, self.grid, self.patch, return_raw)
