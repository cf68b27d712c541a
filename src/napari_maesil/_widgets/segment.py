"""Segment widget: a fine-tuned checkpoint labels the CT layer (sliding window, cancellable);
the result is a Labels layer whose features name the organs (hover shows them) and which
the plugin's writer saves on the CT's own grid with its affine.

Everything heavy runs in the job's thread: the segmentation itself, and turning it into the
layer's array (uint8 in napari's (z, y, x) order) with the list of organs found; the Qt
thread only adds the finished layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, PushButton

from .._geometry import META_KEY, layer_units
from .._reader import label_features
from ._base import LAST, JobWidget, device_choices, layers_of, notify_error, notify_info
from .layers_io import label_map_problem, layer_volume

if TYPE_CHECKING:
    import napari


@dataclass
class SegmentOutput:
    """A segmentation ready for the viewer: ``data`` (z, y, x) on the CT layer's grid."""

    data: np.ndarray
    names: dict[int, str]
    found: list[str]
    features: dict[str, list]
    extra: dict[str, Any] = field(default_factory=dict)
    #: classes whose volume or share of air is implausible (shown as notifications)
    warnings: list[str] = field(default_factory=list)


def _segment_job(checkpoint, volume, overlap, largest, body, device, *, progress, cancel):
    """Runs in the job's thread: segment, then the layer's array, features and organs."""
    import pandas  # noqa: F401  (napari builds the features table with it: import it here)

    from maesil_core.segmentation import segment

    progress({"phase": "prepare", "message": "loading the segmenter"})
    seg = segment(
        checkpoint,
        volume,
        overlap=overlap,
        largest_component=largest,
        body_mask=body,
        device=device,
        progress=progress,
        cancel=cancel,
    )
    progress({"phase": "finish", "message": "preparing the layer"})
    labels = np.asarray(seg.labels)
    seg.labels = None  # the (X, Y, Z) map goes once copied
    top = int(max(seg.classes, default=0))
    dtype = np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.int32)
    # (X, Y, Z) -> (z, y, x), narrowed, and the organs present, slab by slab: each numpy
    # call holds the GIL for milliseconds only, so the viewer keeps painting meanwhile
    data = np.empty(labels.shape[::-1], dtype=dtype)
    present: set[int] = set()
    for z0 in range(0, data.shape[0], _SLAB):
        slab = data[z0 : z0 + _SLAB]
        slab[...] = labels[:, :, z0 : z0 + _SLAB].transpose(2, 1, 0)
        present.update(np.flatnonzero(np.bincount(slab.ravel().astype(np.intp, copy=False))))
    del labels
    names = {int(k): str(v) for k, v in seg.classes.items()}
    found = [names[i] for i in sorted(names) if i in present]
    top = max(top, max(present, default=0))
    features = label_features(names, top)
    return SegmentOutput(data, names, found, features, dict(seg.extra), list(seg.warnings))


#: slices per slab when the result is turned into the layer's array
_SLAB = 8


