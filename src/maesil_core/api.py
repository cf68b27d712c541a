"""The Python API: what the CLI and the napari widgets call.

    from maesil_core import api
    from maesil_core.config import preset

    result = api.pretrain(["scans/"], "runs/tiny", preset("tiny"))
    rec = api.reconstruct(result.run_dir, "scans/case_001.nii.gz")
    rec.save("out/")  # masked / reconstruction / interpolation / mask / error .nii.gz

Long calls take ``progress`` (a callable receiving plain dicts) and ``cancel`` (a callable
or ``threading.Event``); nothing here touches Qt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ProbeConfig, RunConfig, preset
from .errors import ConfigError, DataError
from .models.registry import build_from_checkpoint
from .probe import probe
from .probe_monitor import recorded
from .progress import CancelFlag, ProgressFn, cancel_fn
from .runs import claimed_run_dir, prepare_run_dir, resume_from, resumed_config
from .segmentation import evaluate, finetune, segment
from .threads import torch_threads
from .train import FitResult, fit
from .train import distributed as D
from .train.optim import autocast_dtype


def _resuming(step: int, steps: int) -> str:
    """The line a resumed run starts with."""
    if step >= steps:
        return (
            f"resuming from step {step} of {steps}: the run is complete; give --steps above "
            f"{step} to train it further"
        )
    return f"resuming from step {step} of {steps}"


def _as_recorded(data: Sequence[str | Path] | None) -> list[str] | None:
    """The data arguments as a run records them: absolute, so a resume from another
    folder finds the same scans (globs and lists are resolved again then)."""
    return [os.path.abspath(str(d)) for d in data] if data else None


def phantom_dataset(folder: str | Path, count: int = 4, seed: int = 0) -> list[str]:
    """Write ``count`` procedural CT phantoms into ``folder`` (once) and return their paths."""
    from .data import write_phantom

    folder = Path(folder)
    paths = []
    for i in range(count):
        ct = folder / f"phantom_{i:02d}" / "ct.nii.gz"
        if not ct.is_file():
            ct, _ = write_phantom(ct.parent, seed=seed + i, overwrite=True)
        paths.append(str(ct))
    return paths


def pretrain(
    data: Sequence[str | Path] | None,
    run_dir: str | Path,
    cfg: RunConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    probe: ProbeConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> FitResult:
    """Pretrain ``cfg.model.method`` on CT files/folders/globs/lists (None: the phantom).

    ``probe`` scores a linear probe of the encoder every ``probe.every`` steps into the
    metrics (``probe_<class>`` columns, with the random-init and patch-statistics references:
    :mod:`maesil_core.probe_monitor`); a resumed run keeps the probe it recorded unless
    another is given.

    With ``resume`` the run continues from its newest checkpoint with the config saved in the
    run; of ``cfg`` only the steps (to extend the run), device and threads are taken
    (:func:`resumed_config`). Without ``data`` it continues on the scans the run recorded
    (or the phantom, if it trained on that); ``data`` given replaces them (moved files).
    """
    run_dir = Path(run_dir)
    if probe is not None:
        probe.validate()
    with claimed_run_dir(run_dir, resume=resume):
        start_step = 0
        if resume:
            cfg, start_step, data, probe = _resumed_pretraining(run_dir, cfg, data, probe)
        cfg = (cfg or preset("tiny")).validate()
        return _pretrain(data, run_dir, cfg, resume, force, start_step, probe, progress, cancel)


def _resumed_pretraining(
    run_dir: Path,
    cfg: RunConfig | None,
    data: Sequence[str | Path] | None,
    probe: ProbeConfig | None,
) -> tuple[RunConfig, int, Sequence[str | Path] | None, ProbeConfig | None]:
    """The config, step, data and probe a resumed pretraining run continues with (the
    probe it recorded, unless ``probe`` is given: its columns go on)."""
    last = resume_from(run_dir)
    if last.kind != "pretrain":
        raise ConfigError(
            f"{run_dir} is a {last.kind} run, not a pretraining one: continue it with "
            f"maesil {'finetune' if last.kind == 'segmentation' else last.kind} and "
            "`resume`, or give another `run_dir`.",
            option="run_dir",
        )
    if not data:  # the run's own scans, not the phantom
        extra = last.meta.extra
        if "data" not in extra:
            raise ConfigError(
                f"{run_dir} does not record which scans it was trained on (it was made by "
                "an older version): resume it with `data` and the same scans."
            )
        data = extra["data"]  # None: the run trained on the phantom
    if probe is None and last.meta.extra.get("probe"):
        probe = ProbeConfig.from_dict(last.meta.extra["probe"])
    return resumed_config(last.config, cfg), last.step, data, probe


def _pretrain(
    data: Sequence[str | Path] | None,
    run_dir: Path,
    cfg: RunConfig,
    resume: bool,
    force: bool,
    start_step: int,
    probe: ProbeConfig | None,
    progress: ProgressFn | None,
    cancel: CancelFlag,
) -> FitResult:
    """:func:`pretrain` once the config is settled: the run folder, data, probe, model, fit."""
    from .data import check_inputs, infinite, make_pretrain_loader, resolve_inputs
    from .data.batch_augment import BatchAugment, to_device
    from .data.datasets import augment_on_device
    from .data.inputs import describe_scans
    from .models import build_model
    from .train.seeding import data_seed, seed_everything

    device = D.select_device(cfg.train.device)
    dist_info = D.init_distributed(device)
    if not resume:
        prepare_run_dir(run_dir, resume=False, force=force)
    D.barrier()

    if data:
        files = resolve_inputs(list(data))
    else:
        files = phantom_dataset(run_dir / "phantom") if dist_info.is_main else []
        D.barrier()
        files = files or phantom_dataset(run_dir / "phantom")
    check_inputs(files)
    if progress is not None and dist_info.is_main:  # say what is about to happen
        if resume:
            progress({"phase": "prepare", "message": _resuming(start_step, cfg.train.steps)})
        listing = describe_scans(files)
        if not data:
            listing = listing.replace("found", "no data given: the built-in CT phantom,", 1)
        progress({"phase": "prepare", "message": listing})
    evaluate = _probe_hook(cfg, probe, dist_info.is_main, device, progress, cancel)
    stream_seed = data_seed(cfg.train.seed, start_step)
    loader = make_pretrain_loader(
        files,
        cfg.data,
        cfg.model.superpatch,
        cfg.train.batch_size,
        seed=stream_seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        cache_dir=cfg.data.cache_dir or str(run_dir / "cache"),
        endless=True,  # one iterator for the whole run: workers never wait at epoch ends
        device=device,
        cancel=cancel,
    )
    seed_everything(cfg.train.seed)  # the initial weights too, not only the batches
    model = build_model(cfg.model)
    batches = infinite(loader)
    if augment_on_device(cfg.data, device):  # flips, turns, gamma on the GPU batch
        augment = BatchAugment(stream_seed + 1000 * dist_info.rank)
        batches = to_device(batches, device, augment)
    return fit(
        model,
        batches,
        cfg,
        run_dir,
        kind="pretrain",
        # what --resume trains on when no data is given (None: the phantom)
        extra_meta={"n_volumes": len(files), "data": _as_recorded(data), "probe": recorded(probe)},
        evaluate=evaluate,
        eval_every=probe.every if probe is not None else None,
        progress=progress,
        cancel=cancel,
        resume=resume,
        device=device,
    )


def _probe_hook(
    cfg: RunConfig,
    probe: ProbeConfig | None,
    is_main: bool,
    device: torch.device,
    progress: ProgressFn | None,
    cancel: CancelFlag,
) -> Any:
    """The training loop's ``evaluate`` for ``probe`` (None without one): the monitor on
    the main rank (its data read and references scored now), nothing on the others."""
    if probe is None:
        return None
    if not is_main:
        return lambda model: {}
    from .probe_monitor import ProbeMonitor

    return ProbeMonitor(cfg, probe, device=device, progress=progress, cancel=cancel_fn(cancel))


# --------------------------------------------------------------------------- reconstruction


@dataclass
class Reconstruction:
    """Whole-volume reconstruction, every array (X, Y, Z) aligned with the input file.

    ``image`` is the input as read; ``masked``, ``reconstruction`` and ``error`` are in HU when
    the input is a HU scan (int16, clipped to the model's window; else float32 in the model's
    [0, 1] scale); ``mask`` (uint8) is 1 where the model saw nothing. For a HU scan the
    voxels the model saw hold the input itself in ``reconstruction`` (and 0 in ``error``):
    the model's prediction, resampled from its grid, only where it was hidden.
    ``interpolation`` is the no-learning reference in the same form: the hidden voxels
    interpolated from the visible ones on the model's grid
    (:func:`~maesil_core.metrics.interpolation_fill`, per superpatch), brought back like the
    prediction; what the model shows beyond it, a smoothing filter could not. ``scores``
    are PSNR / SSIM / MSE on the model's grid over masked voxels, and
    ``interpolation_*`` the same for the hidden voxels interpolated from the visible ones
    (:func:`~maesil_core.metrics.interpolation_scores`), the score to beat; ``mean_fill_mse``
    the MSE of filling them with the mean of each tile's visible voxels.
    """

    image: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    mask: np.ndarray
    error: np.ndarray
    affine: np.ndarray
    scores: dict[str, float]
    units: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    interpolation: np.ndarray | None = None

    #: the files :meth:`save` writes, ``<name>.nii.gz`` each
    FILES: ClassVar[tuple[str, ...]] = (
        "masked",
        "reconstruction",
        "interpolation",
        "mask",
        "error",
    )

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
        """Write masked / reconstruction / interpolation / mask / error ``.nii.gz`` (``FILES``;
        interpolation when there is one) with the input's affine: all or none (each is
        written under a temporary name first; a failure, such as a full disk, removes them
        and leaves what ``out_dir`` held before).

        HU results are stored as int16 (the input's own HU, and the prediction to 1 HU: about
        2 bytes a voxel, like the input); the error map and [0, 1] results as uint8 with a
        NIfTI slope (readers get the values back to 1/255 of their range: the 256 levels a
        colour map or a grey window shows). The five are about 2.3 x the size of an int16 input
        .nii.gz (abdomen_ct: 2.28 x; 1.6 x without the interpolation).
        """
        from .data import save_volume

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = tuple(n for n in self.FILES if getattr(self, n) is not None)
        targets = {name: out_dir / f"{name}.nii.gz" for name in names}
        existing = [p for p in targets.values() if p.exists()]
        if existing and not overwrite:
            save_volume(self.mask, self.affine, existing[0])  # its one-line refusal
        staged: dict[str, Path] = {}
        try:
            for name in names:
                arr = getattr(self, name)
                tmp = out_dir / f".{name}.partial.nii.gz"
                if name == "mask":
                    save_volume(arr, self.affine, tmp, overwrite=True, dtype=np.uint8)
                elif name == "error" or arr.dtype == np.float32:
                    save_volume(arr, self.affine, tmp, overwrite=True, quantize=np.uint8)
                else:
                    save_volume(arr, self.affine, tmp, overwrite=True)
                staged[name] = tmp
        except BaseException:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        for name, tmp in staged.items():
            os.replace(tmp, targets[name])
        return targets


def reconstruct(
    checkpoint: str | Path,
    image: str | Path,
    *,
    mask_mode: str | None = None,
    mask_ratio: float | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 4,
    threads: int | None = 0,
    precision: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> Reconstruction:
    """Mask and reconstruct a whole CT with a pretrained model, tile by tile (on the CPU with
    ``threads`` torch threads, 0: auto, one per free core, :mod:`maesil_core.threads`;
    ``precision`` auto: bf16 on a GPU that has it, fp32 elsewhere, or bf16 / fp32)."""
    from .data import inference_transforms, load_volume
    from .data.inverse import iter_input_slabs
    from .inference import reconstruct_volume
    from .metrics import interpolation_fill, interpolation_scores, reconstruction_scores

    model, ckpt = build_from_checkpoint(checkpoint)
    cfg = ckpt.config
    if ckpt.meta.extra.get("encoder_only"):
        raise ConfigError(
            f"{checkpoint} holds an imported encoder beside a decoder that was never trained "
            "(maesil import): its reconstruction would be noise. Continue its pretraining first "
            "(`resume` with more `steps`), or use it to fine-tune, probe or export.",
            option="checkpoint",
        )
    if mask_ratio is not None and not 0 < mask_ratio < 1:
        raise ConfigError(f"mask ratio must be between 0 and 1, got {mask_ratio}.")
    volume = load_volume(image)
    transform = inference_transforms(cfg.data)
    sample = transform({"image": volume})  # the volume already read: no second read
    unit = sample["image"]  # (1, D, H, W) on the model grid
    is_cancelled = cancel_fn(cancel)

    def tile_progress(done: int, total: int) -> None:
        if progress is not None:
            progress({"phase": "reconstruct", "step": done, "steps": total})

    dev = D.select_device(device)
    amp_dtype = autocast_dtype(precision, dev)  # a precision the device lacks: refused
    with torch_threads(threads, dev):
        tiled = reconstruct_volume(
            model,
            torch.as_tensor(np.asarray(unit)),
            mode=mask_mode,
            ratio=mask_ratio,
            seed=seed,
            batch_size=batch_size,
            device=dev,
            amp_dtype=amp_dtype,
            progress=tile_progress,
            cancel=is_cancelled,
        )
    grid_mask = tiled.mask[0].numpy() > 0.5
    target = np.asarray(unit)[0]
    scores = reconstruction_scores(
        tiled.pred[0].numpy(), target, grid_mask if grid_mask.any() else None, cancel=is_cancelled
    )
    fill = target  # (D, H, W) the no-learning reference: hidden voxels interpolated from
    if grid_mask.any():  # the visible ones, computed once, scored and shown
        tile = cfg.model.superpatch
        fill = interpolation_fill(target, grid_mask, cfg.model.patch, tile, is_cancelled)
        base = interpolation_scores(target, grid_mask, cfg.model.patch, tile, fill=fill)
        scores["mean_fill_mse"] = base.pop("mean_fill_mse")
        scores.update({f"interpolation_{k}": v for k, v in base.items()})
        fill = fill.astype(np.float32)  # float32 like the prediction: half the float64 fill

    # back onto the input's own voxel grid (orientation, spacing, shape), slab by slab: at
    # 512 x 512 x 400 a float32 copy is 0.4 GB and MONAI's inverse adds a 1.2 GB sampling grid
    hu = _uses_hu(cfg, volume)
    shape = volume.array.shape
    model_affine = np.asarray(unit.affine, dtype=np.float64)
    mask = np.empty(shape, np.uint8)  # 1 where the model saw nothing
    for z, values in iter_input_slabs(
        tiled.mask[0].numpy().astype(np.uint8), model_affine, volume.affine, shape, nearest=True
    ):
        mask[:, :, z] = values
    # HU scans: int16 HU, exact for the input's own voxels (integers), 1 HU steps for the
    # prediction (far below what a window shows); other scans: float32 in the model's [0, 1]
    dtype = np.int16 if hu else np.float32
    reconstruction, interpolation, masked, error = (np.empty(shape, dtype) for _ in range(4))
    low, high = cfg.data.window() if hu else (0.0, 1.0)
    shown_slabs = (
        None if hu else iter_input_slabs(np.asarray(unit)[0], model_affine, volume.affine, shape)
    )
    ref_slabs = iter_input_slabs(fill, model_affine, volume.affine, shape)
    for z, values in iter_input_slabs(tiled.recon[0].numpy(), model_affine, volume.affine, shape):
        hidden = mask[:, :, z].astype(bool)
        _, ref = next(ref_slabs)
        if hu:  # visible voxels: the input itself, not its model-grid copy resampled back
            pred = np.clip(low + values * (high - low), low, high)  # the window it learnt
            seen = np.rint(np.clip(volume.array[:, :, z], low, high))
            reconstruction[:, :, z] = np.where(hidden, np.rint(pred), seen)
            ref = np.clip(low + ref * (high - low), low, high)
            interpolation[:, :, z] = np.where(hidden, np.rint(ref), seen)
            masked[:, :, z] = np.where(hidden, low, seen)
            error[:, :, z] = np.where(hidden, np.rint(np.abs(pred - seen)), 0)
        else:
            _, seen = next(shown_slabs)
            reconstruction[:, :, z] = values
            interpolation[:, :, z] = ref
            masked[:, :, z] = np.where(hidden, 0.0, seen)
            error[:, :, z] = np.abs(values - seen)
    units = "HU" if hu else "unit"
    return Reconstruction(
        image=volume.array,
        masked=masked,
        reconstruction=reconstruction,
        mask=mask,
        error=error,
        affine=volume.affine,
        scores=scores,
        units=units,
        source=str(image),
        extra={"checkpoint": str(ckpt.path), "method": cfg.model.method},
        interpolation=interpolation,
    )


def _uses_hu(cfg: RunConfig, volume: Any) -> bool:
    if cfg.data.intensity == "hu":
        return True
    if cfg.data.intensity == "percentile":
        return False
    return bool(volume.is_hu)


def load_for_inference(checkpoint: str | Path) -> tuple[torch.nn.Module, RunConfig]:
    """A pretraining model rebuilt from ``checkpoint`` (run dir or file), with its config."""
    model, ckpt = build_from_checkpoint(checkpoint)
    return model, ckpt.config


def describe_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """What ``maesil info`` prints: kind, method, sizes, step, spacing, window, parameters."""
    from safetensors import safe_open

    from .checkpoint import read_meta, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    cfg = meta.config
    with safe_open(str(path), framework="pt") as f:
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    return {
        "path": str(path),
        "kind": meta.kind,
        "method": meta.method,
        "preset": meta.preset,
        "step": meta.step,
        "superpatch": list(cfg.model.superpatch),
        "patch": list(cfg.model.patch),
        "width x depth": f"{cfg.model.embed_dim} x {cfg.model.depth}",
        "mask": f"{cfg.model.mask_mode} {cfg.model.mask_ratio}",
        "spacing_mm": list(cfg.data.spacing) if cfg.data.spacing else "native",
        "hu_window": list(cfg.data.window()),
        "intensity": cfg.data.intensity,
        "parameters": n_params,
        "metrics": meta.metrics,
        "extra": meta.extra,
        "package_version": meta.package_version,
        "created": meta.created,
    }


__all__ = [
    "Reconstruction",
    "DataError",
    "describe_checkpoint",
    "evaluate",
    "finetune",
    "load_for_inference",
    "phantom_dataset",
    "pretrain",
    "probe",
    "reconstruct",
    "segment",
]
