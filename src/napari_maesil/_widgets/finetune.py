"""Fine-tune widget: a UNETR segmenter on an Image + Labels pair (or folders of pairs),
starting from a pretraining checkpoint or from scratch (``maesil_core.segmentation``).

The checkpoint is read, the configuration built and the label names written in the job's
thread; the widget plots the validation Dice of each class as it trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, LineEdit, SpinBox

from ._base import (
    LAST,
    JobWidget,
    device_choices,
    fmt_seconds,
    layers_of,
    notify_info,
    wrapped_label,
)
from ._plots import CurvePlot
from .layers_io import label_map_problem, layer_label_names, layer_volume

if TYPE_CHECKING:
    import napari


def finetune_config(pretrained: str | None, settings: dict[str, Any]) -> Any:
    """The fine-tuning RunConfig: the pretrained checkpoint's architecture, spacing and HU
    window (metadata only), with the widget's training ``settings``."""
    from maesil_core.checkpoint import load_checkpoint
    from maesil_core.segmentation import config_from_pretrained

    ckpt = load_checkpoint(pretrained, kind="pretrain", weights_too=False) if pretrained else None
    cfg = config_from_pretrained(ckpt)
    log_every = max(1, min(cfg.train.log_every, settings.pop("eval_every")))
    cfg = cfg.override("train", log_every=log_every, **settings)
    return cfg.override("data", num_workers=0).validate()


def _finetune_job(images, labels, run_dir, names, validate, options, *, progress, cancel):
    """Runs in the job's thread: the config, the label names, then ``finetune``."""
    from maesil_core.segmentation import SegmentationConfig, finetune

    progress({"phase": "prepare", "message": "reading the pretrained checkpoint"})
    options = dict(options)
    settings = options.pop("settings")
    cfg = finetune_config(options.get("pretrained"), dict(settings))
    seg = SegmentationConfig(eval_every=int(settings["eval_every"]))
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
        cfg,
        seg=seg,
        label_names=label_names,
        val_images=images if validate else None,
        val_labels=labels if validate else None,
        resample_labels=True,
        progress=progress,
        cancel=cancel,
        **options,
    )


class FinetuneWidget(JobWidget):
    """Fine-tune a segmenter: CT + labels, pretrained checkpoint, classes, budget, device."""

    title = "Fine-tune"
    option_fields: ClassVar[dict[str, str]] = {
        "run_dir": "out_dir",
        "out": "out_dir",
        "force": "overwrite",
    }

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Start fine-tuning")
        v = napari_viewer
        self.image = ComboBox(
            choices=lambda _: [(x.name, x) for x in layers_of(v, "image")], label="CT layer"
        )
        # not ``self.labels``: that is magicgui's Container.labels (show the field labels)
        self.labels_layer = ComboBox(
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
        self.device = ComboBox(choices=device_choices, label="Device")
        self.out_dir = FileEdit(
            mode="d", value=str(Path.home() / "maesil-runs" / "segment"), label="Output folder"
        )
        self.resume = CheckBox(value=False, text="Resume the run in the output folder")
        self.overwrite = CheckBox(value=False, text="Overwrite an earlier run there")
        self.dice = wrapped_label("Val Dice")
        self.extend(
            [
                self.image, self.labels_layer, self.image_folder, self.labels_folder,
                self.pretrained, self.classes, self.steps, self.batch_size, self.lr,
                self.validate, self.eval_every, self.device, self.out_dir, self.resume,
                self.overwrite, self.start_button, self.cancel_button, self.progress_bar,
                self.status, self.dice,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.resume]
        self.plot = CurvePlot(v, "step", "validation Dice")
        self.plot.ylim = (0.0, 1.0)
        self.add_plot(self.plot)
        self.start_button.changed.connect(self.start)
        self.dice_history: list[dict[str, float]] = []

    def _data(self) -> tuple[Any, Any, dict[int, str]]:
        from maesil_core.errors import MaesilError

        img_dir = str(self.image_folder.value or "").strip()
        lab_dir = str(self.labels_folder.value or "").strip()
        if img_dir not in ("", ".") or lab_dir not in ("", "."):
            if img_dir in ("", ".") or lab_dir in ("", "."):
                raise MaesilError("give both a CT folder and a labels folder (paired by name).")
            return [img_dir], [lab_dir], {}
        image, labels = self.image.value, self.labels_layer.value
        if image is None or labels is None:
            raise MaesilError(
                "choose a CT layer and its Labels layer (or a CT folder and a labels folder)."
            )
        problem = label_map_problem(image)
        if problem:
            raise MaesilError(problem)
        # the labels are copied: the user may paint on them while the job runs
        return [layer_volume(image)], [layer_volume(labels, labels=True)], layer_label_names(labels)

    def start(self, *_: Any) -> None:
        from maesil_core.errors import MaesilError

        try:
            run_dir = str(self.out_dir.value or "").strip()
            if not run_dir or run_dir == ".":
                raise MaesilError("choose an output folder for the segmentation run.")
            images, labels, names = self._data()
        except MaesilError as exc:
            self.notify_error(exc)
            return
        pretrained = str(self.pretrained.value or "").strip()
        classes = [c.strip() for c in str(self.classes.value).split(",") if c.strip()]
        options = {
            "pretrained": None if pretrained in ("", ".") else pretrained,
            "settings": {
                "steps": int(self.steps.value),
                "batch_size": int(self.batch_size.value),
                "lr": float(self.lr.value),
                "device": self.device.value,
                "eval_every": int(self.eval_every.value),
            },
            "classes": [int(c) if c.isdigit() else c for c in classes] or None,
            "resume": bool(self.resume.value),
            "force": bool(self.overwrite.value),
        }
        self.dice_history = []
        self.dice.value = ""
        self.plot.clear()
        self.progress_bar.value = 0
        self.status.value = "starting..."
        self.launch(
            _finetune_job,
            images,
            labels,
            run_dir,
            names,
            bool(self.validate.value),
            options,
            on_progress=self._on_progress,
            on_done=self._on_done,
        )

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
            for name in dice:
                points = [(h["step"], h[name]) for h in self.dice_history if name in h]
                self.plot.set(name, points)
            self.plot.draw()

    def _on_done(self, result: Any) -> None:
        self.plot.draw(force=True)
        if result is None:
            return
        LAST["segmentation"] = str(result.run_dir)
        ckpt = result.best_checkpoint or result.checkpoint
        what = "cancelled at" if result.cancelled else "finished at"
        self.status.value = f"{what} step {result.step}: {ckpt}"
        if not result.cancelled:
            notify_info(f"Fine-tuning finished: {ckpt}")
