"""A segmenter on the convolutional autoencoders' encoder and decoder (AE, VAE, VQ-VAE).

How an autoencoder pretraining is usually fine-tuned for segmentation (Models Genesis): keep
the pretrained encoder and decoder and replace the output layer by a class head. Here the
modules are those of :mod:`.autoencoders` under the same names, so a pretraining
checkpoint's ``enc.*`` and ``dec.*`` weights load as they are; only the decoder's last
layer (a stride-2 transposed conv to the image channels) is not loaded, it is replaced.

Shapes, for a patch of 8 (n = 3 stages, channels c1 c2 c3) and feature size f::

    e1 = enc.body stage 1 (x)          (B, c1, D/2, ...)
    e2 = enc.body stage 2 (e1)         (B, c2, D/4, ...)
    e3 = enc.body stage 3 (e2)         (B, c3, D/8, ...)
    z  = enc.out(e3)                   (B, latent, D/8, ...)  VAE: the mean; VQ-VAE: not quantised
    y  = dec.inp(z)                    (B, c3, D/8)
    y  = dec.body: + skip(e3), residual unit, up -> + skip(e2), residual unit, up
         -> + skip(e1), residual unit  (B, c1, D/2)
    head = UnetrUpBlock(y, UnetrBasicBlock(x)) -> UnetOutBlock   (B, K+1, D, H, W)

The pretrained autoencoder has no skip connections (it would copy its input); a segmenter
needs the detail the bottleneck throws away. Each decoder level therefore adds a 1x1 conv of
the encoder feature of the same resolution, **initialised to zero**, so at step 0 the decoder
computes exactly what it was pretrained to compute, and the skips grow only as fine-tuning
needs them. The head is the last level of the UNETR decoder (``UnetrUpBlock`` fed by a
full-resolution ``UnetrBasicBlock`` of the input, then ``UnetOutBlock``), the same as in
:class:`~.segmenter.UNETRSegmenter`, so the two segmenters differ in their pretrained trunk,
not in how they reach full resolution.

VAE: the encoder outputs (mu, log-variance); the segmenter uses mu, the deterministic path of
the VAE in eval mode. VQ-VAE: the continuous encoder output is used, not its quantised code:
the nearest-code lookup has no gradient (the straight-through trick only copies it past the
lookup), and the codebook, learnt for the pretraining encoder, would go stale as fine-tuning
moves the encoder; the commitment loss kept the encoder output close to its code, so the
pretrained decoder sees inputs like those it was trained on. The codebook is not loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import Convolution, UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetOutBlock
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .autoencoders import ConvDecoder3D, ConvEncoder3D, _channels, _stages

#: the pretraining methods whose checkpoints this segmenter takes
CONV_METHODS = ("ae", "vae", "vq-vae")
#: encoder output channels per latent channel (the VAE's encoder gives mu and log-variance)
LATENT_FACTOR = {"ae": 1, "vae": 2, "vq-vae": 1}


def conv_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What a conv checkpoint must share with the segmenter: input channels, stage widths,
    latent width and the encoder's output (VAE 2x)."""
    n = _stages(cfg)
    return {
        "in_channels": cfg.in_channels,
        "channels": _channels(cfg, n),
        "latent_channels": cfg.options.latent_channels,
        "latent_factor": LATENT_FACTOR.get(cfg.method, 1),
    }


