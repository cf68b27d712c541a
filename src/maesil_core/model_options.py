"""Per-method model options: ``ModelConfig.extra``, typed and checked before a run starts.

``extra`` stays a plain JSON object in configs and checkpoints (``{"global_scale": 2}``), so
every earlier checkpoint loads; :func:`parse_options` turns it into the method's options
dataclass, refusing unknown keys and impossible values with the fix, and filling the
defaults. ``ModelConfig.options`` is that dataclass; ``ModelConfig.validate`` calls it, so a
bad option fails before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class NoOptions:
    """MAE-3D has no method options."""

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class MAESILOptions:
    """MAESIL's decoder (both on in the ``tiny`` preset, measured in RESULTS.md; off by
    default, so a checkpoint written without them builds the model it was)."""

    #: "none", or "interpolation": the decoder predicts the residual over the hidden voxels
    #: interpolated from the visible ones (a fixed Gaussian normalised convolution, as
    #: ``metrics.fill_from_visible``), its head starting at zero: training starts from the
    #: interpolation reference instead of from noise
    decoder_prior: str = "none"
    #: a depthwise 3x3x3 convolution over the token grid before each decoder block
    #: (a local-global decoder: neighbours mix directly, attention mixes the rest)
    decoder_local: bool = False
    #: channels of a voxel-level refinement of the prediction (0 = none): three 3x3x3
    #: convolutions (dilations 1, 2, 4: 15 voxels seen) over the predicted, the visible
    #: voxels and the mask add a correction on the hidden voxels, starting at zero
    decoder_refine: int = 0

    def check(self) -> None:
        if self.decoder_prior not in ("none", "interpolation"):
            raise ConfigError(
                f"extra decoder_prior must be none or interpolation, got {self.decoder_prior!r}."
            )
        if self.decoder_refine < 0:
            raise ConfigError(
                f"extra decoder_refine must be 0 (off) or a channel count, got {self.decoder_refine}."
            )


@dataclass(frozen=True)
class SimMIMOptions:
    simmim_loss: str = "l1"  #: "l1" (SimMIM's choice) or "mse", on the masked patches

    def check(self) -> None:
        if self.simmim_loss not in ("l1", "mse"):
            raise ConfigError(f"extra simmim_loss must be l1 or mse, got {self.simmim_loss!r}.")


@dataclass(frozen=True)
class GLMAEOptions:
    global_scale: int = 2  #: s: views are superpatch / s voxels; the global view pools by s
    n_local: int = 2  #: local views per sample and step
    ema_momentum: float = 0.99  #: teacher <- m * teacher + (1 - m) * student per optimiser step
    consistency_weight: float = 1.0  #: weight of g2g + g2l beside the two reconstructions
    proj_dim: int = 128  #: projector / predictor output width
    proj_hidden: int | None = None  #: their hidden width; None: 2 x embed_dim

    def check(self) -> None:
        if self.global_scale < 1 or self.n_local < 1 or self.proj_dim < 1:
            raise ConfigError("extra global_scale, n_local and proj_dim must be at least 1.")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"extra ema_momentum must be in [0, 1], got {self.ema_momentum}.")
        if self.proj_hidden is not None and self.proj_hidden < 1:
            raise ConfigError("extra proj_hidden must be at least 1 (or left out).")


@dataclass(frozen=True)
class ConvAEOptions:
    """AE (and the base of VAE / VQ-VAE): widths of the conv encoder / decoder."""

    ae_channels: tuple[int, ...] | None = None  #: per stage; None: b, 2b, 4b, ...
    ae_base_channels: int | None = None  #: b; None: max(8, embed_dim // 4)
    latent_channels: int = 16  #: bottleneck width (one latent vector per patch)

    def check(self) -> None:
        if self.latent_channels < 1:
            raise ConfigError("extra latent_channels must be at least 1.")
        if self.ae_base_channels is not None and self.ae_base_channels < 1:
            raise ConfigError("extra ae_base_channels must be at least 1.")
        if self.ae_channels is not None and any(c < 1 for c in self.ae_channels):
            raise ConfigError(f"extra ae_channels must be positive, got {list(self.ae_channels)}.")


@dataclass(frozen=True)
class VAEOptions(ConvAEOptions):
    kl_weight: float = 1e-3  #: weight of the KL term per latent element

    def check(self) -> None:
        super().check()
        if self.kl_weight < 0:
            raise ConfigError(f"extra kl_weight must be 0 or more, got {self.kl_weight}.")


@dataclass(frozen=True)
class VQVAEOptions(ConvAEOptions):
    codebook_size: int = 256
    vq_restart_below: float = 0.1  #: restart codes whose EMA usage falls below this
    commitment_cost: float = 0.25
    vq_decay: float = 0.99  #: EMA decay of the codebook

    def check(self) -> None:
        super().check()
        if self.codebook_size < 2:
            raise ConfigError(f"extra codebook_size must be at least 2, got {self.codebook_size}.")
        if not 0.0 < self.vq_decay < 1.0:
            raise ConfigError(f"extra vq_decay must be in (0, 1), got {self.vq_decay}.")


#: method -> its options class (a method not listed takes no options)
METHOD_OPTIONS: dict[str, type] = {
    "maesil": MAESILOptions,
    "simmim": SimMIMOptions,
    "gl-mae": GLMAEOptions,
    "ae": ConvAEOptions,
    "vae": VAEOptions,
    "vq-vae": VQVAEOptions,
}


def parse_options(method: str, extra: dict[str, Any] | None) -> Any:
    """The options dataclass of ``method`` from ``extra``; ConfigError naming the key and
    the known ones when a key is unknown, or a value has the wrong type or range."""
    cls = METHOD_OPTIONS.get(method, NoOptions)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(extra or {})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(
            f"unknown option {unknown[0]!r} in model extra for method {method} (its options: "
            f"{known}); remove it or fix its name."
        )
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(key, value, str(fields[key].type))
    options = cls(**kwargs)
    options.check()
    return options


def _coerce(key: str, value: Any, kind: str) -> Any:
    """``value`` as the field's type (``int``, ``float``, ``str``, ``bool``, optional, int
    tuple)."""
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind.startswith("tuple"):
            return tuple(int(v) for v in value)
        if kind.startswith("int"):
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model extra {key} = {value!r} is not a valid {kind.split(' ')[0]}."
        ) from exc
    return value
