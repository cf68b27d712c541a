"""Superpatch explorer: mask a superpatch of the CT, let a pretrained model fill it in.

The CT layer is brought onto the model's grid exactly as in training (RAS, the checkpoint's
spacing, intensities to [0, 1]: ``inference_transforms``). Superpatches are the tiles of
that grid from its first voxel (the tiling of ``reconstruct_volume``); the grid is drawn as
a Labels layer (one id per superpatch, outlines in 2D) so clicking it, or its value under
the cursor, picks a superpatch in 2D and in 3D. Results are added on the model grid, placed
in world coordinates with the same convention as the CT (see ``napari_maesil._geometry``):
the CT as the model sees it ("original"), the masked input, the reconstruction, the
interpolation reference (the hidden voxels interpolated from the visible ones,
``metrics.interpolation_fill``: what a smoothing filter gives without learning), |error| (in
HU for HU scans) and the mask (Labels, 1 = hidden from the model).

What is shown first: the original, the masked input, the reconstruction and the
interpolation reference side by side (napari's grid mode, the other layers hidden until side
by side is switched off), so the model's picture compares at a glance with what smoothing
alone gives; |error| is one checkbox away, and the reference one checkbox from hidden. Every array is computed in the
job's thread; the Qt thread only puts finished layers in the viewer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSlider, PushButton, SpinBox

from .._geometry import META_KEY, layer_units
from ._base import LAST, JobWidget, layers_of, notify_error, wrapped_label
from .explorer_jobs import (
    ExplorerOutput,
    ModelGrid,
    load_job,
    superpatch_job,
    volume_job,
)
from .layers_io import label_map_problem, layer_volume

if TYPE_CHECKING:
    import napari

LAYER_NAMES = {
    "grid": "superpatch grid",
    "original": "original",
    "masked": "masked input",
    "recon": "reconstruction",
    "reference": "interpolation (reference)",
    "error": "|error|",
    "mask": "mask",
}
#: the layers compared side by side, in grid order (and the reference, unless unticked)
SIDE_BY_SIDE = ("original", "masked", "recon")
#: the result layers, in the order they are added
RESULTS = (*SIDE_BY_SIDE, "reference", "error")


# ---------------------------------------------------------------------------- widget


class ExplorerWidget(JobWidget):
    """Pick a checkpoint and a CT layer, then a superpatch; see what the model fills in."""

    title = "Explorer"
    option_fields: ClassVar[dict[str, str]] = {"mask_ratio": "ratio", "mask_mode": "mode"}

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
        self.side_by_side = CheckBox(
            value=True, text="Side by side: original | masked input | reconstruction | reference"
        )
        self.side_by_side.tooltip = (
            "napari's grid mode with the result layers only; switch off to see the "
            "results over the CT and to pick superpatches by clicking"
        )
        self.show_reference = CheckBox(
            value=True, text="Show the interpolation reference beside the reconstruction"
        )
        self.show_reference.tooltip = (
            "the hidden voxels interpolated from the visible ones (no learning): what the "
            "reconstruction shows beyond it, a smoothing filter could not"
        )
        self.show_error = CheckBox(value=False, text="Show |error| (hidden voxels)")
        self.scores = wrapped_label("Scores")
        self.extend(
            [
                self.checkpoint, self.image, self.load_button, self.tile,
                self.pick_by_click, self.cursor_button, self.mode, self.ratio, self.seed,
                self.start_button, self.whole_button, self.side_by_side,
                self.show_reference, self.show_error,
                self.cancel_button, self.progress_bar, self.status, self.scores,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.load_button, self.whole_button, self.cursor_button]
        self.grid: ModelGrid | None = None
        self._grid_key: tuple | None = None
        self.last_output: dict | None = None
        self._hidden_for_grid: dict[str, bool] | None = None

        self.load_button.changed.connect(self.load)
        self.start_button.changed.connect(self.run_superpatch)
        self.whole_button.changed.connect(self.run_whole_volume)
        self.cursor_button.changed.connect(self.pick_from_cursor)
        self.tile.changed.connect(self._highlight)
        self.side_by_side.changed.connect(self._apply_view)
        self.show_reference.changed.connect(self._apply_view)
        self.show_error.changed.connect(self._apply_view)
        self.add_mouse_callback(self._on_click)
        self.connect_viewer(v.dims.events.ndisplay, self._style_grid)

    # ------------------------------------------------------------------ load
    def _key(self) -> tuple:
        layer = self.image.value
        return (str(self.checkpoint.value), id(layer), id(getattr(layer, "data", None)))

    def load(self, *_: Any, then: Any = None) -> None:
        from maesil_core.errors import MaesilError

        try:
            ckpt = str(self.checkpoint.value or "").strip()
            if not ckpt or ckpt == ".":
                raise MaesilError("choose a pretraining checkpoint (.safetensors or run folder).")
            layer = self.image.value
            if layer is None:
                raise MaesilError("open a CT first (File > Open, or File > Open Sample).")
            problem = label_map_problem(layer)
            if problem:
                raise MaesilError(problem)
            volume = layer_volume(layer)
        except MaesilError as exc:
            self.notify_error(exc)
            return
        key = self._key()
        self.status.value = "loading..."

        def done(result: tuple) -> None:
            grid, (data, geo) = result
            self.grid, self._grid_key = grid, key
            self._show_grid(data, geo)
            if then is not None:
                then()

        self.launch(load_job, ckpt, volume, on_progress=self._on_progress, on_done=done)

    def _ensure_loaded(self, then: Any) -> None:
        if self.grid is None or self._grid_key != self._key():
            self.load(then=then)
        else:
            then()

    def _show_grid(self, data: np.ndarray, geo: dict) -> None:
        grid = self.grid
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
        if view_direction is None:  # 2D: from the grid's geometry (the layer may be hidden)
            return self.grid.tile_at_world(position) if self.grid is not None else None
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
        if self._grid_mode().enabled:
            return  # side by side: positions belong to the grid's cells
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
                superpatch_job,
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
                volume_job,
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
        return add(data, name=name, metadata=meta, **geo, **layer_units(), **kwargs)

    def _show_result(self, out: ExplorerOutput) -> Iterator[None]:
        """Put the result layers in the viewer, one per turn of the event loop (a generator:
        see ``JobWidget.launch``), then arrange the view."""
        self.last_output = out.raw
        layers = {}
        for key in RESULTS:
            data, geo = out.layers[key]
            layers[key] = self._put_layer(
                key,
                data,
                geo,
                "image",
                contrast_limits=out.error_limits if key == "error" else out.limits,
                colormap="inferno" if key == "error" else "gray",
                visible=False,  # _apply_view decides what shows
            )
            yield
        data, geo = out.layers["mask"]
        layers["mask"] = self._put_layer("mask", data, geo, "labels", opacity=0.3, visible=False)
        yield
        self.layers_out = layers
        self.scores.value = out.scores_text
        self.status.value = out.status_text
        self.progress_bar.value = self.progress_bar.max
        self._apply_view()
        if self._grid_mode().enabled:
            yield  # the grid's viewboxes are laid out on this turn of the event loop
            self._frame_side_by_side()

    # ------------------------------------------------------------------ view
    def _grid_mode(self) -> Any:
        """napari's grid-mode model (``viewer.canvas.grid`` since napari 0.9)."""
        canvas = getattr(self.viewer, "canvas", None)
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid

    def _frame_side_by_side(self) -> None:
        """Fit the compared layers (a superpatch) to their viewboxes: fitted to every layer,
        the hidden CT included, a superpatch was a dot in each."""
        shown = [layer for layer in self.viewer.layers if layer.visible]
        if shown:
            self.viewer.reset_view(layers=shown)

    def _apply_view(self, *_: Any) -> None:
        """Side by side (grid mode: original | masked input | reconstruction [| interpolation
        reference] [| |error|]), or the results over the CT (the reference hidden there: it
        would cover the reconstruction; its eye in the layer list shows it); |error| shown
        only when asked."""
        layers = self.viewer.layers
        names = {key: LAYER_NAMES[key] for key in (*RESULTS, "mask")}
        have = all(n in layers for n in names.values())
        grid = self._grid_mode()
        if not have:
            return
        error = names["error"]
        if self.side_by_side.value:
            asked = {"reference": self.show_reference.value, "error": self.show_error.value}
            shown = {names[k] for k in SIDE_BY_SIDE} | {names[k] for k, on in asked.items() if on}
            if self._hidden_for_grid is None:
                self._hidden_for_grid = {layer.name: layer.visible for layer in layers}
            for layer in layers:
                layer.visible = layer.name in shown
            grid.enabled = True
            self._frame_side_by_side()
            return
        grid.enabled = False
        saved, self._hidden_for_grid = self._hidden_for_grid, None
        for layer in layers:
            if layer.name in names.values():
                continue
            if saved is not None and layer.name in saved:
                layer.visible = saved[layer.name]
        layers[names["original"]].visible = False  # the CT itself is below
        layers[names["masked"]].visible = False
        layers[names["reference"]].visible = False
        layers[names["recon"]].visible = True
        layers[names["mask"]].visible = True
        layers[error].visible = bool(self.show_error.value)
