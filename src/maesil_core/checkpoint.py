"""Checkpoints: safetensors weights + a JSON file that rebuilds the model.

A run directory looks like::

    RUN_DIR/
      config.json                      the RunConfig of the run
      metrics.csv, loss.png            written by the training loop
      checkpoints/
        step_000100.safetensors        weights (the JSON below is also in its header)
        step_000100.json               kind, method, RunConfig, step, versions, extras
        step_000100.state.safetensors  optimiser + RNG state for --resume (no pickle:
                                       :mod:`maesil_core.resume_state`)

The metadata is a :class:`CheckpointMeta` (kind, method, RunConfig, step, extras, metrics,
versions). Writes are atomic (:mod:`maesil_core.files`) and the JSON is written last, so a
run killed at any moment leaves only complete checkpoints. Anywhere a checkpoint is asked
for, a run directory (its newest checkpoint), a ``.safetensors`` file or its ``.json`` work.
Rebuilding a model from a checkpoint is the model registry's job
(:func:`maesil_core.models.registry.build_from_checkpoint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from . import __version__
from .config import RunConfig
from .errors import CheckpointError, ConfigError
from .files import atomic_write, atomic_write_text
from .resume_state import OLD_SUFFIX, SUFFIX, save_resume_state

FORMAT = "maesil-checkpoint"
FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself (its ``.json``, also in the safetensors header)."""

    kind: str  #: "pretrain", "segmentation" or "classification"
    method: str  #: the model's method (``cfg.model.method``)
    config: RunConfig  #: everything needed to rebuild the model and its preprocessing
    step: int  #: optimiser steps taken when it was written
    preset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  #: the task's own record (labels, data)
    metrics: dict[str, float] = field(default_factory=dict)  #: the log row at that step
    package_version: str = __version__
    torch_version: str = torch.__version__
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout (the same keys, in the same order, as format version 1), as it
        reads back from the file."""
        return {
            "format": self.format,
            "format_version": self.format_version,
            "kind": self.kind,
            "method": self.method,
            "preset": self.preset,
            "step": self.step,
            "config": json.loads(json.dumps(self.config.to_dict())),  # tuples as JSON lists
            "extra": self.extra,
            "metrics": self.metrics,
            "package_version": self.package_version,
            "torch_version": self.torch_version,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str | Path) -> CheckpointMeta:
        """Parse and check the JSON of ``source``; CheckpointError naming what is wrong."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: its metadata is not a JSON object; it is corrupt.")
        if d.get("format") != FORMAT or int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has checkpoint format {d.get('format')} v{d.get('format_version')}; "
                f"this maesil ({__version__}) reads {FORMAT} v{FORMAT_VERSION}: upgrade "
                "napari-maesil."
            )
        if not isinstance(d.get("config"), dict):
            raise CheckpointError(
                f"{source}: its metadata has no config to rebuild the model from; it is corrupt."
            )
        try:
            config = RunConfig.from_dict(d["config"])
            return cls(
                kind=str(d.get("kind", "pretrain")),
                method=str(d.get("method", config.model.method)),
                config=config,
                step=int(d.get("step", 0)),
                preset=str(d.get("preset") or ""),
                extra=dict(d.get("extra") or {}),
                metrics=dict(d.get("metrics") or {}),
                package_version=str(d.get("package_version", "")),
                torch_version=str(d.get("torch_version", "")),
                created=str(d.get("created", "")),
                format=d["format"],
                format_version=int(d["format_version"]),
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{source} carries a config this version cannot read ({exc}); it is corrupt or "
                "from another version."
            ) from exc


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it is, what it is (:class:`CheckpointMeta`), its weights."""

    path: Path  #: the .safetensors file
    meta: CheckpointMeta
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    @property
    def config(self) -> RunConfig:
        """A fresh copy of the run's config (callers may change it)."""
        return RunConfig.from_dict(self.meta.config.to_dict())

    @property
    def kind(self) -> str:
        """``"pretrain"`` or ``"segmentation"`` (or another task)."""
        return self.meta.kind

    @property
    def step(self) -> int:
        return self.meta.step


