"""Segment widget: a fine-tuned checkpoint labels the CT layer (sliding window, cancellable);
the result is a Labels layer whose features name the organs (hover shows them) and which
the plugin's writer saves on the CT's own grid with its affine."""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, PushButton

from .._geometry import META_KEY
from .._reader import label_features
from ._base import LAST, JobWidget, device_choices, layers_of, notify_error, notify_info
from .layers_io import layer_volume


def _segment_job(checkpoint, volume, overlap, largest, device, *, progress, cancel):
    from maesil_core.segmentation import segment

    progress({"phase": "prepare", "message": "loading the segmenter"})
    return segment(
        checkpoint,
        volume,
        overlap=overlap,
        largest_component=largest,
        device=device,
        progress=progress,
        cancel=cancel,
    )


class SegmentWidget(JobWidget):
    """CT layer + segmentation checkpoint -> Labels layer with organ names."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Segment")
        v = napari_viewer
        self.image = ComboBox(
            choices=lambda _: [(x.name, x) for x in layers_of(v, "image")], label="CT layer"
        )
        self.checkpoint = FileEdit(
            mode="r", filter="*.safetensors", value=LAST["segmentation"] or "", label="Model"
        )
        self.checkpoint.tooltip = "a fine-tuned run folder (its best checkpoint) or .safetensors"
        self.overlap = FloatSpinBox(min=0.0, max=0.9, step=0.05, value=0.25, label="Overlap")
        self.largest = CheckBox(value=False, text="Keep each organ's largest piece")
        self.largest.tooltip = (
            "drop stray islands: one connected component per organ (leave off for a class "
            "with two parts, such as both kidneys in one label)"
        )
        self.device = ComboBox(choices=device_choices(), label="Device")
        self.save_path = FileEdit(mode="w", filter="*.nii.gz", value="", label="Save as")
        self.save_button = PushButton(text="Save segmentation (NIfTI, CT affine)")
        self.extend(
            [
                self.image, self.checkpoint, self.overlap, self.largest, self.device,
                self.start_button, self.cancel_button, self.progress_bar, self.status,
                self.save_path, self.save_button,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.save_button]
        self.start_button.changed.connect(self.start)
        self.checkpoint.changed.connect(self._follow_checkpoint)
        self._follow_checkpoint()
        self.save_button.changed.connect(self.save)
        v.layers.events.inserted.connect(lambda *_: self.image.reset_choices())
        v.layers.events.removed.connect(lambda *_: self.image.reset_choices())
        self.result_layer: Any = None

    def _follow_checkpoint(self, *_: Any) -> None:
        """Start the largest-piece box from the chosen model's own setting (as the CLI does)."""
        from maesil_core.checkpoint import read_meta
        from maesil_core.errors import MaesilError
        from maesil_core.segmentation import resolve_segmentation_checkpoint

        ckpt = str(self.checkpoint.value or "").strip()
        if not ckpt or ckpt == ".":
            return
        try:
            meta = read_meta(resolve_segmentation_checkpoint(ckpt))
        except (MaesilError, OSError, ValueError):
            return  # not (yet) a segmentation model: Segment will say so
        seg = meta.extra.get("segmentation", {})
        self.largest.value = bool(seg.get("largest_component", False))

    def start(self, *_: Any) -> None:
        from maesil_core.errors import MaesilError

        try:
            ckpt = str(self.checkpoint.value or "").strip()
            if not ckpt or ckpt == ".":
                raise MaesilError("choose a fine-tuned segmentation checkpoint or run folder.")
            layer = self.image.value
            if layer is None:
                raise MaesilError("open a CT first (File > Open, or File > Open Sample).")
            volume = layer_volume(layer)
        except MaesilError as exc:
            notify_error(str(exc))
            return
        self._source = layer
        self.progress_bar.value = 0
        self.launch(
            _segment_job,
            ckpt,
            volume,
            float(self.overlap.value),
            bool(self.largest.value),
            self.device.value,
            on_progress=self._on_progress,
            on_done=self._on_done,
        )

    def _on_progress(self, info: dict) -> None:
        if info.get("phase") == "prepare":
            self.status.value = info.get("message", "")
            return
        steps = max(1, int(info.get("steps", 1)))
        self.progress_bar.max = steps
        self.progress_bar.value = min(int(info.get("step", 0)), steps)
        self.status.value = f"window {info.get('step')}/{steps}"

    def _on_done(self, seg: Any) -> None:
        src = self._source
        data = np.ascontiguousarray(np.asarray(seg.labels).transpose(2, 1, 0))
        top = int(data.max(initial=0))
        data = data.astype(np.uint8 if top < 256 else np.int32)
        names = {int(k): str(v) for k, v in seg.classes.items()}
        meta = dict(src.metadata.get(META_KEY) or {})
        meta.update(
            {"kind": "labels", "label_names": names, "checkpoint": seg.extra.get("checkpoint")}
        )
        name = f"{src.name} segmentation"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.result_layer = self.viewer.add_labels(
            data,
            name=name,
            scale=src.scale,
            translate=src.translate,
            rotate=src.rotate,
            metadata={META_KEY: meta},
            features=label_features(names, top),
        )
        found = [names[i] for i in np.unique(data) if i in names]
        self.status.value = f"done · {len(found)} organs: {', '.join(found) or 'none found'}"

    def save(self, *_: Any) -> None:
        path = str(self.save_path.value or "").strip()
        if self.result_layer is None or self.result_layer not in self.viewer.layers:
            notify_error("segment a CT first; the result layer is what gets saved.")
            return
        if not path or path == ".":
            notify_error("choose where to save the segmentation (a .nii.gz path).")
            return
        written = napari.save_layers(path, [self.result_layer], plugin="napari-maesil")
        notify_info(f"saved {', '.join(str(p) for p in written)}")
