"""A classifier on the project's ViT encoder: token mean, LayerNorm, Linear.

The encoder is :class:`~.vit3d.ViTEncoder3D` (the ``.encoder`` of every ViT pretraining
model), so a pretraining checkpoint's ``encoder.*`` weights drop straight in. The task that
trains it (organ presence in a crop) is :mod:`maesil_core.classification`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .vit3d import ViTEncoder3D


class EncoderClassifier(nn.Module):
    """(B, C, *superpatch) -> logits (B, num_outputs): ViT encoder, token mean, LayerNorm, Linear."""

    def __init__(self, cfg: ModelConfig, num_outputs: int):
        super().__init__()
        if num_outputs < 1:
            raise ConfigError("a classifier needs at least one output.")
        self.cfg = cfg
        self.encoder = ViTEncoder3D(cfg)
        self.head_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_outputs)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(x)  # (B, L, E), any size the patch divides
        return self.head(self.head_norm(tokens.mean(dim=1)))

    def load_encoder(self, state_dict: dict[str, torch.Tensor], source: str) -> int:
        """Copy the ``encoder.*`` weights of a pretraining state dict; return how many
        (:func:`~maesil_core.checkpoint.load_vit_encoder`)."""
        from ..checkpoint import load_vit_encoder

        return load_vit_encoder(self.encoder, state_dict, source)
