"""3D convolutional autoencoder baselines: AE, VAE and VQ-VAE, the comparison of the MAESIL paper.

All three share one encoder/decoder pair built from MONAI blocks
(:class:`monai.networks.blocks.Convolution` and :class:`~monai.networks.blocks.ResidualUnit`):

    encoder  (B, C, *superpatch) -> stride-2 stages ... -> latent (B, c_lat, *grid)
    decoder  latent -> transposed stride-2 stages ... -> (B, C, *superpatch), sigmoid to [0, 1]

The number of stride-2 stages is log2(patch), so the latent grid IS the token grid of the
masked models (``superpatch // patch``): each latent vector stands for one patch, and the
bottleneck width is ``extra["latent_channels"]`` (default 16). Channels per stage are
``extra["ae_channels"]`` (default ``b, 2b, 4b, ...`` with ``b = extra["ae_base_channels"]``,
itself by default ``embed_dim // 4``), so that each preset's parameter count is of the same
order as the matching MAESIL (see docs/method.md).

- :class:`AE`     deterministic bottleneck, MSE loss.
- :class:`VAE`    Gaussian bottleneck (mu, log-variance), reparameterised sample in training,
  mu in eval; loss = MSE + ``extra["kl_weight"]`` (default 1e-3) x KL per latent element.
- :class:`VQVAE`  vector-quantised bottleneck (MONAI :class:`EMAQuantizer`: EMA codebook,
  straight-through gradient, commitment loss 0.25) with ``extra["codebook_size"]`` codes
  (default 256) and dead-code restart (codes unused for a while are moved onto random encoder
  outputs of the batch), logs codebook usage and perplexity.

These models see the whole input: ``PretrainOutput.mask`` is None, ``reconstruct``'s mask is
all zeros, and ``recon`` is the model's output everywhere (there is nothing to paste back).
Options (``ModelConfig.extra``) are typed in :mod:`maesil_core.model_options`.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import PretrainOutput
from .losses import valid_mse


def _stages(cfg: ModelConfig) -> int:
    patch = set(cfg.patch)
    if len(patch) != 1:
        raise ConfigError(
            f"the conv autoencoders need a cubic patch (the down-sampling factor), got {cfg.patch}."
        )
    p = patch.pop()
    n = int(round(math.log2(p)))
    if 2**n != p or n < 1:
        raise ConfigError(f"the conv autoencoders need a power-of-two patch, got {p}.")
    return n


def _channels(cfg: ModelConfig, n: int) -> list[int]:
    opts = cfg.options  # ConvAEOptions (or VAE / VQ-VAE's)
    if opts.ae_channels is None:
        # default: a quarter of the ViT width, which puts the parameter count in the range of
        # the MAESIL of the same preset (smoke 0.97M vs 0.64M, tiny 0.97M vs 0.80M, small ~14M vs 14M)
        base = opts.ae_base_channels or max(8, cfg.embed_dim // 4)
        return [min(base * 2**i, 1024) for i in range(n)]
    chans = list(opts.ae_channels)
    if len(chans) != n:
        raise ConfigError(f"extra ae_channels needs {n} entries (log2 of the patch), got {chans}.")
    return chans


class ConvEncoder3D(nn.Module):
    """(B, C, D, H, W) -> (B, out, D/2^n, H/2^n, W/2^n).

    Each stage: a stride-2 3x3x3 :class:`Convolution` (conv, instance norm, PReLU), then a
    :class:`ResidualUnit` at the new resolution; a 1x1 conv gives the latent channels.
    No convolution runs at full resolution (3D convs are slow on CPUs).
    """

    def __init__(self, in_channels: int, channels: list[int], out_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for ch in channels:
            layers.append(Convolution(3, c, ch, strides=2, kernel_size=3, norm="INSTANCE"))
            layers.append(ResidualUnit(3, ch, ch, subunits=1, norm="INSTANCE"))
            c = ch
        self.body = nn.Sequential(*layers)
        self.out = Convolution(3, c, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class ConvDecoder3D(nn.Module):
    """(B, in, d, h, w) -> (B, C, d*2^n, h*2^n, w*2^n), the mirror of :class:`ConvEncoder3D`.

    A 1x1 conv from the latent, then per stage a :class:`ResidualUnit` and a stride-2
    transposed conv; the last transposed conv outputs the image channels (no norm), sigmoid.
    """

    def __init__(self, in_channels: int, channels: list[int], out_channels: int):
        super().__init__()
        rev = list(reversed(channels))
        self.inp = Convolution(3, in_channels, rev[0], kernel_size=1, norm="INSTANCE")
        layers: list[nn.Module] = []
        for i, ch in enumerate(rev):
            last = i + 1 == len(rev)
            nxt = out_channels if last else rev[i + 1]
            layers.append(ResidualUnit(3, ch, ch, subunits=1, norm="INSTANCE"))
            layers.append(
                Convolution(
                    3,
                    ch,
                    nxt,
                    strides=2,
                    kernel_size=3,
                    is_transposed=True,
                    norm="INSTANCE",
                    conv_only=last,
                )
            )
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(self.inp(z)))


class _ConvAutoencoderBase(nn.Module):
    """Shared plumbing: input check, encoder/decoder, ``reconstruct`` with MAESIL's signature."""

    latent_factor = 1  #: encoder outputs latent_factor * latent_channels (VAE: 2)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n = _stages(cfg)
        chans = _channels(cfg, n)
        self.latent_channels = cfg.options.latent_channels
        self.enc = ConvEncoder3D(cfg.in_channels, chans, self.latent_factor * self.latent_channels)
        self.dec = ConvDecoder3D(self.latent_channels, chans, cfg.in_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.in_channels, *self.cfg.superpatch)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"{type(self).__name__} expects input (B, {', '.join(map(str, expected))}) = the "
                f"superpatch {list(self.cfg.superpatch)}, got {tuple(x.shape)}."
            )

    def forward(
        self, x, mask=None, *, generator=None, valid=None
    ) -> PretrainOutput:  # pragma: no cover
        raise NotImplementedError

    def to_voxels(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The output is already in voxels (B, C, D, H, W)."""
        return pred

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
        """``(recon, mask[, raw])`` with recon = raw = the output and mask all zeros.

        ``mode``, ``ratio``, ``mask``, ``generator`` and ``valid`` are accepted for a uniform interface and
        ignored: an autoencoder sees the whole input.
        """
        self._check_input(x)
        was_training = self.training
        self.eval()
        try:
            out = self.forward(x)
        finally:
            self.train(was_training)
        raw = out.pred.to(x.dtype)
        vox = torch.zeros_like(x[:, :1])
        return (raw, vox, raw) if return_raw else (raw, vox)


class AE(_ConvAutoencoderBase):
    """Plain 3D convolutional autoencoder, MSE loss."""

    def forward(self, x: torch.Tensor, mask=None, *, generator=None, valid=None) -> PretrainOutput:
        self._check_input(x)
        pred = self.dec(self.enc(x))
        loss = valid_mse(pred, x, valid)
        return PretrainOutput(loss=loss, pred=pred.detach(), logs={})


class VAE(_ConvAutoencoderBase):
    """Variational autoencoder: loss = MSE + kl_weight * mean KL(q(z|x) || N(0, I))."""

    latent_factor = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.kl_weight = cfg.options.kl_weight

    def forward(self, x: torch.Tensor, mask=None, *, generator=None, valid=None) -> PretrainOutput:
        self._check_input(x)
        mu, logvar = self.enc(x).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if self.training:
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        pred = self.dec(z.to(x.dtype))
        rec = valid_mse(pred, x, valid)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec + self.kl_weight * kl
        return PretrainOutput(
            loss=loss,
            pred=pred.detach(),
            logs={"rec": float(rec.detach()), "kl": float(kl.detach())},
        )


class VQVAE(_ConvAutoencoderBase):
    """VQ-VAE with MONAI's EMA codebook, straight-through estimator, commitment loss, dead-code restart."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        opts = cfg.options  # VQVAEOptions
        self.codebook_size = opts.codebook_size
        self.restart_below = opts.vq_restart_below
        self.quantizer = EMAQuantizer(
            spatial_dims=3,
            num_embeddings=self.codebook_size,
            embedding_dim=self.latent_channels,
            commitment_cost=opts.commitment_cost,
            decay=opts.vq_decay,
        )

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, generator=None) -> int:
        """Move codes whose EMA usage fell below ``restart_below`` onto random encoder outputs."""
        q = self.quantizer
        dead = q.ema_cluster_size < self.restart_below
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        flat = z.detach().float().permute(0, 2, 3, 4, 1).reshape(-1, self.latent_channels)
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device, generator=generator)
        new = flat[pick] + 1e-3 * torch.randn(
            n_dead, self.latent_channels, device=flat.device, generator=generator
        )
        q.embedding.weight.data[dead] = new
        # a restarted code counts as used once, so it survives ~log(0.1)/log(decay) idle steps
        q.ema_w.data[dead] = new
        q.ema_cluster_size.data[dead] = 1.0
        return n_dead

    def forward(self, x: torch.Tensor, mask=None, *, generator=None, valid=None) -> PretrainOutput:
        self._check_input(x)
        z = self.enc(x).float()  # (B, c_lat, *grid)
        restarted = self._restart_dead_codes(z, generator) if self.training else 0
        with torch.autocast(x.device.type, enabled=False):
            zq, commit, idx = self.quantizer(z)
        pred = self.dec(zq.to(x.dtype))
        rec = valid_mse(pred, x, valid)
        loss = rec + commit
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.codebook_size).float()
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            used = int((counts > 0).sum())
        return PretrainOutput(
            loss=loss,
            pred=pred.detach(),
            logs={
                "rec": float(rec.detach()),
                "commitment": float(commit.detach()),
                "codes_used": float(used),
                "codebook_usage": used / self.codebook_size,
                "perplexity": float(perplexity),
                "codes_restarted": float(restarted),
            },
        )
