"""A fine-tuned segmenter as a MONAI Bundle.

    maesil export --checkpoint runs/seg --format monai-bundle --out bundles/liver_spleen
    python -m monai.bundle run --config_file bundles/liver_spleen/configs/inference.json \\
        --bundle_root bundles/liver_spleen --dataset_dir scans/ --output_dir out/

Layout (MONAI's bundle specification)::

    DIR/
      configs/metadata.json    version, network_data_format (ROI, spacing, HU window -> [0, 1],
                               one channel_def entry per class), required packages
      configs/inference.json   LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd
                               -> ScaleIntensityRanged -> SlidingWindowInferer -> AsDiscreted
                               (argmax) -> Invertd -> [KeepLargestConnectedComponentd]
                               -> [MapLabelValued] -> SaveImaged, run by an ignite
                               SupervisedEvaluator (MONAI's standard inference workflow)
      models/model.pt          the state dict (torch.load(weights_only=True) reads it)
      docs/README.md           what it segments, how to run it, how it was made
      LICENSE

``network_def`` points at our own class, ``maesil_core.models.segmenter.UNETRSegmenter`` (or
``ConvAESegmenter`` for an ae / vae / vq-vae encoder), built by MONAI's ConfigParser from the
checkpoint's architecture. Why not MONAI's ``UNETR`` with converted weights: MONAI's UNETR
is one shape only (16-voxel patch, 12 blocks, decoder taps 3/6/9, LayerNorm eps 1e-5, fixed
input size), which none of our presets has (their patch is 8, or 16 with UNETR-paper taps
2/5/8); pointing at our class keeps every checkpoint's exact weights and numbers, at the price
of ``pip install napari-maesil`` beside MONAI (listed in ``required_packages_version``). A
segmenter that does have MONAI's shape also exports as plain MONAI ``UNETR`` weights
(``maesil export --format monai-unetr``).

The chain is the one ``maesil segment`` runs (same spacing, window, ROI, overlap, blending,
argmax before the nearest-neighbour inversion), with MONAI's ``LoadImaged`` in place of our
reader: on a NIfTI CT the two label maps agree up to interpolation at the borders (the test
measures it). The bundle reads what ``LoadImaged`` reads (NIfTI, NRRD; a DICOM folder with
``itk`` or ``pydicom`` installed) and assumes Hounsfield units unless the checkpoint was
trained with ``intensity="percentile"``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write, atomic_write_text

#: the JSON schema MONAI's verify_metadata validates metadata.json against
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
BUNDLE_VERSION = "0.1.0"


def _segmentation_checkpoint(checkpoint: str | Path | Checkpoint) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        ckpt = checkpoint
    else:
        p = Path(checkpoint).expanduser()
        if p.is_dir() and (p / "best.safetensors").is_file() and (p / "best.json").is_file():
            p = p / "best.safetensors"
        ckpt = load_checkpoint(p)
    if ckpt.kind != "segmentation":
        raise CheckpointError(
            f"{ckpt.path} is a {ckpt.kind} checkpoint; a MONAI Bundle here is a segmenter: "
            "fine-tune it first (maesil finetune `pretrained` ...), or export the encoder with "
            "`format` monai-vit."
        )
    extra = ckpt.meta.extra
    if "segmentation" not in extra or "labels" not in extra:
        raise CheckpointError(f"{ckpt.path} lacks its label set / segmentation settings.")
    return ckpt


def network_def(ckpt: Checkpoint) -> dict[str, Any]:
    """The bundle's ``network_def``: our segmenter class and its arguments, for ConfigParser."""
    from ..models.segmenter import is_conv

    cfg = ckpt.config.model
    seg = ckpt.meta.extra["segmentation"]
    classes = ckpt.meta.extra["labels"]["classes"]
    model_cfg = {"_target_": "maesil_core.config.ModelConfig", **_jsonable(dataclasses.asdict(cfg))}
    net: dict[str, Any] = {"num_classes": len(classes), "feature_size": int(seg["feature_size"])}
    net["norm_name"] = seg.get("norm", "instance")
    if is_conv(cfg):
        target = "maesil_core.models.conv_segmenter.ConvAESegmenter"
    else:
        target = "maesil_core.models.segmenter.UNETRSegmenter"
        if seg.get("layers"):
            net["layers"] = list(seg["layers"])
    return {"_target_": target, "cfg": model_cfg, **net}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _intensity(data_cfg: Any) -> dict[str, Any]:
    if data_cfg.intensity == "percentile":
        from ..data.transforms import PERCENTILES

        return {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": PERCENTILES[0],
            "upper": PERCENTILES[1],
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    low, high = data_cfg.window()
    return {
        "_target_": "ScaleIntensityRanged",
        "keys": "image",
        "a_min": low,
        "a_max": high,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }


def _settings(ckpt: Checkpoint) -> tuple[Any, dict[str, Any], list[dict[str, Any]], list[int]]:
    """The run config, segmentation settings, classes and inference window of ``ckpt``."""
    cfg = ckpt.config
    seg = ckpt.meta.extra["segmentation"]
    roi = list(seg["roi"]) if seg.get("roi") else list(cfg.model.superpatch)
    return cfg, seg, ckpt.meta.extra["labels"]["classes"], roi


def inference_config(ckpt: Checkpoint) -> dict[str, Any]:
    """``configs/inference.json`` for a segmentation checkpoint."""
    cfg, seg, classes, roi = _settings(ckpt)
    ids = [int(c["id"]) for c in classes]
    pre: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    ]
    if cfg.data.spacing is not None:
        pixdim = [float(s) for s in cfg.data.spacing]
        pre.append({"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"})
    pre += [
        _intensity(cfg.data),
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    post: list[dict[str, Any]] = [
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": True,
            "to_tensor": True,
        },
    ]
    if seg.get("largest_component"):
        post.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": list(range(1, len(ids) + 1)),
                "is_onehot": False,
                "independent": True,
            }
        )
    if ids != list(range(1, len(ids) + 1)):
        post.append(
            {
                "_target_": "MapLabelValued",
                "keys": "pred",
                "orig_labels": list(range(len(ids) + 1)),
                "target_labels": [0, *ids],
            }
        )
    post.append(
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_dtype": "$numpy.uint8" if max(ids) < 256 else "$numpy.int16",
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        }
    )
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz') + glob.glob(@dataset_dir + '/*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(ckpt),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": roi,
            "sw_batch_size": int(seg.get("sw_batch_size", 4)),
            "overlap": float(seg.get("overlap", 0.25)),
            "mode": seg.get("blend", "gaussian"),
            "padding_mode": "constant",
            "cval": 0.0,
        },
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "strict": True,
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


def metadata(ckpt: Checkpoint) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata for the checkpoint."""
    import monai

    from .. import __version__

    cfg, seg, classes, roi = _settings(ckpt)
    names = [str(c["name"]) for c in classes]
    channel_def = {"0": "background", **{str(i): n for i, n in enumerate(names, start=1)}}
    spacing = [float(s) for s in cfg.data.spacing] if cfg.data.spacing is not None else None
    if cfg.data.intensity == "percentile":
        scaling = "0.5th..99.5th percentile of each scan -> [0, 1], clipped (not HU)"
        window = None
    else:
        window = [float(v) for v in cfg.data.window()]
        scaling = f"HU {window[0]:g}..{window[1]:g} -> [0, 1], clipped (ScaleIntensityRanged)"
    ids = {str(c["id"]): str(c["name"]) for c in classes}
    required = {"napari-maesil": __version__, "nibabel": _version("nibabel")}
    required["pytorch-ignite"] = _version("pytorch-ignite")
    metrics = {k: float(v) for k, v in ckpt.meta.metrics.items() if k.startswith("val_")}
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {
            BUNDLE_VERSION: f"exported by napari-maesil {__version__} from {ckpt.path.name}"
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required,
        "name": f"napari-maesil {', '.join(names)} CT segmentation"[:120],
        "task": f"3D segmentation of {', '.join(names)} in CT",
        "description": (
            f"A UNETR-style segmenter on a {cfg.model.method} pretrained 3D ViT encoder "
            f"(patch {list(cfg.model.patch)}, width {cfg.model.embed_dim}, {cfg.model.depth} "
            f"blocks), fine-tuned with napari-maesil for {ckpt.step} steps. Input: a CT resampled "
            f"to {spacing} mm in RAS, {scaling}; sliding windows of {roi} voxels."
        ),
        "authors": "exported with napari-maesil; the weights are the exporting user's",
        "copyright": "Copyright (c) the exporting user",
        "data_source": ", ".join(ckpt.meta.extra.get("train_images", [])[:5]) or "not recorded",
        "data_type": "nibabel",
        "image_classes": f"single-channel CT, {scaling}",
        "label_classes": json.dumps(ids),
        "pred_classes": json.dumps(ids),
        "eval_metrics": metrics,
        "intended_use": "research only; not validated for clinical use",
        "references": ["napari-maesil: https://github.com/napari-maesil/napari-maesil"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if window else "magnitude",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                    "spacing": spacing,
                    "orientation": "RAS",
                    "hu_window": window,
                    "scaling": scaling,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(names) + 1,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                    "label_ids": {
                        "0": 0,
                        **{str(i): int(c["id"]) for i, c in enumerate(classes, 1)},
                    },
                }
            },
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _readme(ckpt: Checkpoint, meta: dict[str, Any]) -> str:
    fmt = meta["network_data_format"]["inputs"]["image"]
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in channels.items())
    return f"""# {meta["name"]}

{meta["description"]}

Exported by napari-maesil from `{ckpt.path}` (step {ckpt.step}). {meta["intended_use"]}.

## Run it

```bash
pip install "napari-maesil=={meta["required_packages_version"]["napari-maesil"]}" pytorch-ignite
python -m monai.bundle run --config_file configs/inference.json \\
    --bundle_root . --dataset_dir /path/to/nifti_cts --output_dir /path/to/out
```

Every `*.nii.gz` in `dataset_dir` is segmented into `output_dir/<name>_seg.nii.gz`, on the
CT's own voxel grid and affine. The network (`network_def`) is napari-maesil's
`{meta.get("_target", "")}` segmenter class, built by MONAI's ConfigParser; the weights are
`models/model.pt` (a state dict).

## Input and output

- input: single-channel CT, resampled to {fmt["spacing"]} mm in RAS, {fmt["scaling"]};
  sliding windows of {fmt["spatial_shape"]} voxels
- output channels:

| channel | class |
|---|---|
{rows}

## Licence

The configuration files are BSD-3-Clause (LICENSE). The weights were trained by the
exporting user; their use is subject to the terms of the data they were trained on.
"""


def export_bundle(
    checkpoint: str | Path | Checkpoint, out: str | Path, *, force: bool = False
) -> Path:
    """Write a MONAI Bundle of a segmentation checkpoint (run dir: its best) to ``out``.

    Refuses a non-empty ``out`` unless ``force`` (then the bundle's own files are replaced).
    Returns ``out``.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {out} is a file; a MONAI Bundle is a folder.", option="out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"{out} is not empty; pass `force` to overwrite the bundle or choose another `out`.",
            option="force",
        )
    ckpt = _segmentation_checkpoint(checkpoint)
    meta = metadata(ckpt)
    infer = inference_config(ckpt)
    if force:
        for name in ("configs", "models", "docs"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    state = {k: v.detach().contiguous().cpu() for k, v in ckpt.state_dict.items()}
    atomic_write(out / "models" / "model.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(out / "configs" / "inference.json", json.dumps(infer, indent=2))
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(meta, indent=2))
    meta_readme = {**meta, "_target": infer["network_def"]["_target_"]}
    atomic_write_text(out / "docs" / "README.md", _readme(ckpt, meta_readme))
    atomic_write_text(out / "LICENSE", _licence_text())
    return out


def _licence_text() -> str:
    """napari-maesil's LICENSE as installed (in the wheel's .dist-info), else the source
    tree's (an editable install). Every distribution of that name is looked at: a build's
    ``src/napari_maesil.egg-info`` lists no LICENSE and is found first whenever ``src`` is on
    ``sys.path`` (the benchmarks put it there)."""
    from importlib.metadata import distributions

    for dist in distributions(name="napari-maesil"):
        try:
            for f in dist.files or []:
                if Path(str(f)).name == "LICENSE":
                    return Path(dist.locate_file(f)).read_text()
        except OSError:
            continue
    source_tree = Path(__file__).resolve().parents[3] / "LICENSE"  # src/maesil_core/interop/
    if source_tree.is_file() and source_tree.read_text().startswith("BSD 3-Clause"):
        return source_tree.read_text()
    return "BSD-3-Clause (napari-maesil): https://opensource.org/license/bsd-3-clause\n"
