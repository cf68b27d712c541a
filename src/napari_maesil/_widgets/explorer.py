"""Superpatch explorer: mask a superpatch of the CT, let a pretrained model fill it in.

The CT layer is brought onto the model's grid exactly as in training (RAS, the checkpoint's
spacing, intensities to [0, 1]: ``inference_transforms``). Superpatches are the tiles of
that grid from its first voxel (the tiling of ``reconstruct_volume``); the grid is drawn as
a Labels layer (one id per superpatch, outlines in 2D) so clicking it, or its value under
the cursor, picks a superpatch in 2D and in 3D. Results are added on the model grid, placed
in world coordinates with the same convention as the CT (see ``napari_maesil._geometry``),
so they overlay the CT exactly: the masked input, the reconstruction, |error| (in HU for
HU scans) and the mask (Labels, 1 = hidden from the model).
"""

from __future__ import annotations

import math
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSlider,
    Label,
    PushButton,
    SpinBox,
)

from .._geometry import META_KEY, volume_to_layer
from ._base import LAST, JobWidget, layers_of, notify_error

LAYER_NAMES = {
    "grid": "superpatch grid",
    "masked": "masked input",
    "recon": "reconstruction",
    "error": "|error|",
    "mask": "mask",
}


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


def _load_job(checkpoint: str, array: np.ndarray, affine: np.ndarray, *, progress, cancel):
    """Model + the CT on the model grid. Runs in a worker thread."""
    from maesil_core.checkpoint import load_checkpoint
    from maesil_core.data import inference_transforms
    from maesil_core.data.io import Volume, looks_like_hu
    from maesil_core.models.registry import build_from_checkpoint

    progress({"phase": "load", "message": "loading the checkpoint"})
    ckpt = load_checkpoint(checkpoint, kind="pretrain")
    model, ckpt = build_from_checkpoint(ckpt)
    cfg = ckpt.config
    progress({"phase": "load", "message": "resampling the CT to the model grid"})
    vol = Volume(array=np.asarray(array, dtype=np.float32), affine=affine, path="layer")
    vol.is_hu = looks_like_hu(vol.array)
    sample = inference_transforms(cfg.data)({"image": vol})
    image = sample["image"]
    unit = np.asarray(image[0], dtype=np.float32)
    grid_affine = np.asarray(image.affine, dtype=np.float64)
    hu = getattr(image, "meta", {}).get("intensity", "hu" if vol.is_hu else "percentile") == "hu"
    return ModelGrid(model, cfg, unit, grid_affine, hu)


def _superpatch_job(grid: ModelGrid, corner, mode, ratio, seed, *, progress, cancel):
    """Mask + reconstruct one superpatch. Returns arrays on the tile and scores."""
    import torch

    from maesil_core.metrics import interpolation_scores, reconstruction_scores

    x = torch.from_numpy(grid.crop(corner))[None, None]
    gen = torch.Generator().manual_seed(int(seed))
    progress({"phase": "reconstruct", "step": 0, "steps": 1})
    recon, mask, raw = grid.model.reconstruct(
        x, mode=mode, ratio=ratio, generator=gen, return_raw=True
    )
    progress({"phase": "reconstruct", "step": 1, "steps": 1})
    target = x[0, 0].numpy()
    m = mask[0, 0].numpy() > 0.5
    pred = raw[0, 0].float().numpy()
    scores = reconstruction_scores(pred, target, m)
    # baselines: the hidden voxels interpolated from the visible ones (the score to beat;
    # a barely trained model does not), or filled with the mean of the whole CT
    base_scores = interpolation_scores(target, m, grid.model.cfg.patch)
    volume_fill = np.full_like(target, float(grid.unit.mean()))
    base_scores["volume_mean_mse"] = reconstruction_scores(volume_fill, target, m)["mse"]
    return {
        "corner": corner,
        "target": target,
        "recon": recon[0, 0].float().numpy(),
        "pred": pred,
        "mask": m,
        "scores": scores,
        "baseline": base_scores,
    }


def _volume_job(grid: ModelGrid, mode, ratio, seed, *, progress, cancel):
    """Mask + reconstruct every superpatch of the CT (tile by tile, cancellable)."""
    import torch

    from maesil_core.inference import reconstruct_volume
    from maesil_core.metrics import reconstruction_scores

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
    return {
        "corner": (0, 0, 0),
        "target": target,
        "recon": tiled.recon[0].numpy(),
        "pred": pred,
        "mask": m,
        "scores": reconstruction_scores(pred, target, m) if m.any() else {},
        "baseline": {},
    }


# ---------------------------------------------------------------------------- widget


