"""MONAI's ``MaskedAutoEncoderViT`` as a pretraining method of this project, for benchmarks.

    import monai_mae                       # (benchmarks/ on sys.path) registers "monai-mae"
    cfg = preset("tiny").override("model", method="monai-mae")

The network is MONAI's, module for module, with its own initialisation, class token, biases
and sin-cos position embeddings (``pos_embed_type="sincos"`` for encoder and decoder); the
widths, depths, heads and MLP ratio come from :class:`~maesil_core.config.ModelConfig`.
Everything around it is ours, so that it trains and is scored exactly like the other methods:
the token mask (:class:`~maesil_core.models.masking.TokenMask`; MONAI's forward draws its
own on the CPU and cannot take one), the masked-patch MSE that leaves out padding, and
``reconstruct``. MONAI's 3D sin-cos embedding needs widths divisible by 6 (96, not 64).
"""

from __future__ import annotations

import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch import nn

from maesil_core.config import ModelConfig
from maesil_core.models.base import PretrainOutput
from maesil_core.models.losses import masked_patch_loss
from maesil_core.models.masking import TokenMask, paste_visible
from maesil_core.models.patches import patchify, unpatchify
from maesil_core.models.registry import register

METHOD = "monai-mae"


class _Encoder:
    """MONAI's encoder over all tokens, class token dropped: (B, C, *superpatch) -> (B, L, E)
    (what the linear probe reads). A view of the network, not a module: no second copy of
    its parameters in the state dict."""

    def __init__(self, net: MaskedAutoEncoderViT, patch):
        self.net = net
        self.patch = tuple(patch)

    def grid_of(self, x: torch.Tensor):
        return tuple(s // p for s, p in zip(x.shape[2:], self.patch))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.patch_embedding(x)  # (B, L, E) with the position embedding
        cls = self.net.cls_token.expand(x.shape[0], -1, -1)
        return self.net.blocks(torch.cat([cls, tokens], dim=1))[:, 1:]


class MonaiMAE(nn.Module):
    """MONAI ``MaskedAutoEncoderViT`` with this project's masks, loss and reconstruction."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = tuple(cfg.grid)
        self.patch = tuple(cfg.patch)
        self.net = MaskedAutoEncoderViT(
            in_channels=cfg.in_channels,
            img_size=tuple(cfg.superpatch),
            patch_size=tuple(cfg.patch),
            hidden_size=cfg.embed_dim,
            mlp_dim=int(cfg.embed_dim * cfg.mlp_ratio),
            num_layers=cfg.depth,
            num_heads=cfg.num_heads,
            masking_ratio=cfg.mask_ratio,
            decoder_hidden_size=cfg.decoder_embed_dim,
            decoder_mlp_dim=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
            decoder_num_layers=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads,
            pos_embed_type="sincos",
            decoder_pos_embed_type="sincos",
            spatial_dims=3,
        )
        self.encoder = _Encoder(self.net, cfg.patch)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch)  # (B, L, P)

    def to_voxels(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return unpatchify(pred, self.grid, self.patch)  # (B, C, D, H, W)

    def _predict(self, x: torch.Tensor, mask: TokenMask) -> torch.Tensor:
        """MONAI's forward with a given mask: pred (B, L, P)."""
        net = self.net
        b, n = mask.mask.shape
        ids_keep = mask.ids_keep
        tokens = net.patch_embedding(x)  # (B, L, E)
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        h = torch.cat([net.cls_token.expand(b, -1, -1), torch.gather(tokens, 1, idx)], dim=1)
        h = net.decoder_embed(net.blocks(h))  # (B, 1 + L_keep, E')
        full = net.mask_tokens.repeat(b, n, 1)  # (B, L, E')
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]), h[:, 1:])
        h = torch.cat([h[:, :1], full + net.decoder_pos_embedding], dim=1)
        return net.decoder_pred(net.decoder_blocks(h))[:, 1:]  # (B, L, P)

    def forward(self, x, mask=None, *, generator=None, valid=None) -> PretrainOutput:
        if mask is None:
            mask = TokenMask.draw(self.cfg, x.shape[0], device=x.device, generator=generator)
        mask = TokenMask.of(mask, self.grid)
        pred = self._predict(x, mask)  # (B, L, P)
        v = None if valid is None else self.patchify(valid.expand_as(x))
        loss = masked_patch_loss(pred, self.patchify(x), mask.mask, v)
        return PretrainOutput(loss=loss, pred=pred, mask=mask, logs={})

    @torch.no_grad()
    def reconstruct(
        self, x, *, mode=None, ratio=None, mask=None, generator=None, return_raw=False, valid=None
    ) -> tuple[torch.Tensor, ...]:
        if mask is None:
            mask = TokenMask.draw(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            )
        mask = TokenMask.of(mask, self.grid)
        raw = self.to_voxels(x, self._predict(x, mask).to(x.dtype))
        return paste_visible(x, raw, mask.mask, self.grid, self.patch, return_raw)


register(METHOD, f"{__name__}:MonaiMAE")
