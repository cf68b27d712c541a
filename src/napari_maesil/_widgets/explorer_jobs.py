"""The superpatch explorer's jobs (each runs in the job's thread, off the Qt thread): the
CT on a checkpoint's model grid (:class:`ModelGrid`, :func:`load_job`), one superpatch or
the whole volume masked and reconstructed, with the interpolation reference beside it
(:func:`superpatch_job`, :func:`volume_job`), and
the finished layers with their scores (:class:`ExplorerOutput`): arrays in napari's
(z, y, x) order, in HU for HU scans, placed by ``napari_maesil._geometry``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._geometry import volume_to_layer


class ModelGrid:
    """A CT layer on a checkpoint's model grid: unit image, RAS affine, HU mapping, tiles."""

    def __init__(self, model: Any, cfg: Any, unit: np.ndarray, affine: np.ndarray, hu: bool):
        self.model, self.cfg = model, cfg
        self.unit = unit  # (D, H, W) float32 in [0, 1], RAS
        self.affine = affine  # RAS affine of the unit grid
        self.hu = hu
        self.tile = tuple(int(s) for s in cfg.model.superpatch)
        self.counts = tuple(math.ceil(s / t) for s, t in zip(unit.shape, self.tile))
        self.low, self.high = cfg.data.window() if hu else (0.0, 1.0)

    @property
    def n_tiles(self) -> int:
        return int(np.prod(self.counts))

    def corner(self, tile_id: int) -> tuple[int, int, int]:
        """Voxel corner (on the unit grid) of superpatch ``tile_id`` (1-based)."""
        i, j, k = np.unravel_index(int(tile_id) - 1, self.counts)
        return int(i) * self.tile[0], int(j) * self.tile[1], int(k) * self.tile[2]

    def tile_ids(self) -> np.ndarray:
        """(D, H, W) uint16/32 map of superpatch ids (1..n)."""
        idx = [np.arange(s) // t for s, t in zip(self.unit.shape, self.tile)]
        ids = (
            idx[0][:, None, None] * self.counts[1] * self.counts[2]
            + idx[1][None, :, None] * self.counts[2]
            + idx[2][None, None, :]
            + 1
        )
        return ids.astype(np.uint16 if self.n_tiles < 65535 else np.uint32)

    def tile_at_world(self, world: Any) -> int | None:
        """Superpatch id (1-based) at a napari world position ``(z, y, x)`` of LPS mm (the
        nearest voxel of the model grid, as the grid layer's value would say), or None."""
        z, y, x = (float(c) for c in np.asarray(world, dtype=np.float64)[-3:])
        ras = np.array([-x, -y, z, 1.0])  # LPS (x, y, z) -> RAS
        voxel = np.rint(np.linalg.solve(self.affine, ras)[:3]).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= np.asarray(self.unit.shape)):
            return None
        index = tuple(int(v) // t for v, t in zip(voxel, self.tile))
        return int(np.ravel_multi_index(index, self.counts)) + 1

    def crop(self, corner: tuple[int, int, int]) -> np.ndarray:
        """The superpatch at ``corner`` (zero padded past the volume's end)."""
        out = np.zeros(self.tile, dtype=np.float32)
        sl = tuple(slice(c, min(c + t, s)) for c, t, s in zip(corner, self.tile, self.unit.shape))
        part = self.unit[sl]
        out[: part.shape[0], : part.shape[1], : part.shape[2]] = part
        return out

    def affine_at(self, corner: tuple[int, int, int]) -> np.ndarray:
        shift = np.eye(4)
        shift[:3, 3] = corner
        return self.affine @ shift

    def to_units(self, a: np.ndarray) -> np.ndarray:
        return (self.low + a * (self.high - self.low)).astype(np.float32)


# ---------------------------------------------------------------------------- jobs (threads)


@dataclass
class ExplorerOutput:
    """Finished layers ``{key: (data (z, y, x), geometry kwargs)}`` and the scores."""

    layers: dict[str, tuple[np.ndarray, dict]]
    limits: list[float]
    error_limits: list[float]
    scores_text: str
    status_text: str
    raw: dict[str, Any] = field(default_factory=dict)  #: arrays on the model grid (tests)


def load_job(checkpoint: str, volume: Any, *, progress, cancel):
    """Model + the CT on the model grid + the superpatch grid layer. Runs in a thread."""
    from maesil_core.checkpoint import load_checkpoint
    from maesil_core.data import inference_transforms
    from maesil_core.errors import Cancelled
    from maesil_core.models.registry import build_from_checkpoint

    progress({"phase": "load", "message": "loading the checkpoint"})
    ckpt = load_checkpoint(checkpoint, kind="pretrain")
    model, ckpt = build_from_checkpoint(ckpt)
    if cancel.is_set():
        raise Cancelled()
    cfg = ckpt.config
    progress({"phase": "load", "message": "resampling the CT to the model grid"})
    sample = inference_transforms(cfg.data, cancel=cancel)({"image": volume})
    image = sample["image"]
    unit = np.asarray(image[0], dtype=np.float32)
    grid_affine = np.asarray(image.affine, dtype=np.float64)
    hu = getattr(image, "meta", {}).get("intensity", "hu" if volume.is_hu else "percentile") == "hu"
    grid = ModelGrid(model, cfg, unit, grid_affine, hu)
    data, geo, _ = volume_to_layer(grid.tile_ids(), grid.affine)
    return grid, (data, geo)


def superpatch_job(grid: ModelGrid, corner, mode, ratio, seed, *, progress, cancel):
    """Mask + reconstruct one superpatch; the layers on the tile, and scores."""
    import torch

    from maesil_core.inference import tile_inside, tile_valid
    from maesil_core.metrics import interpolation_fill, interpolation_scores, reconstruction_scores

    x = torch.from_numpy(grid.crop(corner))[None, None]
    valid = tile_valid([corner], grid.unit.shape, grid.tile)  # (1, 1, *tile), 0 on padding
    gen = torch.Generator().manual_seed(int(seed))
    progress({"phase": "reconstruct", "step": 0, "steps": 1})
    recon, mask, raw = grid.model.reconstruct(
        x, mode=mode, ratio=ratio, generator=gen, return_raw=True, valid=valid
    )
    progress({"phase": "reconstruct", "step": 1, "steps": 1})
    target = x[0, 0].numpy()
    m = mask[0, 0].numpy() > 0.5
    pred = raw[0, 0].float().numpy()
    # scored on the tile's real voxels (an edge tile's padding is not the CT's)
    real = tile_inside(corner, grid.unit.shape, grid.tile)
    hidden = m[real]
    # baselines: the hidden voxels interpolated from the visible ones (the score to beat;
    # a barely trained model does not; also shown, as a layer), or filled with the CT's mean
    patch = grid.model.cfg.patch
    fill = interpolation_fill(target[real], hidden, patch)  # (real part of the tile)
    reference = target.copy()  # (*tile) the padding as the model saw it
    reference[real] = fill
    scores: dict = {}
    base_scores: dict = {}
    if hidden.any():  # none where every hidden patch of an edge tile fell in the padding
        # SSIM's window (7 voxels, or the volume's side if smaller) needs 3 real voxels a
        # side at least: an edge tile may hold 1 or 2
        if min(fill.shape) >= 3:
            scores = reconstruction_scores(pred[real], target[real], hidden)
            base_scores = interpolation_scores(target[real], hidden, patch, fill=fill)
        else:
            scores = _mse_psnr(pred[real], target[real], hidden)
            base_scores = _mse_psnr(fill, target[real], hidden)
        volume_fill = np.full_like(target[real], float(grid.unit.mean()))
        base_scores["volume_mean_mse"] = _mse_psnr(volume_fill, target[real], hidden)["mse"]
    out = {
        "corner": corner,
        "target": target,
        "recon": recon[0, 0].float().numpy(),
        "pred": pred,
        "mask": m,
        "reference": reference,
        "scores": scores,
        "baseline": base_scores,
    }
    if not hidden.any():
        out["note"] = "no hidden voxel inside the CT here (all in the padding): nothing to score"
    return finished(grid, out)


def _mse_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    from maesil_core.metrics import mse, psnr

    return {"mse": mse(pred, target, mask), "psnr": psnr(pred, target, mask)}


def volume_job(grid: ModelGrid, mode, ratio, seed, *, progress, cancel):
    """Mask + reconstruct every superpatch of the CT (tile by tile, cancellable), with the
    interpolation reference (each superpatch's hidden voxels from its visible ones)."""
    import torch

    from maesil_core.inference import reconstruct_volume
    from maesil_core.metrics import interpolation_fill, psnr, reconstruction_scores

    def tick(done: int, total: int) -> None:
        progress({"phase": "reconstruct", "step": done, "steps": total})

    tiled = reconstruct_volume(
        grid.model,
        torch.from_numpy(grid.unit)[None],
        mode=mode,
        ratio=ratio,
        seed=int(seed),
        progress=tick,
        cancel=cancel.is_set,
    )
    m = tiled.mask[0].numpy() > 0.5
    target = grid.unit
    pred = tiled.pred[0].numpy()
    reference, scores, base_scores = target, {}, {}
    if m.any():
        # the reference per superpatch (chest_ct at 1.5 mm, 215 x 215 x 201: 4 s on a loaded
        # core); its PSNR only: a second whole-volume SSIM took 15 s more
        progress({"phase": "load", "message": "interpolating the hidden voxels (reference)"})
        reference = interpolation_fill(target, m, grid.model.cfg.patch, grid.tile, cancel.is_set)
        reference = reference.astype(np.float32)
        base_scores = {"psnr": psnr(reference, target, m)}
        progress({"phase": "load", "message": "scoring the reconstruction"})
        scores = reconstruction_scores(pred, target, m, cancel=cancel.is_set)
    out = {
        "corner": (0, 0, 0),
        "target": target,
        "recon": tiled.recon[0].numpy(),
        "pred": pred,
        "mask": m,
        "reference": reference,
        "scores": scores,
        "baseline": base_scores,
    }
    return finished(grid, out)


def finished(grid: ModelGrid, out: dict) -> ExplorerOutput:
    """The arrays of ``out`` as layers (in HU for HU scans), on the tile or the whole grid."""
    affine = grid.affine_at(out["corner"])
    target, recon, pred, m = out["target"], out["recon"], out["pred"], out["mask"]
    if grid.hu:
        original = grid.to_units(target)
        masked = np.where(m, np.float32(grid.low), original)
        shown = grid.to_units(recon)
        reference = grid.to_units(out["reference"])
        error = np.abs(grid.to_units(pred) - original) * m
        limits = [grid.low, grid.high]
        err_limits = [0.0, (grid.high - grid.low) / 2]
    else:
        original = target
        masked = np.where(m, np.float32(0.0), target)
        shown, error = recon, np.abs(pred - target) * m
        reference = out["reference"]
        limits, err_limits = [0.0, 1.0], [0.0, 0.5]
    layers = {}
    arrays = (
        ("original", original),
        ("masked", masked),
        ("recon", shown),
        ("reference", reference),
        ("error", error),
    )
    for key, arr in arrays:
        data, geo, _ = volume_to_layer(arr.astype(np.float32), affine)
        layers[key] = (data, geo)
    data, geo, _ = volume_to_layer(m.astype(np.uint8), affine)
    layers["mask"] = (data, geo)
    s, b = out["scores"], out["baseline"]
    text = ""
    if s:
        text = f"PSNR {s['psnr']:.1f} dB" + (f" · SSIM {s['ssim']:.3f}" if "ssim" in s else "")
        if b:
            ssim = f" · SSIM {b['ssim']:.3f}" if "ssim" in b else ""
            text += f" (interpolating the visible: PSNR {b['psnr']:.1f} dB{ssim})"
    status = f"done · {int(m.sum())} masked voxels ({100 * m.mean():.0f}%)"
    text = text or out.get("note", "")
    return ExplorerOutput(layers, limits, err_limits, text, status, out)