def _segmentation_defaults(checkpoint: str) -> dict[str, Any] | None:
    """The chosen model's own segmentation settings ('largest component', 'body mask'), from
    its JSON metadata only (no torch on the Qt thread); None if the path is not (yet) a
    segmentation checkpoint."""
    p = Path(checkpoint).expanduser()
    candidates = []
    if p.is_dir():
        candidates = [p / "best.json", *sorted((p / "checkpoints").glob("step_*.json"))[-1:]]
    elif p.suffix == ".safetensors":
        candidates = [p.with_suffix(".json")]
    for meta_path in candidates:
        try:
            meta = json.loads(meta_path.read_text())
            return dict(meta["extra"]["segmentation"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


class SegmentWidget(JobWidget):
    """CT layer + segmentation checkpoint -> Labels layer with organ names."""

    title = "Segment"
    option_fields: ClassVar[dict[str, str]] = {"out": "save_path"}

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
        self.body = CheckBox(value=True, text="Only inside the body")
        self.body.tooltip = (
            "keep labels inside the patient's body, found from the intensities (above -500 HU, "
            "lungs included): a model asked about the air around the body may call it an organ"
        )
        self.device = ComboBox(choices=device_choices, label="Device")
        self.save_path = FileEdit(
            mode="w", filter="NIfTI (*.nii.gz);;DICOM-SEG (*.dcm)", value="", label="Save as"
        )
        self.save_path.tooltip = (
            "a .nii.gz on the CT's grid with its affine (+ <name>.json of label names); "
            ".dcm: DICOM-SEG referencing the series, for a CT opened from a DICOM folder"
        )
        self.save_button = PushButton(text="Save segmentation (NIfTI or DICOM-SEG)")
        self.extend(
            [
                self.image, self.checkpoint, self.overlap, self.largest, self.body, self.device,
                self.start_button, self.cancel_button, self.progress_bar, self.status,
                self.save_path, self.save_button,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.save_button]
        self.start_button.changed.connect(self.start)
        self.checkpoint.changed.connect(self._follow_checkpoint)
        self._follow_checkpoint()
        self.save_button.changed.connect(self.save)
        self.result_layer: Any = None
        self._source: Any = None

    def _follow_checkpoint(self, *_: Any) -> None:
        """Start the largest-piece and body boxes from the chosen model's own settings (as
        the CLI does)."""
        ckpt = str(self.checkpoint.value or "").strip()
        if ckpt and ckpt != ".":
            seg = _segmentation_defaults(ckpt)
            if seg is not None:
                self.largest.value = bool(seg.get("largest_component", False))
                self.body.value = bool(seg.get("body_mask", True))

    def start(self, *_: Any) -> None:
        from maesil_core.errors import MaesilError

        try:
            ckpt = str(self.checkpoint.value or "").strip()
            if not ckpt or ckpt == ".":
                raise MaesilError("choose a fine-tuned segmentation checkpoint or run folder.")
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
        self._source = layer
        self.progress_bar.value = 0
        self.status.value = "loading the segmenter..."
        self.launch(
            _segment_job,
            ckpt,
            volume,
            float(self.overlap.value),
            bool(self.largest.value),
            bool(self.body.value),
            self.device.value,
            on_progress=self._on_progress,
            on_done=self._on_done,
        )

    def _on_progress(self, info: dict) -> None:
        if info.get("message"):
            self.status.value = info["message"]
        if info.get("steps"):
            steps = max(1, int(info["steps"]))
            self.progress_bar.max = steps
            self.progress_bar.value = min(int(info.get("step", 0)), steps)
            self.status.value = f"window {info.get('step')}/{steps}"

    def _on_done(self, out: SegmentOutput) -> None:
        src = self._source
        meta = dict(src.metadata.get(META_KEY) or {})
        meta.update(
            {"kind": "labels", "label_names": out.names, "checkpoint": out.extra.get("checkpoint")}
        )
        name = f"{src.name} segmentation"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.result_layer = self.viewer.add_labels(
            out.data,
            name=name,
            scale=src.scale,
            translate=src.translate,
            rotate=src.rotate,
            metadata={META_KEY: meta},
            features=out.features,
            **layer_units(),
        )
        self.status.value = (
            f"done · {len(out.found)} organs: {', '.join(out.found) or 'none found'}"
        )
        if out.warnings:
            from napari.utils.notifications import show_warning

            for line in out.warnings:  # an organ full of air, or too large: say so
                show_warning(line)

    def save(self, *_: Any) -> None:
        """Write the result layer in a job: NIfTI on the CT's grid (+ ``<name>.json``), or for
        a CT read from a DICOM series and a path ending ``.dcm``, DICOM-SEG referencing it."""
        path = str(self.save_path.value or "").strip()
        if self.result_layer is None or self.result_layer not in self.viewer.layers:
            notify_error("segment a CT first; the result layer is what gets saved.")
            return
        if not path or path == ".":
            notify_error(
                "choose where to save the segmentation: a .nii.gz path, or a .dcm path for "
                "DICOM-SEG when the CT came from a DICOM series."
            )
            return
        data, meta, _ = self.result_layer.as_layer_data_tuple()
        self.status.value = f"saving {Path(path).name}..."
        self.launch(
            _save_job,
            path,
            np.array(data),  # a copy: the layer may be painted on meanwhile
            meta,
            on_progress=self._on_progress,
            on_done=self._on_saved,
        )

    def _on_saved(self, written: list[str]) -> None:
        self.status.value = f"saved {', '.join(Path(p).name for p in written)}"
        notify_info(f"saved {', '.join(str(p) for p in written)}")


def _save_job(path: str, data: np.ndarray, meta: dict, *, progress, cancel) -> list[str]:
    """Runs in the job's thread: the plugin's NIfTI writer, or DICOM-SEG (``.dcm``)."""
    from .._writer import label_names_of, volume_for_saving, write_labels

    progress({"phase": "save", "message": f"writing {Path(path).name}"})
    if not path.lower().endswith(".dcm"):
        return write_labels(path, data, meta)
    from maesil_core.data.io import is_dicom_dir
    from maesil_core.errors import DataError
    from maesil_core.interop.dicom_seg import save_dicom_seg

    series = str(((meta.get("metadata") or {}).get(META_KEY) or {}).get("source") or "")
    if not series or not is_dicom_dir(series):
        raise DataError(
            "DICOM-SEG refers to the DICOM series the CT was read from, and this CT came "
            f"from {series or 'no file'}: save it as .nii.gz instead, or open the series folder.",
            option="out",
        )
    array, affine = volume_for_saving(data, meta)
    written = save_dicom_seg(path, array, affine, label_names_of(meta), series, overwrite=True)
    return [str(written)]
