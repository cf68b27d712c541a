"""Encoder weights to and from MONAI's ``ViT`` (and, for the matching segmenter, ``UNETR``).

Longer than 500 lines because the name mapping (ours <-> MONAI's ViT / UNETR keys, position
embeddings, the qkv split) is one table read both ways: export and import stay together so
they cannot drift apart.

    from maesil_core.interop import monai_vit

    out = monai_vit.export_vit("runs/ct", "vit.pt")          # + vit.json: ViT(**kwargs)
    vit = monai.networks.nets.ViT(**out.kwargs)
    vit.load_state_dict(torch.load("vit.pt", weights_only=True), strict=True)

    monai_vit.import_vit("ssl_vit.pt", "runs/imported", preset("mim-med3d"))

Our :class:`~maesil_core.models.vit3d.ViTEncoder3D` and MONAI's ``ViT`` are the same
network up to parameter names, with these differences (what maps exactly and what not):

=====================  ==========================  ==================================
                       maesil encoder              MONAI ``ViT``
=====================  ==========================  ==================================
patch embedding        Conv3d, kernel = stride     ``proj_type="conv"`` (same weights);
                                                   ``"perceptron"`` is converted exactly
position embedding     fixed 3D sin-cos on any     a (1, L, E) parameter for one
                       grid (``pos_embed=sincos``)  ``img_size``: ours is written into it
                       or ``learned`` (saved)      for the grid asked, exact
qkv bias               yes                         ``qkv_bias=True`` (export); weights
                                                   without it import as zero bias, exact
LayerNorm epsilon      1e-6 (``norm_eps``)         1e-5, fixed in MONAI: an export of a
                                                   1e-6 encoder differs slightly (the
                                                   test measures it); an import sets
                                                   ``norm_eps=1e-5``, exact
class token            none                        ``classification=False``; weights
                                                   with a class token are refused
MLP / attention        GELU, SDPA, same head split  GELU (default ``act``), same
=====================  ==========================  ==================================

MONAI's ``UNETR`` is our :class:`~maesil_core.models.segmenter.UNETRSegmenter` with a patch of
16, 12 blocks and the decoder fed by blocks 3, 6, 9 (0-based, MONAI's ``hidden_states_out[3]``
...) and the last one: a segmentation checkpoint of that shape exports to it; other shapes are
refused with what differs. What cannot be read from the weights (the number of heads, the
activation) comes from the preset / config given to :func:`import_vit`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, load_checkpoint, load_weights, save_checkpoint
from ..config import ModelConfig, RunConfig, as_int3
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write, atomic_write_text
from ..models.vit3d import pos_embed_3d_sincos, resize_pos_embed

#: LayerNorm epsilon of every MONAI ViT (``nn.LayerNorm(hidden_size)``)
MONAI_NORM_EPS = 1e-5
#: the blocks MONAI's UNETR feeds to its decoder (``hidden_states_out[3], [6], [9]``) + the last
MONAI_UNETR_LAYERS = [3, 6, 9, 11]
#: what a ViT's weights are called inside the models that hold one
_POS = "patch_embedding.position_embeddings"

# our block names -> MONAI TransformerBlock names (same tensors, same layout)
_BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.linear1",
    "mlp.fc2": "mlp.linear2",
}


@dataclass
class Export:
    """What an export wrote: the weights, the JSON of constructor arguments beside them."""

    path: Path
    kwargs_path: Path
    net: str  #: "ViT" or "UNETR" (``monai.networks.nets``)
    kwargs: dict[str, Any]


# --------------------------------------------------------------------------- ours -> MONAI


def vit_kwargs(cfg: ModelConfig, img_size: tuple[int, int, int]) -> dict[str, Any]:
    """``monai.networks.nets.ViT(**kwargs)`` for ``cfg``'s encoder at ``img_size`` voxels."""
    return {
        "in_channels": int(cfg.in_channels),
        "img_size": list(img_size),
        "patch_size": list(cfg.patch),
        "hidden_size": int(cfg.embed_dim),
        "mlp_dim": int(cfg.embed_dim * cfg.mlp_ratio),
        "num_layers": int(cfg.depth),
        "num_heads": int(cfg.num_heads),
        "proj_type": "conv",
        "pos_embed_type": "learnable",  # a parameter: ours is written into it
        "classification": False,
        "dropout_rate": 0.0,
        "spatial_dims": 3,
        "qkv_bias": True,
    }