# --------------------------------------------------------------------------- writing


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    cfg: RunConfig,
    step: int,
    *,
    kind: str = "pretrain",
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step_{step:06d}.*`` in ``run_dir``; return the .safetensors path.

    With ``optimizer`` the resume state (its state and ``rng``) goes beside the weights.
    """
    ckpt_dir = Path(run_dir) / CKPT_DIR
    stem = ckpt_dir / f"step_{step:06d}"
    meta = CheckpointMeta(
        kind=kind,
        method=cfg.model.method,
        config=cfg,
        step=int(step),
        preset=cfg.preset,
        extra=extra or {},
        metrics=metrics or {},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    ).to_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    header = {"maesil": json.dumps(meta)}
    weights = stem.with_suffix(".safetensors")
    try:  # the .json last: a checkpoint counts once it is there (list_checkpoints)
        atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=header))
        if optimizer is not None:
            resume = {"step": int(step), "optimizer": optimizer.state_dict(), "rng": rng or {}}
            save_resume_state(weights, resume)
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2))
    except BaseException:  # a full disk, a kill: no piece of this step stays behind
        for suffix in (".json", SUFFIX, ".safetensors"):
            weights.with_suffix(suffix).unlink(missing_ok=True)
        raise
    return weights


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of a run."""
    found = list_checkpoints(run_dir)
    for weights in found[:-keep] if keep > 0 else []:
        for suffix in (".json", SUFFIX, OLD_SUFFIX, ".safetensors"):
            weights.with_suffix(suffix).unlink(missing_ok=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (JSON written), oldest first (by the step number in
    their names, which only orders them: a checkpoint's step is in its metadata)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not ckpt_dir.is_dir():
        return []
    done = [
        j.with_suffix(".safetensors")
        for j in sorted(ckpt_dir.glob("step_*.json"))
        if j.with_suffix(".safetensors").is_file()
    ]
    return sorted(done, key=lambda p: int(p.stem.split("_")[1]))


# --------------------------------------------------------------------------- reading


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a ``.safetensors`` or a ``.json`` -> the ``.safetensors`` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give a run directory or a .safetensors file."
        )
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(
                f"{path} holds no checkpoint (no {CKPT_DIR}/step_*.safetensors); "
                "give a finished run directory or a .safetensors file."
            )
        return found[-1]
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing beside its .json; the checkpoint is incomplete."
            )
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} is not a maesil checkpoint; give a run directory or a .safetensors file."
        )
    return path


def read_meta(path: str | Path) -> CheckpointMeta:
    """The checkpoint's metadata (from the safetensors header), without loading the weights."""
    weights = resolve_checkpoint(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({exc}); it is corrupt or not a "
            "checkpoint: use another checkpoint of the run."
        ) from exc
    if "maesil" not in header:
        raise CheckpointError(
            f"{weights} is a safetensors file without maesil metadata; it was not written by "
            "maesil and cannot be rebuilt."
        )
    try:
        meta = json.loads(header["maesil"])
    except ValueError as exc:
        raise CheckpointError(f"{weights}: its metadata is not valid JSON; it is corrupt.") from exc
    return CheckpointMeta.from_dict(meta, weights)


def load_checkpoint(
    path: str | Path, *, kind: str | None = None, weights_too: bool = True
) -> Checkpoint:
    """Load weights and metadata. ``kind`` (e.g. ``"segmentation"``) is checked if given.

    ``weights_too=False`` reads the metadata only (``state_dict`` stays empty): for a resume,
    which needs the run's config and step while ``fit`` loads the weights itself.
    """
    weights = resolve_checkpoint(path)
    meta = read_meta(weights)
    if kind is not None and meta.kind != kind:
        raise CheckpointError(
            f"{weights} is a {meta.kind} checkpoint ({meta.method}), but a {kind} "
            f"checkpoint is needed here."
        )
    if not weights_too:
        return Checkpoint(path=weights, meta=meta, state_dict={})
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights} is corrupt ({exc}); use another checkpoint of the run."
        ) from exc
    return Checkpoint(path=weights, meta=meta, state_dict=state)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict`` into ``model``, or explain what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shapes differ: {', '.join(mismatched[:3])}")
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source} does not fit this model ({'; '.join(parts)}): it was trained with another "
            "architecture; use a checkpoint of the same method and preset."
        )
    model.load_state_dict(state_dict, strict=True)


def load_vit_encoder(encoder: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """Copy the ``encoder.*`` weights of a pretraining state dict into ``encoder`` (a
    :class:`~maesil_core.models.vit3d.ViTEncoder3D`); return how many.

    Raises CheckpointError when there are none (a conv autoencoder's checkpoint) or when
    they do not fit (:func:`load_weights`).
    """
    enc = {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not enc:
        raise CheckpointError(
            f"{source} holds no ViT encoder weights (no 'encoder.*' keys): give a pretraining "
            "checkpoint of a method with a ViT encoder (maesil, mae, simmim, gl-mae); the conv "
            "autoencoders (ae, vae, vq-vae) fine-tune through their own segmenter."
        )
    load_weights(encoder, enc, source)
    return len(enc)
