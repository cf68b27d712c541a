"""MAESIL: a 3D masked autoencoder on superpatches, shaped like MAE's ``models_mae.py``.

A superpatch (B, C, D, H, W) of ``cfg.superpatch`` voxels is cut into patches of
``cfg.patch`` voxels, L = gd * gh * gw tokens. A :class:`~.masking.TokenMask` hides
round(ratio * L) of them (dual masking by default, see :mod:`.masking`). Then, as in MAE:

- :meth:`MAESIL.forward_encoder`: the encoder (:class:`ViTEncoder3D`) sees only the visible
  tokens;
- :meth:`MAESIL.forward_decoder`: a light decoder gets the encoded visible tokens back in
  place, with a learnable mask token everywhere else, and predicts every patch;
- :meth:`MAESIL.forward_loss`: the MSE on the masked patches only (padding left out).

Decoder options (:class:`~maesil_core.model_options.MAESILOptions`; the first two on in
``tiny`` and ``cpu``): ``decoder_prior="interpolation"`` adds the prediction to the hidden voxels
interpolated from the visible ones (:func:`interpolate_hidden`), so the decoder learns what a
smoothing filter cannot guess; ``decoder_local`` runs a :class:`~.vit3d.LocalMix` before each
decoder block; ``decoder_refine`` corrects the hidden voxels of the picture with a few
convolutions at full resolution (:class:`VoxelRefine`).

``forward`` returns the loss, the prediction in patch space (B, L, P) and the mask: what the
training step needs and nothing more. Voxel pictures are built only when asked for
(:meth:`MAESIL.to_voxels`, :meth:`MAESIL.reconstruct`).

Shapes: P = prod(patch) * C values per patch, E = encoder width, E' = decoder width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..model_options import MAESILOptions
from .base import PretrainOutput
from .losses import masked_patch_loss
from .masking import TokenMask, paste_visible
from .patches import patchify, unpatchify
from .vit3d import Block, LocalMix, ViTEncoder3D, init_vit_weights, pos_embed_3d_sincos


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """(B, C, D, H, W) convolved with a Gaussian of ``sigma`` voxels per axis, zero padding,
    truncated at 4 sigma (``scipy.ndimage.gaussian_filter(mode="constant")``). Each axis is
    one matrix product with an (n, n) banded matrix: on a superpatch (n = 32) that is ~100x
    faster on the CPU than a 33-tap convolution."""
    for axis, s in enumerate(sigma):
        n, r = x.shape[2 + axis], int(4.0 * float(s) + 0.5)
        t = torch.arange(n, device=x.device, dtype=x.dtype)
        d = (t[:, None] - t[None, :]).abs()  # (n, n) distances
        taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        w = torch.exp(-0.5 * (d / s) ** 2) * (d <= r) / torch.exp(-0.5 * (taps / s) ** 2).sum()
        x = torch.movedim(torch.movedim(x, 2 + axis, -1) @ w, -1, 2 + axis)
    return x


def interpolate_hidden(
    x: torch.Tensor,
    hidden: torch.Tensor,
    sigma: Sequence[float],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (B, C, D, H, W) with its hidden voxels, hidden (B, 1, D, H, W) 1.0 where hidden ->
    (B, C, D, H, W): visible voxels kept, hidden ones the Gaussian-weighted mean (``sigma``
    voxels per axis) of the visible ones around them (normalised convolution), or the mean of
    all visible ones where none is near: the no-learning reference
    ``metrics.fill_from_visible`` of one superpatch, in torch. ``valid`` (B, 1, D, H, W), 0 on
    padding: padding is not a visible voxel, so a superpatch at the edge of a volume is filled
    from its real voxels only (as the reference fills the real part of an edge tile)."""
    seen = 1.0 - hidden
    if valid is not None:
        seen = seen * valid.to(x.dtype)
    num = gaussian_blur(x * seen, sigma)  # (B, C, D, H, W)
    den = gaussian_blur(seen.expand_as(x), sigma)
    mean = (x * seen).sum((2, 3, 4), keepdim=True) / seen.sum((2, 3, 4), keepdim=True).clamp(min=1)
    fill = torch.where(den > 1e-6, num / den.clamp(min=1e-6), mean.expand_as(x))
    return x * seen + fill * hidden


