"""Fine-tune widget: a UNETR segmenter on an Image + Labels pair (or folders of pairs),
starting from a pretraining checkpoint or from scratch (``maesil_core.segmentation``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, LineEdit, SpinBox

from ._base import LAST, JobWidget, device_choices, fmt_seconds, layers_of, notify_error
from .layers_io import layer_label_names, layer_volume


def _finetune_job(images, labels, run_dir, names, validate, kwargs, *, progress, cancel):
    """Runs in a worker thread: write the label names, then ``finetune``."""
    from maesil_core.segmentation import finetune

    label_names = None
    if names:
        path = Path(run_dir) / "label_names.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(k): v for k, v in names.items()}))
        label_names = path
    progress({"phase": "prepare", "message": "loading the labelled volumes"})
    return finetune(
        images,
        labels,
        run_dir,
        label_names=label_names,
        val_images=images if validate else None,
        val_labels=labels if validate else None,
        resample_labels=True,
        progress=progress,
        cancel=cancel,
        **kwargs,
    )


class FinetuneWidget(JobWidget):
    """Fine-tune a segmenter: CT + labels, pretrained checkpoint, classes, budget, device."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Start fine-tuning")
        v = napari_viewer
        self.image = ComboBox(
            choices=lambda _: [(x.name, x) for x in layers_of(v, "image")], label="CT layer"
        )
        self.labels = ComboBox(
            choices=lambda _: [(x.name, x) for x in layers_of(v, "labels")], label="Labels layer"
        )
        self.image_folder = FileEdit(mode="d", value="", label="or CT folder")
        self.labels_folder = FileEdit(mode="d", value="", label="and labels folder")
        self.pretrained = FileEdit(
            mode="r", filter="*.safetensors", value=LAST["pretrain"] or "", label="Pretrained"
        )
        self.classes = LineEdit(value="", label="Classes")
        self.classes.tooltip = "names or ids, comma separated (empty: every label found)"
        self.steps = SpinBox(min=1, max=10_000_000, value=300, label="Steps")
        self.batch_size = SpinBox(min=1, max=1024, value=2, label="Batch size")
        self.lr = FloatSpinBox(min=1e-7, max=1.0, step=1e-4, value=1e-3, label="Learning rate")
        self.lr.native.setDecimals(6)
        self.validate = CheckBox(value=True, text="Report validation Dice (on the training pair)")
        self.eval_every = SpinBox(min=1, max=1_000_000, value=50, label="Validate every")
        self.device = ComboBox(choices=device_choices(), label="Device")
        self.out_dir = FileEdit(
            mode="d", value=str(Path.home() / "maesil-runs" / "segment"), label="Output folder"
        )
        self.resume = CheckBox(value=False, text="Resume the run in the output folder")
        self.overwrite = CheckBox(value=False, text="Overwrite an earlier run there")
        self.dice = Label(value="", label="Val Dice")
        self.extend(
            [
                self.image, self.labels, self.image_folder, self.labels_folder,
                self.pretrained, self.classes, self.steps, self.batch_size, self.lr,
                self.validate, self.eval_every, self.device, self.out_dir, self.resume,
                self.overwrite, self.start_button, self.cancel_button, self.progress_bar,
                self.status, self.dice,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.resume]
        self.start_button.changed.connect(self.start)
        for combo in (self.image, self.labels):
            v.layers.events.inserted.connect(lambda *_, c=combo: c.reset_choices())
            v.layers.events.removed.connect(lambda *_, c=combo: c.reset_choices())
        self.dice_history: list[dict[str, float]] = []

    def _data(self) -> tuple[Any, Any, dict[int, str]]:
        from maesil_core.errors import MaesilError

        img_dir = str(self.image_folder.value or "").strip()
        lab_dir = str(self.labels_folder.value or "").strip()
        if img_dir not in ("", ".") or lab_dir not in ("", "."):
            if img_dir in ("", ".") or lab_dir in ("", "."):
                raise MaesilError("give both a CT folder and a labels folder (paired by name).")
            return [img_dir], [lab_dir], {}
        image, labels = self.image.value, self.labels.value
        if image is None or labels is None:
            raise MaesilError(
                "choose a CT layer and its Labels layer (or a CT folder and a labels folder)."
            )
        return [layer_volume(image)], [layer_volume(labels, labels=True)], layer_label_names(labels)

    def start(self, *_: Any) -> None:
        from maesil_core.errors import MaesilError
        from maesil_core.segmentation import SegmentationConfig

        try:
            images, labels, names = self._data()
            run_dir = str(self.out_dir.value or "").strip()
            if not run_dir or run_dir == ".":
                raise MaesilError("choose an output folder for the segmentation run.")
            pretrained = str(self.pretrained.value or "").strip()
            pretrained = None if pretrained in ("", ".") else pretrained
            classes = [c.strip() for c in str(self.classes.value).split(",") if c.strip()]
            classes = [int(c) if c.isdigit() else c for c in classes] or None
            cfg = self._config(pretrained)
        except MaesilError as exc:
            notify_error(str(exc))
            return
        seg = SegmentationConfig(eval_every=int(self.eval_every.value))
        kwargs = {
            "cfg": cfg,
            "pretrained": pretrained,
            "seg": seg,
            "classes": classes,
            "resume": bool(self.resume.value),
            "force": bool(self.overwrite.value),
        }
        self.dice_history = []
        self.dice.value = ""
        self.progress_bar.value = 0
        self.status.value = "starting..."
        self.launch(
            _finetune_job,
            images,
            labels,
            run_dir,
            names,
            bool(self.validate.value),
            kwargs,
            on_progress=self._on_progress,
            on_done=self._on_done,
        )

    def _config(self, pretrained: str | None) -> Any:
        from maesil_core.checkpoint import load_checkpoint
        from maesil_core.segmentation import config_from_pretrained

        ckpt = load_checkpoint(pretrained, kind="pretrain") if pretrained else None
        cfg = config_from_pretrained(ckpt)
        cfg = cfg.override(
            "train",
            steps=int(self.steps.value),
            batch_size=int(self.batch_size.value),
            lr=float(self.lr.value),
            device=self.device.value,
            log_every=max(1, min(cfg.train.log_every, int(self.eval_every.value))),
        )
        cfg = cfg.override("data", num_workers=0)
        return cfg.validate()

    def _on_progress(self, info: dict) -> None:
        if info.get("phase") == "prepare":
            self.status.value = info.get("message", "")
            return
        step, steps = int(info.get("step", 0)), max(1, int(info.get("steps", 1)))
        self.progress_bar.max = steps
        self.progress_bar.value = min(step, steps)
        text = f"step {step}/{steps}"
        if info.get("loss") is not None:
            text += f" · loss {info['loss']:.4f}"
        if info.get("phase") == "train":
            text += f" · ETA {fmt_seconds(info.get('eta_s'))}"
        self.status.value = text
        dice = {k[len("val_dice_") :]: v for k, v in info.items() if k.startswith("val_dice_")}
        if dice:
            self.dice_history.append({"step": step, **dice})
            self.dice.value = " · ".join(f"{k} {v:.2f}" for k, v in dice.items()) + (
                f" (mean {info['val_dice']:.2f})" if "val_dice" in info else ""
            )

    def _on_done(self, result: Any) -> None:
        if result is None:
            return
        LAST["segmentation"] = str(result.run_dir)
        ckpt = result.best_checkpoint or result.checkpoint
        what = "cancelled at" if result.cancelled else "finished at"
        self.status.value = f"{what} step {result.step}: {ckpt}"
        if not result.cancelled:
            from napari.utils.notifications import show_info

            show_info(f"Fine-tuning finished: {ckpt}")
