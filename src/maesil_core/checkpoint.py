"""Checkpoints: safetensors weights + a JSON file that rebuilds the model.

A run directory looks like::

    RUN_DIR/
      config.json                      the RunConfig of the run
      metrics.csv, loss.png            written by the training loop
      checkpoints/
        step_000100.safetensors        weights (the JSON below is also in its header)
        step_000100.json               kind, method, RunConfig, step, versions, extras
        step_000100.state.pt           optimiser + RNG state, for --resume

Writes are atomic (temporary file, then ``os.replace``) and the JSON is written last, so a
run killed at any moment leaves only complete checkpoints. Anywhere a checkpoint is asked
for, a run directory (its newest checkpoint), a ``.safetensors`` file or its ``.json`` work.
"""

from __future__ import annotations

import json
import os
import tempfile
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

FORMAT = "maesil-checkpoint"
FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it is, what it is, and its weights."""

    path: Path  #: the .safetensors file
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.meta["config"])

    @property
    def kind(self) -> str:
        """``"pretrain"`` or ``"segmentation"`` (or another task)."""
        return self.meta.get("kind", "pretrain")

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def state_path(self) -> Path:
        return self.path.with_suffix(".state.pt")


# --------------------------------------------------------------------------- writing


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
    """Write ``checkpoints/step_{step:06d}.*`` in ``run_dir``; return the .safetensors path."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    stem = ckpt_dir / f"step_{step:06d}"
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "method": cfg.model.method,
        "preset": cfg.preset,
        "step": int(step),
        "config": cfg.to_dict(),
        "extra": extra or {},
        "metrics": metrics or {},
        "package_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    header = {"maesil": json.dumps(meta)}
    weights = stem.with_suffix(".safetensors")
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=header))
    if optimizer is not None:
        resume_state = {"step": int(step), "optimizer": optimizer.state_dict(), "rng": rng or {}}
        atomic_write(stem.with_suffix(".state.pt"), lambda tmp: torch.save(resume_state, tmp))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2))
    return weights


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of a run."""
    found = list_checkpoints(run_dir)
    for weights in found[:-keep] if keep > 0 else []:
        for suffix in (".json", ".state.pt", ".safetensors"):
            weights.with_suffix(suffix).unlink(missing_ok=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (JSON written), oldest first."""
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


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON (from the safetensors header), without loading the weights."""
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
    meta = json.loads(header["maesil"])
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{weights} has checkpoint format {meta.get('format')} v{meta.get('format_version')}; "
            f"this maesil ({__version__}) reads {FORMAT} v{FORMAT_VERSION}: upgrade napari-maesil."
        )
    return meta


def load_checkpoint(
    path: str | Path, *, kind: str | None = None, weights_too: bool = True
) -> Checkpoint:
    """Load weights and metadata. ``kind`` (e.g. ``"segmentation"``) is checked if given.

    ``weights_too=False`` reads the metadata only (``state_dict`` stays empty): for a resume,
    which needs the run's config and step while ``fit`` loads the weights itself.
    """
    weights = resolve_checkpoint(path)
    meta = read_meta(weights)
    if kind is not None and meta.get("kind", "pretrain") != kind:
        raise CheckpointError(
            f"{weights} is a {meta.get('kind')} checkpoint ({meta.get('method')}), but a {kind} "
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


def build_from_checkpoint(path: str | Path | Checkpoint) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a pretraining model from its checkpoint (eval mode, on the CPU)."""
    from .models import build_model

    ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    try:
        cfg = ckpt.config
        model = build_model(cfg.model)
    except ConfigError as exc:
        raise CheckpointError(
            f"{ckpt.path} carries a config this version cannot build: {exc}"
        ) from exc
    load_weights(model, ckpt.state_dict, str(ckpt.path))
    return model.eval(), ckpt


def load_resume_state(weights: Path) -> dict[str, Any] | None:
    """Optimiser and RNG state saved beside ``weights``, or None."""
    state_path = weights.with_suffix(".state.pt")
    if not state_path.is_file():
        return None
    try:
        return torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt pickle: any exception type
        raise CheckpointError(
            f"{state_path} is corrupt ({exc}); delete it to resume from the weights alone."
        ) from exc