class ConvAESegmenter(nn.Module):
    """AE/VAE/VQ-VAE encoder + pretrained decoder with zero-initialised skips + a class head.

    ``forward(x)`` (B, C, D, H, W) -> logits (B, K+1, D, H, W) for any D, H, W that are
    multiples of the patch (2**n). ``num_classes`` counts the foreground classes.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_classes: int,
        *,
        feature_size: int = 16,
        norm_name: str = "instance",
    ):
        super().__init__()
        if cfg.method not in CONV_METHODS:
            raise ConfigError(
                f"the conv segmenter takes a {'/'.join(CONV_METHODS)} config, got method "
                f"{cfg.method!r}."
            )
        if num_classes < 1:
            raise ConfigError("a segmenter needs at least one foreground class.")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        arch = conv_architecture(cfg)
        chans, lat = arch["channels"], arch["latent_channels"]
        self.stages = len(chans)
        self.latent_channels = lat
        # the autoencoder's modules, same names: enc.* and dec.* load from the checkpoint
        self.enc = ConvEncoder3D(cfg.in_channels, chans, arch["latent_factor"] * lat)
        dec = ConvDecoder3D(lat, chans, cfg.in_channels)
        dec.body = dec.body[:-1]  # the output layer (transposed conv to the image) is replaced
        self.dec = dec
        # skips[k] feeds decoder level k (deepest first) from the encoder stage of that size
        self.skips = nn.ModuleList(
            [Convolution(3, ch, ch, kernel_size=1, conv_only=True) for ch in reversed(chans)]
        )
        for s in self.skips:
            nn.init.zeros_(s.conv.weight)
            nn.init.zeros_(s.conv.bias)
        f = int(feature_size)
        kw: dict[str, Any] = {"spatial_dims": 3, "norm_name": norm_name, "res_block": True}
        self.skip0 = UnetrBasicBlock(
            in_channels=cfg.in_channels, out_channels=f, kernel_size=3, stride=1, **kw
        )
        self.up0 = UnetrUpBlock(
            in_channels=chans[0], out_channels=f, kernel_size=3, upsample_kernel_size=2, **kw
        )
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=self.num_classes + 1)

    @property
    def encoder(self) -> nn.Module:
        return self.enc

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.enc.parameters())

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The deterministic latent (AE: z, VAE: mu, VQ-VAE: unquantised z) and the encoder
        features of every stage (shallowest first)."""
        feats = []
        y = x
        for j in range(self.stages):
            y = self.enc.body[2 * j + 1](self.enc.body[2 * j](y))
            feats.append(y)
        z = self.enc.out(y)[:, : self.latent_channels]
        return z, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = 2**self.stages
        if x.ndim != 5 or any(s % p for s in x.shape[2:]):
            raise ConfigError(
                f"the conv segmenter needs (B, C, D, H, W) with sizes multiples of {p}, got "
                f"{tuple(x.shape)}."
            )
        z, feats = self.latent(x)
        y = self.dec.inp(z)
        for k in range(self.stages):
            y = y + self.skips[k](feats[self.stages - 1 - k])
            y = self.dec.body[2 * k](y)  # residual unit
            if k + 1 < self.stages:
                y = self.dec.body[2 * k + 1](y)  # transposed conv up one level
        return self.out(self.up0(y, self.skip0(x)))

    # ---------------------------------------------------------------- fine-tuning helpers

    def freeze_encoder(self, frozen: bool = True) -> None:
        for p in self.enc.parameters():
            p.requires_grad_(not frozen)

    def lr_scales(self, decay: float) -> dict[str, float]:
        """Layer-wise lr decay over the encoder: ``decay ** (n - j)`` for stage j (0-based,
        n stages), ``decay`` for the latent 1x1 conv; 1 for the decoder and head."""
        if not 0 < decay <= 1:
            raise ConfigError(f"layer decay must be in (0, 1], got {decay}.")
        scales = {}
        for name, _ in self.named_parameters():
            if name.startswith("enc.body."):
                j = int(name.split(".")[2]) // 2
                scales[name] = decay ** (self.stages - j)
            elif name.startswith("enc.out."):
                scales[name] = decay
            else:
                scales[name] = 1.0
        return scales

    def load_encoder(self, state_dict: dict[str, torch.Tensor], source: str) -> int:
        """Copy an autoencoder checkpoint's ``enc.*`` and ``dec.*`` weights (all but the
        decoder's output layer; the VQ-VAE codebook is not used); return how many.

        Raises CheckpointError when there are none (e.g. a ViT checkpoint) or shapes differ.
        """
        from ..checkpoint import load_weights

        own = {k for k in self.state_dict() if k.startswith(("enc.", "dec."))}
        take = {k: v for k, v in state_dict.items() if k in own}
        if not any(k.startswith("enc.") for k in take):
            raise CheckpointError(
                f"{source} holds no convolutional autoencoder weights (no 'enc.*' keys); give "
                f"a pretraining checkpoint of {', '.join(CONV_METHODS)} to this segmenter."
            )
        target = nn.ModuleDict({"enc": self.enc, "dec": self.dec})
        load_weights(target, take, source)
        return len(take)
