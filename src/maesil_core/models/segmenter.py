"""A UNETR-style 3D segmenter on the project's ViT encoder.

The encoder is :class:`~.vit3d.ViTEncoder3D` (the ``.encoder`` of every pretraining model), so
a pretraining checkpoint's ``encoder.*`` weights drop straight in. The decoder is built from
MONAI's UNETR blocks (``UnetrBasicBlock``, ``UnetrPrUpBlock``, ``UnetrUpBlock``,
``UnetOutBlock``) and wired as ``monai.networks.nets.UNETR`` wires them, generalised to any
power-of-two patch: with a patch of ``2**n`` voxels there are ``n`` upsampling stages.

Shapes, for a patch of 8 (n = 3) and feature size f, input (B, C, D, H, W)::

    enc0  = BasicBlock(x)                          (B, f,  D,   H,   W)
    enc1  = PrUp(hidden[l1], 2 ups)                (B, 2f, D/2, H/2, W/2)
    enc2  = PrUp(hidden[l2], 1 up)                 (B, 4f, D/4, ...)
    bottom= hidden[last] as a grid                 (B, E,  D/8, ...)
    dec2  = Up(bottom, enc2) -> Up(., enc1) -> Up(., enc0) -> OutBlock -> (B, K+1, D, H, W)

``hidden[l]`` are the encoder's intermediate token maps (B, L, E) from
:meth:`ViTEncoder3D.forward_features`, reshaped to (B, E, gd, gh, gw). For ViT-B (12 blocks)
and a 16-voxel patch the layers are UNETR's 3, 6, 9, 12; otherwise they are evenly spaced
(:func:`default_layers`). Any input whose size is a multiple of the patch works; the position
embedding follows the input's patch grid (see ``ViTEncoder3D.pos_embed_for``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetOutBlock
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .vit3d import ViTEncoder3D

#: the architecture fields a pretrained encoder must share with the segmenter
ENCODER_FIELDS = (
    "in_channels",
    "patch",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "norm_eps",
    "pos_embed",
)


def upsampling_stages(patch: Sequence[int]) -> int:
    """n for an isotropic patch of 2**n voxels (8 -> 3, 16 -> 4); ConfigError otherwise."""
    p = tuple(int(v) for v in patch)
    if len(set(p)) != 1 or p[0] < 2 or p[0] & (p[0] - 1):
        raise ConfigError(
            f"the UNETR decoder needs a cubic power-of-two patch (4, 8, 16), got {list(p)}."
        )
    return int(math.log2(p[0]))


def default_layers(depth: int, stages: int) -> list[int]:
    """0-based encoder blocks feeding the decoder: ``stages - 1`` skips, evenly spaced, + the last.

    depth 12, 4 stages -> [2, 5, 8, 11] (UNETR's 3, 6, 9, 12); depth 4, 3 stages -> [0, 2, 3].
    """
    skips = stages - 1
    layers = [max(0, round(depth * (i + 1) / (skips + 1)) - 1) for i in range(skips)]
    return [*layers, depth - 1]


class UNETRSegmenter(nn.Module):
    """ViT encoder + UNETR decoder. ``forward(x)`` (B, C, D, H, W) -> logits (B, K+1, D, H, W).

    ``num_classes`` counts the foreground classes; channel 0 is the background.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_classes: int,
        *,
        feature_size: int = 16,
        layers: Sequence[int] | None = None,
        norm_name: str = "instance",
        pos_resize: str = "recompute",
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError("a segmenter needs at least one foreground class.")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.stages = upsampling_stages(cfg.patch)
        self.layers = list(layers) if layers else default_layers(cfg.depth, self.stages)
        if len(self.layers) != self.stages:
            raise ConfigError(
                f"the decoder takes {self.stages} encoder layers for a patch of "
                f"{cfg.patch[0]} ({self.stages - 1} skips + the last), got {self.layers}."
            )
        for j in self.layers:
            if not -cfg.depth <= j < cfg.depth:
                raise ConfigError(f"layer {j} does not exist: the encoder has {cfg.depth} blocks.")
        self.encoder = ViTEncoder3D(cfg, pos_resize=pos_resize)
        e, f, n = cfg.embed_dim, int(feature_size), self.stages
        kw: dict[str, Any] = {"spatial_dims": 3, "norm_name": norm_name, "res_block": True}
        self.skips = nn.ModuleList(
            [
                UnetrBasicBlock(
                    in_channels=cfg.in_channels, out_channels=f, kernel_size=3, stride=1, **kw
                )
            ]
            + [
                UnetrPrUpBlock(
                    in_channels=e,
                    out_channels=f * 2**j,
                    num_layer=n - 1 - j,
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=2,
                    conv_block=True,
                    **kw,
                )
                for j in range(1, n)
            ]
        )
        # ups[j] takes the level below (j + 1) up to level j and fuses skips[j]
        self.ups = nn.ModuleList(
            [
                UnetrUpBlock(
                    in_channels=e if j == n - 1 else f * 2 ** (j + 1),
                    out_channels=f * 2**j,
                    kernel_size=3,
                    upsample_kernel_size=2,
                    **kw,
                )
                for j in range(n)
            ]
        )
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=self.num_classes + 1)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def _grid(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """(B, L, E) -> (B, E, gd, gh, gw)."""
        b, _, e = tokens.shape
        return tokens.transpose(1, 2).reshape(b, e, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.encoder.grid_of(x)
        hidden = self.encoder.forward_features(x, self.layers)  # stages x (B, L, E)
        feats = [self.skips[0](x)]
        for j in range(1, self.stages):
            feats.append(self.skips[j](self._grid(hidden[j - 1], grid)))
        y = self._grid(hidden[-1], grid)
        for j in reversed(range(self.stages)):
            y = self.ups[j](y, feats[j])
        return self.out(y)

    # ---------------------------------------------------------------- fine-tuning helpers

    def freeze_encoder(self, frozen: bool = True) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def lr_scales(self, decay: float) -> dict[str, float]:
        """Layer-wise lr decay: scale ``decay ** (depth - i)`` for block i, ``decay ** (depth + 1)``
        for the patch embedding; 1 for the final norm and the decoder. decay 1 = no decay."""
        if not 0 < decay <= 1:
            raise ConfigError(f"layer decay must be in (0, 1], got {decay}.")
        depth = self.cfg.depth
        scales = {}
        for name, _ in self.named_parameters():
            if name.startswith("encoder.blocks."):
                i = int(name.split(".")[2])
                scales[name] = decay ** (depth - i)
            elif name.startswith("encoder.patch_embed"):
                scales[name] = decay ** (depth + 1)
            else:
                scales[name] = 1.0
        return scales

    def load_encoder(self, state_dict: dict[str, torch.Tensor], source: str) -> int:
        """Copy the ``encoder.*`` weights of a pretraining state dict; return how many
        (:func:`~maesil_core.checkpoint.load_vit_encoder`)."""
        from ..checkpoint import load_vit_encoder

        return load_vit_encoder(self.encoder, state_dict, source)


def is_conv(cfg: ModelConfig) -> bool:
    """True for the convolutional autoencoder methods (AE, VAE, VQ-VAE)."""
    from .conv_segmenter import CONV_METHODS

    return cfg.method in CONV_METHODS


def make_segmenter(
    cfg: ModelConfig,
    num_classes: int,
    *,
    feature_size: int = 16,
    layers: Sequence[int] | None = None,
    norm_name: str = "instance",
) -> nn.Module:
    """The segmenter for ``cfg``'s encoder: :class:`UNETRSegmenter` on the ViT of the masked
    methods, :class:`~.conv_segmenter.ConvAESegmenter` for ae / vae / vq-vae."""
    if not is_conv(cfg):
        return UNETRSegmenter(
            cfg, num_classes, feature_size=feature_size, layers=layers, norm_name=norm_name
        )
    from .conv_segmenter import ConvAESegmenter

    if layers:
        raise ConfigError(
            f"encoder layers {list(layers)} apply to a ViT encoder; {cfg.method} has a conv encoder."
        )
    return ConvAESegmenter(cfg, num_classes, feature_size=feature_size, norm_name=norm_name)


def architecture_mismatch(a: ModelConfig, b: ModelConfig) -> str:
    """'' if ``a`` and ``b`` describe the same encoder, else e.g. 'embed_dim 96 vs 384'."""
    if is_conv(a) or is_conv(b):
        return _conv_mismatch(a, b)
    diffs = []
    for name in ENCODER_FIELDS:
        va, vb = _norm(getattr(a, name)), _norm(getattr(b, name))
        if va != vb:
            diffs.append(f"{name} {_fmt(va)} vs {_fmt(vb)}")
    return ", ".join(diffs)


def _conv_mismatch(a: ModelConfig, b: ModelConfig) -> str:
    if is_conv(a) != is_conv(b):
        kind = {True: "conv", False: "ViT"}
        return f"encoder {kind[is_conv(a)]} ({a.method}) vs {kind[is_conv(b)]} ({b.method})"
    from .conv_segmenter import conv_architecture

    diffs = [] if a.method == b.method else [f"method {a.method} vs {b.method}"]
    ca, cb = conv_architecture(a), conv_architecture(b)
    for name in ("in_channels", "channels", "latent_channels"):
        if ca[name] != cb[name]:
            diffs.append(f"{name} {_fmt(ca[name])} vs {_fmt(cb[name])}")
    return ", ".join(diffs)


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _fmt(v: Any) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)
