"""Method name -> model class.

Every pretraining model takes a :class:`~maesil_core.config.ModelConfig` and returns a
:class:`~maesil_core.models.base.PretrainOutput` from ``forward(x)`` with x (B, C, D, H, W)
in [0, 1]. Models with a ViT encoder expose it as ``model.encoder`` for fine-tuning.
:func:`build_from_checkpoint` rebuilds the model a checkpoint describes.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint, load_weights
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError

# method name -> "module:Class" (imported lazily so one broken method cannot break the others)
_METHODS: dict[str, str] = {
    "maesil": "maesil_core.models.maesil:MAESIL",
    "mae": "maesil_core.models.mae:MAE3D",
    "simmim": "maesil_core.models.mae:SimMIM",
    "gl-mae": "maesil_core.models.glmae:GLMAE",
    "ae": "maesil_core.models.autoencoders:AE",
    "vae": "maesil_core.models.autoencoders:VAE",
    "vq-vae": "maesil_core.models.autoencoders:VQVAE",
}


def register(name: str, target: str) -> None:
    """Register ``name`` -> ``"package.module:ClassName"``."""
    _METHODS[name] = target


def available_methods() -> list[str]:
    return sorted(_METHODS)


def model_class(method: str) -> type[nn.Module]:
    if method not in _METHODS:
        raise ConfigError(
            f"unknown method {method!r}; choose one of {', '.join(available_methods())}."
        )
    module_name, class_name = _METHODS[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate ``cfg`` and build the model it describes."""
    cfg.validate()
    return model_class(cfg.method)(cfg)


def build_from_checkpoint(path: str | Path | Checkpoint) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a pretraining model from its checkpoint (run dir, file or loaded
    :class:`~maesil_core.checkpoint.Checkpoint`), in eval mode on the CPU."""
    ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    if ckpt.kind != "pretrain":
        raise CheckpointError(_not_pretraining(ckpt.path, ckpt.kind, ckpt.meta.method))
    try:
        model = build_model(ckpt.config.model)
    except ConfigError as exc:
        raise CheckpointError(
            f"{ckpt.path} carries a config this version cannot build: {exc}"
        ) from exc
    load_weights(model, ckpt.state_dict, str(ckpt.path))
    return model.eval(), ckpt


def _not_pretraining(path: str | Path, kind: str, method: str) -> str:
    """The one line for a checkpoint of another kind where a pretraining one is needed."""
    use = "maesil segment / evaluate" if kind == "segmentation" else "the command that made it"
    return (
        f"{path} is a {kind} checkpoint ({method}), not a pretraining one; give a pretraining "
        f"run (maesil pretrain) here, or use this one with {use}."
    )