class VoxelRefine(nn.Module):
    """A voxel-level correction of the decoder's picture, the local half of a local-global
    decoder at full resolution: (B, 2C + 1, D, H, W) [prediction, visible voxels, hidden
    mask] -> (B, C, D, H, W). Three 3x3x3 convolutions, dilations 1, 2, 4 (15 voxels seen:
    an 8^3 hidden patch's centre sees its neighbours); the last starts at zero. The padding of
    a superpatch at a volume's edge reaches it as visible zeros (it has no ``valid`` input)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(2 * channels + 1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(width, width, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv3d(width, channels, 3, padding=4, dilation=4),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


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
        self._other_grid_pos: dict[tuple[int, ...], torch.Tensor] = {}
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)]
        )
        # MAE-3D and GL-MAE build on this class with their own options: theirs are plain
        options = cfg.options if isinstance(cfg.options, MAESILOptions) else MAESILOptions()
        self.decoder_prior = options.decoder_prior
        self.decoder_local = (
            nn.ModuleList([LocalMix(dd) for _ in range(cfg.decoder_depth)])
            if options.decoder_local
            else None
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch_dim)
        self.decoder_refine = (
            VoxelRefine(cfg.in_channels, options.decoder_refine) if options.decoder_refine else None
        )

        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.decoder_prior == "interpolation":  # the residual starts at 0: at the prior
            nn.init.zeros_(self.decoder_pred.weight)
            nn.init.zeros_(self.decoder_pred.bias)

    # ---------------------------------------------------------------- patches <-> voxels

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, L, P) (:func:`~.patches.patchify`)."""
        return patchify(x, self.patch)

    def unpatchify(self, tokens: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """(B, L, P) -> (B, C, D, H, W) on ``grid`` (default the superpatch's)."""
        return unpatchify(tokens, self.grid if grid is None else grid, self.patch)

    # ---------------------------------------------------------------- the three stages

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, *self.cfg.superpatch)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"{type(self).__name__} expects input (B, {expected[0]}, "
                f"{', '.join(map(str, expected[1:]))}) = the superpatch "
                f"{list(self.cfg.superpatch)}, got {tuple(x.shape)}: crop or resample the "
                "input to the superpatch size."
            )

    def forward_encoder(self, x: torch.Tensor, mask: TokenMask | torch.Tensor) -> torch.Tensor:
        """x (B, C, D, H, W), mask on x's patch grid -> latent (B, L_keep, E) of the visible
        tokens."""
        mask = TokenMask.of(mask, self.grid)
        return self.encoder(x, mask.ids_keep)

    def _decoder_pos(self, grid: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        if grid == self.grid:
            return self.decoder_pos_embed
        if grid not in self._other_grid_pos:  # GL-MAE's views: fixed sin-cos, built once
            self._other_grid_pos[grid] = pos_embed_3d_sincos(self.cfg.decoder_embed_dim, grid)[None]
        return self._other_grid_pos[grid].to(device=x.device, dtype=x.dtype)

    def forward_decoder(self, latent: torch.Tensor, mask: TokenMask | torch.Tensor) -> torch.Tensor:
        """latent (B, L_keep, E) of the visible tokens -> pred (B, L, P) for every patch of
        the mask's grid (a bool mask (B, L) is taken to lie on the superpatch's grid)."""
        mask = TokenMask.of(
            mask, self.grid, mask.shape[1] - latent.shape[1] if torch.is_tensor(mask) else None
        )
        b, n_keep, _ = latent.shape
        x = self.decoder_embed(latent)  # (B, L_keep, E')
        filler = self.mask_token.to(x.dtype).expand(b, mask.mask.shape[1] - n_keep, -1)
        # visible tokens and mask tokens back into grid order with one scatter; ids_all is a
        # permutation of 0..L-1: visible positions first, then masked ones
        values = torch.cat([x, filler], dim=1)  # (B, L, E')
        ids = mask.ids_all.unsqueeze(-1).expand(-1, -1, values.shape[-1])
        x = torch.empty_like(values).scatter(1, ids, values)  # (B, L, E') in grid order
        x = x + self._decoder_pos(tuple(mask.grid), x)
        for i, blk in enumerate(self.decoder_blocks):
            if self.decoder_local is not None:
                x = self.decoder_local[i](x, mask.grid)
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, L, P)

    def predict(
        self, x: torch.Tensor, mask: TokenMask, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, *superpatch), mask -> pred (B, L, P): encoder, decoder and, with
        ``decoder_prior``, the interpolation of the hidden voxels the decoder corrects (from
        the visible voxels that are not padding: ``valid`` (B, 1, *superpatch), 0 on padding)."""
        pred = self.forward_decoder(self.forward_encoder(x, mask), mask)  # (B, L, P)
        if self.decoder_prior == "interpolation":
            with torch.no_grad():
                hidden = mask.to_voxels(self.patch).to(x.dtype)  # (B, 1, D, H, W)
                prior = interpolate_hidden(x, hidden, [p / 2 for p in self.patch], valid)
            pred = pred + self.patchify(prior)
        if self.decoder_refine is not None:
            hidden = mask.to_voxels(self.patch).to(pred.dtype)  # (B, 1, D, H, W)
            voxels = self.unpatchify(pred)  # (B, C, D, H, W)
            step = self.decoder_refine(torch.cat([voxels, x * (1.0 - hidden), hidden], dim=1))
            pred = self.patchify(voxels + step * hidden)
        return pred

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
        mask: TokenMask | torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error over the masked patches only.

        x (B, C, D, H, W), pred (B, L, P), mask (B, L) or TokenMask; valid (B, 1, D, H, W)
        0 / False on padding, which is left out (None: every voxel counts).
        """
        target, _, _ = self._target(x)
        m = mask.mask if isinstance(mask, TokenMask) else mask
        v = None if valid is None else self.patchify(valid.expand_as(x))  # (B, L, P)
        return masked_patch_loss(pred, target, m, v)

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
        mask: TokenMask | torch.Tensor | None = None,
        *,
        generator=None,
        valid: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """x (B, C, *superpatch) in [0, 1]; mask (B, L) bool / TokenMask or None (drawn on
        x.device); valid (B, 1, *superpatch) 0 / False on padding the loss leaves out.

        Returns the loss, pred (B, L, P) in patch space and the TokenMask.
        """
        self._check_input(x)
        if mask is None:
            mask = TokenMask.draw(self.cfg, x.shape[0], device=x.device, generator=generator)
        mask = TokenMask.of(mask, self.grid)
        pred = self.predict(x, mask, valid)  # (B, L, P); the encoder sees visible tokens only
        loss = self.forward_loss(x, pred, mask, valid)
        return PretrainOutput(loss=loss, pred=pred, mask=mask, logs={})

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
        """The MAE "reconstruction + visible" picture.

        Returns ``(recon, voxel_mask)``: recon (B, C, D, H, W) is the input on visible
        patches and the prediction on masked ones; voxel_mask (B, 1, D, H, W) is 1.0 where
        masked. ``return_raw=True`` appends the raw prediction on every patch (B, C, D, H, W).
        A given ``mask`` (B, L) overrides ``mode``/``ratio``. ``valid`` (B, 1, D, H, W), 0 on
        the padding of a superpatch at a volume's edge (see :meth:`predict`).
        """
        self._check_input(x)
        if mask is None:
            mask = TokenMask.draw(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            )
        mask = TokenMask.of(mask, self.grid)
        raw = self.to_voxels(x, self.predict(x, mask, valid).to(x.dtype))
        return paste_visible(x, raw, mask.mask, self.grid, self.patch, return_raw)