class ExplorerWidget(JobWidget):
    """Pick a checkpoint and a CT layer, then a superpatch; see what the model fills in."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Mask and reconstruct superpatch")
        v = napari_viewer
        self.checkpoint = FileEdit(
            mode="r", filter="*.safetensors", label="Checkpoint", value=LAST["pretrain"] or ""
        )
        self.image = ComboBox(
            choices=lambda _: [(layer.name, layer) for layer in layers_of(v, "image")],
            label="CT layer",
        )
        self.load_button = PushButton(text="Load model and draw grid")
        self.tile = SpinBox(min=1, max=1, value=1, label="Superpatch #")
        self.pick_by_click = CheckBox(value=True, text="Pick a superpatch by clicking the grid")
        self.cursor_button = PushButton(text="Use superpatch under the cursor")
        self.mode = ComboBox(choices=["dual", "random", "block"], value="dual", label="Mask mode")
        self.ratio = FloatSlider(min=0.05, max=0.95, step=0.05, value=0.75, label="Mask ratio")
        self.seed = SpinBox(min=0, max=2**31 - 1, value=0, label="Seed")
        self.whole_button = PushButton(text="Whole volume (all superpatches)")
        self.scores = Label(value="", label="Scores")
        self.extend(
            [
                self.checkpoint, self.image, self.load_button, self.tile,
                self.pick_by_click, self.cursor_button, self.mode, self.ratio, self.seed,
                self.start_button, self.whole_button, self.cancel_button,
                self.progress_bar, self.status, self.scores,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.load_button, self.whole_button, self.cursor_button]
        self.grid: ModelGrid | None = None
        self._grid_key: tuple | None = None
        self.last_output: dict | None = None

        self.load_button.changed.connect(self.load)
        self.start_button.changed.connect(self.run_superpatch)
        self.whole_button.changed.connect(self.run_whole_volume)
        self.cursor_button.changed.connect(self.pick_from_cursor)
        self.tile.changed.connect(self._highlight)
        v.layers.events.inserted.connect(lambda *_: self.image.reset_choices())
        v.layers.events.removed.connect(lambda *_: self.image.reset_choices())
        v.mouse_drag_callbacks.append(self._on_click)
        v.dims.events.ndisplay.connect(self._style_grid)

    # ------------------------------------------------------------------ load
    def _key(self) -> tuple:
        layer = self.image.value
        return (str(self.checkpoint.value), id(layer), id(getattr(layer, "data", None)))

    def load(self, *_: Any, then: Any = None) -> None:
        from maesil_core.errors import MaesilError

        from .._geometry import layer_to_volume

        try:
            ckpt = str(self.checkpoint.value or "").strip()
            if not ckpt or ckpt == ".":
                raise MaesilError("choose a pretraining checkpoint (.safetensors or run folder).")
            layer = self.image.value
            if layer is None:
                raise MaesilError("open a CT first (File > Open, or File > Open Sample).")
            array, affine = layer_to_volume(layer)
        except MaesilError as exc:
            notify_error(str(exc))
            return
        key = self._key()
        self.status.value = "loading..."

        def done(grid: ModelGrid) -> None:
            self.grid, self._grid_key = grid, key
            self._show_grid()
            if then is not None:
                then()

        self.launch(_load_job, ckpt, array, affine, on_progress=self._on_progress, on_done=done)

    def _ensure_loaded(self, then: Any) -> None:
        if self.grid is None or self._grid_key != self._key():
            self.load(then=then)
        else:
            then()

    def _show_grid(self) -> None:
        grid = self.grid
        data, geo, _ = volume_to_layer(grid.tile_ids(), grid.affine)
        self._put_layer("grid", data, geo, "labels", opacity=0.35)
        self._style_grid()
        self.tile.max = grid.n_tiles
        self.tile.value = min(max(1, self.tile.value), grid.n_tiles)
        self.status.value = (
            f"{grid.n_tiles} superpatches of {list(grid.tile)} voxels at "
            f"{grid.cfg.data.spacing} mm; click one or pick its number"
        )
        self._highlight()

    def _style_grid(self, *_: Any) -> None:
        """2D: superpatch outlines; 3D: a faint translucent tint (still clickable)."""
        name = LAYER_NAMES["grid"]
        if name not in self.viewer.layers:
            return
        layer = self.viewer.layers[name]
        if self.viewer.dims.ndisplay == 3:
            layer.contour, layer.opacity, layer.rendering = 0, 0.08, "translucent"
        else:
            layer.contour, layer.opacity = 1, 0.35

    def _highlight(self, *_: Any) -> None:
        name = LAYER_NAMES["grid"]
        if name in self.viewer.layers:
            self.viewer.layers[name].selected_label = int(self.tile.value)

    # ------------------------------------------------------------------ picking
    def tile_at(self, position: Any, view_direction: Any = None, dims_displayed: Any = None):
        """Superpatch id at a world position (3D: first along the view ray), or None."""
        name = LAYER_NAMES["grid"]
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        value = layer.get_value(
            position, view_direction=view_direction, dims_displayed=dims_displayed, world=True
        )
        return int(value) if value else None

    def _on_click(self, viewer: Any, event: Any):
        if not self.pick_by_click.value or self.grid is None or self.running:
            return
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if dragged:
            return
        tile = self.tile_at(
            event.position,
            view_direction=getattr(event, "view_direction", None),
            dims_displayed=list(getattr(event, "dims_displayed", [])) or None,
        )
        if tile:
            self.tile.value = tile
            self.run_superpatch()

    def pick_from_cursor(self, *_: Any) -> None:
        v = self.viewer
        ndisplay = v.dims.ndisplay
        direction = v.camera.view_direction if ndisplay == 3 else None
        displayed = list(v.dims.displayed) if ndisplay == 3 else None
        tile = self.tile_at(v.cursor.position, direction, displayed)
        if tile is None:
            notify_error("the cursor is not over the superpatch grid; load the model first.")
            return
        self.tile.value = tile
        self.run_superpatch()

    # ------------------------------------------------------------------ run
    def run_superpatch(self, *_: Any) -> None:
        def go() -> None:
            corner = self.grid.corner(int(self.tile.value))
            self.status.value = f"superpatch #{self.tile.value} at voxel {list(corner)}"
            self.launch(
                _superpatch_job,
                self.grid,
                corner,
                self.mode.value,
                float(self.ratio.value),
                int(self.seed.value),
                on_progress=self._on_progress,
                on_done=self._show_result,
            )

        self._ensure_loaded(go)

    def run_whole_volume(self, *_: Any) -> None:
        def go() -> None:
            self.status.value = f"reconstructing {self.grid.n_tiles} superpatches..."
            self.launch(
                _volume_job,
                self.grid,
                self.mode.value,
                float(self.ratio.value),
                int(self.seed.value),
                on_progress=self._on_progress,
                on_done=self._show_result,
            )

        self._ensure_loaded(go)

    def _on_progress(self, info: dict) -> None:
        if info.get("phase") == "load":
            self.status.value = info.get("message", "")
            return
        steps = max(1, int(info.get("steps", 1)))
        self.progress_bar.max = steps
        self.progress_bar.value = min(int(info.get("step", 0)), steps)
        if steps > 1:
            self.status.value = f"superpatch {info.get('step')}/{steps}"

    # ------------------------------------------------------------------ results
    def _put_layer(self, key: str, data: np.ndarray, geo: dict, kind: str, **kwargs: Any):
        from napari.layers import Image, Labels

        name = LAYER_NAMES[key]
        meta = {META_KEY: {"kind": kind, "explorer": key}}
        cls = Labels if kind == "labels" else Image
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], cls):
            layer = self.viewer.layers[name]
            layer.data = data
            layer.scale = geo["scale"]
            layer.translate = geo["translate"]
            if "rotate" in geo:
                layer.rotate = geo["rotate"]
            for k, val in kwargs.items():
                setattr(layer, k, val)
            return layer
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, metadata=meta, **geo, **kwargs)

    def _show_result(self, out: dict) -> None:
        grid = self.grid
        self.last_output = out
        affine = grid.affine_at(out["corner"])
        target, recon, pred, m = out["target"], out["recon"], out["pred"], out["mask"]
        if grid.hu:
            masked = np.where(m, grid.low, grid.to_units(target)).astype(np.float32)
            shown = grid.to_units(recon)
            error = np.abs(grid.to_units(pred) - grid.to_units(target)) * m
            limits = [grid.low, grid.high]
            err_limits = [0.0, (grid.high - grid.low) / 2]
        else:
            masked = np.where(m, 0.0, target).astype(np.float32)
            shown, error = recon, np.abs(pred - target) * m
            limits, err_limits = [0.0, 1.0], [0.0, 0.5]
        layers = {}
        for key, arr in (("masked", masked), ("recon", shown), ("error", error)):
            data, geo, _ = volume_to_layer(arr.astype(np.float32), affine)
            layers[key] = self._put_layer(
                key,
                data,
                geo,
                "image",
                contrast_limits=err_limits if key == "error" else limits,
                colormap="inferno" if key == "error" else "gray",
            )
        data, geo, _ = volume_to_layer(m.astype(np.uint8), affine)
        layers["mask"] = self._put_layer("mask", data, geo, "labels", opacity=0.3)
        self.layers_out = layers
        s, b = out["scores"], out["baseline"]
        text = ""
        if s:
            text = f"PSNR {s['psnr']:.1f} dB · SSIM {s['ssim']:.3f}"
            if b:
                text += (
                    f" (interpolating the visible: PSNR {b['psnr']:.1f} dB · SSIM {b['ssim']:.3f})"
                )
        self.scores.value = text
        self.status.value = f"done · {int(m.sum())} masked voxels ({100 * m.mean():.0f}%)"
        self.progress_bar.value = self.progress_bar.max