def _grid(cfg: ModelConfig, img_size: tuple[int, int, int]) -> tuple[int, int, int]:
    if any(s % p for s, p in zip(img_size, cfg.patch)):
        raise ConfigError(
            f"image size {list(img_size)} is not a multiple of the patch {list(cfg.patch)}: "
            "give an `img_size` that the patch divides on every axis.",
            option="img_size",
        )
    return tuple(s // p for s, p in zip(img_size, cfg.patch))  # type: ignore[return-value]


def encoder_to_vit(
    encoder: Mapping[str, torch.Tensor], cfg: ModelConfig, img_size: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """Our encoder's state dict (keys without ``encoder.``) -> a MONAI ``ViT`` state dict.

    The position embedding is evaluated (``sincos``) or resized (``learned``) for the patch
    grid of ``img_size``; MONAI's unused ``norm_cross_attn`` gets ones and zeros.
    """
    grid = _grid(cfg, img_size)
    if "pos_embed" in encoder:  # learned: stored on cfg.grid
        pos = resize_pos_embed(encoder["pos_embed"][0], cfg.grid, grid)[None]
    else:
        pos = pos_embed_3d_sincos(cfg.embed_dim, grid)[None]  # (1, L, E)
    out = {
        _POS: pos.contiguous(),
        "patch_embedding.patch_embeddings.weight": encoder["patch_embed.proj.weight"],
        "patch_embedding.patch_embeddings.bias": encoder["patch_embed.proj.bias"],
        "norm.weight": encoder["norm.weight"],
        "norm.bias": encoder["norm.bias"],
    }
    e = cfg.embed_dim
    for i in range(cfg.depth):
        for ours, theirs in _BLOCK_NAMES.items():
            for part in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{part}"] = encoder[f"blocks.{i}.{ours}.{part}"]
        out[f"blocks.{i}.norm_cross_attn.weight"] = torch.ones(e)
        out[f"blocks.{i}.norm_cross_attn.bias"] = torch.zeros(e)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def unetr_problem(cfg: ModelConfig, layers: list[int]) -> str:
    """'' when a segmenter of ``cfg`` with decoder ``layers`` is MONAI's ``UNETR``, else why not."""
    problems = []
    if tuple(cfg.patch) != (16, 16, 16):
        problems.append(f"patch {list(cfg.patch)} (UNETR: 16)")
    if cfg.depth != 12:
        problems.append(f"{cfg.depth} blocks (UNETR: 12)")
    if [j % cfg.depth for j in layers] != MONAI_UNETR_LAYERS:
        problems.append(f"decoder fed by blocks {layers} (UNETR: {MONAI_UNETR_LAYERS})")
    if getattr(cfg, "pos_embed", "sincos") not in ("sincos", "learned"):
        problems.append(f"position embedding {cfg.pos_embed}")
    return ", ".join(problems)


def segmenter_to_unetr(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, img_size: tuple[int, int, int]
) -> dict[str, torch.Tensor]:
    """A :class:`UNETRSegmenter` state dict (patch 16, 12 blocks) -> MONAI ``UNETR``'s."""
    enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    out = {f"vit.{k}": v for k, v in encoder_to_vit(enc, cfg, img_size).items()}
    # our skips[0..3] / ups[3..0] are UNETR's encoder1..4 / decoder5..2, block for block
    rename = {"skips.0.": "encoder1.", "skips.1.": "encoder2.", "skips.2.": "encoder3."}
    rename |= {"skips.3.": "encoder4.", "ups.3.": "decoder5.", "ups.2.": "decoder4."}
    rename |= {"ups.1.": "decoder3.", "ups.0.": "decoder2.", "out.": "out."}
    for key, value in state.items():
        for ours, theirs in rename.items():
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = value.detach().clone().contiguous()
                break
    return out


def _load_ckpt(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    p = Path(checkpoint).expanduser()
    if p.is_dir() and (p / "best.safetensors").is_file() and (p / "best.json").is_file():
        p = p / "best.safetensors"
    return load_checkpoint(p)


def _write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    else:  # a plain dict of tensors: torch.load(..., weights_only=True) reads it
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def _check_out(path: Path, force: bool) -> Path:
    path = Path(path).expanduser()
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise ConfigError(f"`out` {path} must end in .pt, .pth or .safetensors.", option="out")
    kwargs_path = path.with_suffix(".json")
    for target in (path, kwargs_path):
        if target.is_dir():
            raise ConfigError(
                f"`out` {target} is a folder; give a file name ending in .pt.", option="out"
            )
        if target.exists() and not force:
            raise ConfigError(
                f"{target} exists; pass `force` to overwrite it or choose another `out`.",
                option="force",
            )
    return kwargs_path


def _vit_encoder_config(ckpt: Checkpoint) -> ModelConfig:
    from ..models.segmenter import is_conv

    cfg = ckpt.config.model
    if is_conv(cfg):
        raise CheckpointError(
            f"{ckpt.path} is a {cfg.method} checkpoint: a convolutional encoder, not a ViT; "
            "only maesil, mae, simmim and gl-mae checkpoints export to MONAI's ViT."
        )
    return cfg


def export_vit(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    img_size: int | tuple[int, ...] | None = None,
    force: bool = False,
) -> Export:
    """Write the encoder of a pretraining or segmentation checkpoint as a MONAI ``ViT`` state
    dict (``out``, .pt or .safetensors) and ``ViT(**kwargs)`` beside it (same stem, .json).

    ``img_size`` (voxels): the input size MONAI's ViT will take (its position embedding is
    fixed to it); default the superpatch (pretraining) or the segmentation ROI.
    """
    out = Path(out).expanduser()
    kwargs_path = _check_out(out, force)
    ckpt = _load_ckpt(checkpoint)
    cfg = _vit_encoder_config(ckpt)
    size = as_int3(img_size, "img_size") if img_size else _default_size(ckpt)
    enc = {k[len("encoder.") :]: v for k, v in ckpt.state_dict.items() if k.startswith("encoder.")}
    if not enc:
        raise CheckpointError(f"{ckpt.path} holds no 'encoder.*' weights to export.")
    state = encoder_to_vit(enc, cfg, size)
    kwargs = vit_kwargs(cfg, size)
    _write_weights(state, out)
    atomic_write_text(kwargs_path, json.dumps(_describe("ViT", kwargs, ckpt), indent=2))
    return Export(out, kwargs_path, "ViT", kwargs)


def export_unetr(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    img_size: int | tuple[int, ...] | None = None,
    force: bool = False,
) -> Export:
    """Write a segmentation checkpoint as a MONAI ``UNETR`` state dict (+ its kwargs .json).

    Only a segmenter of MONAI's shape (patch 16, 12 blocks, decoder fed by blocks 3, 6, 9 and
    the last) is one: others are refused (CheckpointError naming what differs).
    """
    out = Path(out).expanduser()
    kwargs_path = _check_out(out, force)
    ckpt = _load_ckpt(checkpoint)
    if ckpt.kind != "segmentation":
        raise CheckpointError(
            f"{ckpt.path} is a {ckpt.kind} checkpoint; MONAI's UNETR is a segmenter: fine-tune "
            "first (maesil finetune), or export the encoder with `format` monai-vit."
        )
    cfg = _vit_encoder_config(ckpt)
    seg, labels = segmentation_extra(ckpt)
    from ..models.segmenter import default_layers, upsampling_stages

    layers = list(seg.get("layers") or default_layers(cfg.depth, upsampling_stages(cfg.patch)))
    problem = unetr_problem(cfg, layers)
    if problem:
        raise CheckpointError(
            f"{ckpt.path} is not MONAI's UNETR shape ({problem}); export the encoder with "
            "`format` monai-vit, or the whole segmenter with `format` monai-bundle."
        )
    size = as_int3(img_size, "img_size") if img_size else _default_size(ckpt)
    state = segmenter_to_unetr(ckpt.state_dict, cfg, size)
    kwargs = {
        "in_channels": int(cfg.in_channels),
        "out_channels": len(labels["classes"]) + 1,
        "img_size": list(size),
        "feature_size": int(seg.get("feature_size", 16)),
        "hidden_size": int(cfg.embed_dim),
        "mlp_dim": int(cfg.embed_dim * cfg.mlp_ratio),
        "num_heads": int(cfg.num_heads),
        "proj_type": "conv",
        "norm_name": seg.get("norm", "instance"),
        "conv_block": True,
        "res_block": True,
        "dropout_rate": 0.0,
        "spatial_dims": 3,
        "qkv_bias": True,
    }
    _write_weights(state, out)
    atomic_write_text(kwargs_path, json.dumps(_describe("UNETR", kwargs, ckpt), indent=2))
    return Export(out, kwargs_path, "UNETR", kwargs)


def segmentation_extra(ckpt: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """A segmentation checkpoint's stored settings and label set (plain dicts)."""
    extra = ckpt.meta.extra
    if "segmentation" not in extra or "labels" not in extra:
        raise CheckpointError(f"{ckpt.path} lacks its label set / segmentation settings.")
    return extra["segmentation"], extra["labels"]


def _default_size(ckpt: Checkpoint) -> tuple[int, int, int]:
    roi = (ckpt.meta.extra.get("segmentation") or {}).get("roi")
    return as_int3(roi) if roi else tuple(ckpt.config.model.superpatch)  # type: ignore[return-value]


def _describe(net: str, kwargs: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config.model
    note = (
        "exact"
        if math.isclose(float(cfg.norm_eps), MONAI_NORM_EPS)
        else f"LayerNorm eps {cfg.norm_eps:g} here, {MONAI_NORM_EPS:g} in MONAI: features "
        "differ slightly; set every nn.LayerNorm's eps to match for identical features"
    )
    return {
        "net": f"monai.networks.nets.{net}",
        "kwargs": kwargs,
        "source": str(ckpt.path),
        "method": cfg.method,
        "norm_eps": float(cfg.norm_eps),
        "agreement": note,
    }


# --------------------------------------------------------------------------- MONAI -> ours


@dataclass
class VitWeights:
    """A MONAI ViT found in a state dict, converted to our encoder's names."""

    encoder: dict[str, torch.Tensor]  #: our ViTEncoder3D keys
    embed_dim: int
    depth: int
    patch: tuple[int, int, int]
    in_channels: int
    mlp_ratio: float
    tokens: int  #: rows of the position embedding
    ignored: list[str]  #: keys that are not the ViT (e.g. ViTAutoEnc's or UNETR's decoder)
    qkv_bias: bool


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``, never unpickling
    code) or ``.safetensors``; one nested under ``state_dict`` / ``model`` / ``network`` is
    taken from there."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights {path} do not exist; give a .pt or .safetensors file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a corrupt zip, ... : one message
        raise CheckpointError(
            f"{path} is not a readable state dict of tensors ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no details'}); "
            "save it with torch.save(model.state_dict(), path)."
        ) from exc
    for key in ("state_dict", "model", "network"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} does not hold a state dict of tensors; save it with "
            "torch.save(model.state_dict(), path)."
        )
    return dict(obj)


def vit_to_encoder(state: Mapping[str, torch.Tensor], source: str, patch: Any = None) -> VitWeights:
    """Find a MONAI ViT in ``state`` (bare, or inside ``UNETR`` as ``vit.*``, ``ViTAutoEnc``,
    a DDP ``module.*`` ...) and convert it to our encoder's keys, exactly.

    ``patch`` is needed only for a ``proj_type="perceptron"`` embedding (a Linear over
    flattened patches, converted to the equivalent Conv3d). CheckpointError for what has no
    exact counterpart: a class token, cross-attention, a missing part.
    """
    hits = [k for k in state if k.endswith(_POS)]
    if not hits:
        raise CheckpointError(
            f"{source} holds no MONAI ViT (no '...{_POS}'); give the state dict of a "
            "monai.networks.nets.ViT (or of a model holding one, e.g. UNETR, ViTAutoEnc)."
        )
    prefix = min(hits, key=len)[: -len(_POS)]
    vit = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = sorted(k for k in state if not k.startswith(prefix))
    if "cls_token" in vit:
        raise CheckpointError(
            f"{source} has a class token (MONAI ViT(classification=True)); maesil's encoder has "
            "none and every patch token attends to it, so the features cannot be kept: export "
            "the ViT without classification."
        )
    if any(".cross_attn." in k for k in vit):
        raise CheckpointError(
            f"{source} has cross-attention blocks (with_cross_attention=True), which maesil's "
            "encoder does not have."
        )
    depth = 1 + max((int(k.split(".")[1]) for k in vit if k.startswith("blocks.")), default=-1)
    if depth < 1:
        raise CheckpointError(f"{source} has a position embedding but no transformer blocks.")
    pos = vit[_POS]  # (1, L, E)
    e = int(pos.shape[-1])
    enc: dict[str, torch.Tensor] = {"pos_embed": pos.reshape(1, -1, e)}
    if "patch_embedding.patch_embeddings.weight" in vit:  # conv
        w = vit["patch_embedding.patch_embeddings.weight"]  # (E, C, pd, ph, pw)
        if w.ndim != 5:
            raise CheckpointError(f"{source}: a {w.ndim - 2}D patch embedding, not a 3D one.")
        enc["patch_embed.proj.weight"] = w
        enc["patch_embed.proj.bias"] = vit["patch_embedding.patch_embeddings.bias"]
        p = tuple(int(s) for s in w.shape[2:])
    elif "patch_embedding.patch_embeddings.1.weight" in vit:  # perceptron: Linear over (p1 p2 p3 c)
        if patch is None:
            raise CheckpointError(
                f"{source} has a perceptron patch embedding; the patch size must come from "
                "the preset / config."
            )
        p = as_int3(patch, "patch")
        w = vit["patch_embedding.patch_embeddings.1.weight"]  # (E, p1*p2*p3*C)
        c = w.shape[1] // math.prod(p)
        if c * math.prod(p) != w.shape[1]:
            raise CheckpointError(
                f"{source}: a perceptron embedding of {w.shape[1]} inputs is not a patch of {list(p)}."
            )
        enc["patch_embed.proj.weight"] = w.reshape(e, *p, c).permute(0, 4, 1, 2, 3).contiguous()
        enc["patch_embed.proj.bias"] = vit["patch_embedding.patch_embeddings.1.bias"]
    else:
        raise CheckpointError(f"{source}: the ViT has no patch embedding weights.")
    qkv_bias = True
    mlp_dim = None
    try:
        for i in range(depth):
            for ours, theirs in _BLOCK_NAMES.items():
                for part in ("weight", "bias"):
                    key = f"blocks.{i}.{theirs}.{part}"
                    if key in vit:
                        enc[f"blocks.{i}.{ours}.{part}"] = vit[key]
                    elif key.endswith("attn.qkv.bias"):  # MONAI's default qkv_bias=False
                        qkv_bias = False
                        enc[f"blocks.{i}.{ours}.{part}"] = torch.zeros(3 * e)
                    else:
                        raise KeyError(key)
            mlp_dim = int(vit[f"blocks.{i}.mlp.linear1.weight"].shape[0])
        enc["norm.weight"] = vit["norm.weight"]
        enc["norm.bias"] = vit["norm.bias"]
    except KeyError as exc:
        raise CheckpointError(
            f"{source}: the ViT lacks {prefix}{exc.args[0]} (a variant without it, e.g. "
            "include_fc=False or separate q/k/v layers, has no exact counterpart here)."
        ) from exc
    known = {
        _POS,
        "patch_embedding.patch_embeddings.weight",
        "patch_embedding.patch_embeddings.bias",
        "patch_embedding.patch_embeddings.1.weight",
        "patch_embedding.patch_embeddings.1.bias",
        "norm.weight",
        "norm.bias",
    }
    for i in range(depth):
        known |= {f"blocks.{i}.{t}.{p}" for t in _BLOCK_NAMES.values() for p in ("weight", "bias")}
        known |= {f"blocks.{i}.norm_cross_attn.weight", f"blocks.{i}.norm_cross_attn.bias"}
    ignored += sorted(prefix + k for k in vit if k not in known)
    return VitWeights(
        encoder={k: v.detach().clone().float().contiguous() for k, v in enc.items()},
        embed_dim=e,
        depth=depth,
        patch=p,  # type: ignore[arg-type]
        in_channels=int(enc["patch_embed.proj.weight"].shape[1]),
        mlp_ratio=float(mlp_dim) / e,
        tokens=int(enc["pos_embed"].shape[1]),
        ignored=ignored,
        qkv_bias=qkv_bias,
    )


def imported_config(found: VitWeights, cfg: RunConfig, source: str) -> RunConfig:
    """``cfg`` (a preset / config) made to hold the weights: refused if its encoder differs
    from theirs; LayerNorm epsilon MONAI's and a learned (stored) position embedding."""
    from ..models.segmenter import is_conv

    model = cfg.model
    if is_conv(model):
        raise ConfigError(
            f"the preset's method {model.method} has a convolutional encoder; import a ViT into "
            "a ViT method (maesil, mae, simmim, gl-mae)."
        )
    theirs = {
        "embed_dim": found.embed_dim,
        "depth": found.depth,
        "patch": list(found.patch),
        "in_channels": found.in_channels,
        "mlp_ratio": found.mlp_ratio,
    }
    ours = {
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "patch": list(model.patch),
        "in_channels": model.in_channels,
        "mlp_ratio": float(model.mlp_ratio),
    }
    diffs = [f"{k} {theirs[k]} (weights) vs {ours[k]}" for k in theirs if theirs[k] != ours[k]]
    if diffs:
        raise ConfigError(
            f"{source} is another ViT than the preset's ({'; '.join(diffs)}): choose a preset "
            'of that shape or a `config` with {"model": {' + _json_fields(theirs) + "}}."
        )
    if found.tokens != model.num_patches:
        raise ConfigError(
            f"{source}'s position embedding has {found.tokens} tokens but the superpatch "
            f"{list(model.superpatch)} has {model.num_patches} patches: pass `img_size` with "
            "the img_size the ViT was built for.",
            option="img_size",
        )
    if model.embed_dim % model.num_heads:
        raise ConfigError(f"width {model.embed_dim} is not divisible by {model.num_heads} heads.")
    new = copy.deepcopy(cfg)
    new.model.norm_eps = MONAI_NORM_EPS
    new.model.pos_embed = "learned"
    return new.validate()


def _json_fields(d: dict[str, Any]) -> str:
    return ", ".join(f'"{k}": {json.dumps(v)}' for k, v in d.items())


def import_vit(
    weights: str | Path,
    run_dir: str | Path,
    cfg: RunConfig,
    *,
    img_size: int | tuple[int, ...] | None = None,
    force: bool = False,
) -> Path:
    """Turn a MONAI ViT state dict into a pretraining checkpoint in ``run_dir`` (step 0).

    The encoder holds the weights exactly (LayerNorm eps 1e-5, their position embedding
    stored); the reconstruction decoder of ``cfg``'s method is freshly initialised, so the
    checkpoint is marked ``encoder_only``: it fine-tunes (``maesil finetune --pretrained``),
    probes and exports; continuing pretraining (``maesil pretrain --out RUN --resume``)
    trains the decoder. The number of heads cannot be read from weights: it is ``cfg``'s.
    Returns the checkpoint's .safetensors path.
    """
    from ..models import build_model

    source = str(weights)
    state = read_state_dict(weights)
    cfg = copy.deepcopy(cfg)
    if img_size:
        cfg.model.superpatch = as_int3(img_size, "img_size")
    found = vit_to_encoder(state, source, patch=cfg.model.patch)
    cfg = imported_config(found, cfg, source)
    run_dir = Path(run_dir).expanduser()
    _prepare(run_dir, force)
    model = build_model(cfg.model)
    load_weights(model.encoder, found.encoder, source)
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    extra = {
        "encoder_only": True,
        "imported": {
            "from": "monai-vit",
            "weights": str(Path(weights).expanduser().resolve()),
            "sha256": digest,
            "qkv_bias": found.qkv_bias,
            "ignored_keys": len(found.ignored),
        },
    }
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    return save_checkpoint(run_dir, model, cfg, 0, kind="pretrain", extra=extra)


def _prepare(run_dir: Path, force: bool) -> None:
    from ..checkpoint import CKPT_DIR

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; `run_dir` needs a directory.", option="run_dir")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise ConfigError(
                f"{run_dir} is not empty; pass `force` to replace its checkpoints or choose "
                "another `run_dir`.",
                option="force",
            )
        import shutil

        if (run_dir / CKPT_DIR).is_dir():
            shutil.rmtree(run_dir / CKPT_DIR)
    run_dir.mkdir(parents=True, exist_ok=True)
