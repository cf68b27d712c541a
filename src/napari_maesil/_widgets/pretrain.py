"""Pretrain widget: MAESIL self-supervised pretraining on the open CT layers or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    Select,
    SpinBox,
)

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
from .layers_io import label_map_problem

if TYPE_CHECKING:
    import napari

SOURCES = ("Image layers", "Folder or file", "Phantom (built in)")


def _pretrain_job(
    layer_snapshots: list[tuple[str, Any, dict]],
    paths: list[str],
    run_dir: str,
    cfg: Any,
    resume: bool,
    force: bool,
    probe: Any = None,
    *,
    progress: Any,
    cancel: Any,
) -> Any:
    """Runs in the job's thread: write the chosen layers (copies taken at Start) to NIfTI
    in the run folder (so ``--resume`` finds them), then ``api.pretrain``."""
    from maesil_core import api
    from maesil_core.data.io import save_volume
    from maesil_core.errors import Cancelled

    from .._writer import volume_for_saving

    files = list(paths)
    if layer_snapshots:
        progress({"phase": "prepare", "message": "writing the chosen layers to NIfTI"})
        folder = Path(run_dir) / "layers"
        while layer_snapshots:
            if cancel.is_set():
                raise Cancelled()
            name, data, meta = layer_snapshots.pop(0)  # drop each copy once written
            array, affine = volume_for_saving(data, meta)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "layer"
            files.append(str(save_volume(array, affine, folder / f"{safe}.nii", overwrite=True)))
            del data, array
    progress({"phase": "prepare", "message": "loading and caching the volumes"})
    return api.pretrain(
        files or None,
        run_dir,
        cfg,
        resume=resume,
        force=force,
        probe=probe,
        progress=progress,
        cancel=cancel,
    )


class PretrainWidget(JobWidget):
    """Pretrain a MAESIL model: data, preset + main settings, Advanced, device, output."""

    title = "Pretrain"
    option_fields: ClassVar[dict[str, str]] = {
        "run_dir": "out_dir",
        "out": "out_dir",
        "force": "overwrite",
        "crops_per_volume": "crops",
        "probe_images": "probe_image",
        "probe_test_images": "probe_test_image",
    }

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer, start_text="Start pretraining")
        from maesil_core.config import HU_WINDOWS, PRESETS

        v = napari_viewer
        self.source = ComboBox(choices=SOURCES, value=SOURCES[0], label="Data")
        self.layers = Select(
            choices=lambda _: [layer.name for layer in layers_of(v, "image")],
            label="CT layers",
        )
        self.folder = FileEdit(mode="d", label="Folder", value="")
        self.preset = ComboBox(choices=list(PRESETS), value="tiny", label="Preset")
        self.steps = SpinBox(min=1, max=10_000_000, label="Steps")
        self.batch_size = SpinBox(min=1, max=4096, label="Batch size")
        self.lr = FloatSpinBox(min=1e-7, max=1.0, step=1e-4, label="Learning rate")
        self.lr.native.setDecimals(6)
        self.mask_mode = ComboBox(choices=["dual", "random", "block"], label="Mask mode")
        self.mask_ratio = FloatSpinBox(min=0.05, max=0.95, step=0.05, label="Mask ratio")
        self.spacing = FloatSpinBox(min=0.1, max=20.0, step=0.25, label="Spacing (mm)")
        self.device = ComboBox(choices=device_choices, label="Device")
        self.out_dir = FileEdit(
            mode="d", label="Output folder", value=str(Path.home() / "maesil-runs" / "pretrain")
        )
        self.resume = CheckBox(value=False, text="Resume the run in the output folder")
        self.overwrite = CheckBox(value=False, text="Overwrite an earlier run there")
        self.show_advanced = CheckBox(value=False, text="Advanced settings")

        # advanced
        self.superpatch = SpinBox(min=8, max=512, step=8, label="Superpatch (vox)")
        self.patch = SpinBox(min=2, max=64, label="Patch (vox)")
        self.block = SpinBox(min=1, max=32, label="Mask block (patches)")
        self.embed_dim = SpinBox(min=8, max=4096, label="Encoder width")
        self.depth = SpinBox(min=1, max=64, label="Encoder depth")
        self.num_heads = SpinBox(min=1, max=64, label="Encoder heads")
        self.decoder_embed_dim = SpinBox(min=8, max=4096, label="Decoder width")
        self.decoder_depth = SpinBox(min=1, max=64, label="Decoder depth")
        self.decoder_num_heads = SpinBox(min=1, max=64, label="Decoder heads")
        self.warmup = SpinBox(min=0, max=1_000_000, label="Warm-up steps")
        self.crops = SpinBox(min=1, max=256, label="Crops per volume")
        self.hu_window = ComboBox(choices=list(HU_WINDOWS), label="HU window")
        self.intensity = ComboBox(choices=["auto", "hu", "percentile"], label="Intensity")
        self.augment = CheckBox(value=True, text="Augment crops (flips, turns, contrast)")
        self.seed = SpinBox(min=0, max=2**31 - 1, label="Seed")
        self.checkpoint_every = SpinBox(min=1, max=10_000_000, label="Checkpoint every")
        self.log_every = SpinBox(min=1, max=100_000, label="Report every")
        self.precision = ComboBox(choices=["auto", "bf16", "fp32"], label="Precision")
        self.num_workers = SpinBox(min=0, max=64, value=0, label="Loader workers")
        self.advanced = Container(
            widgets=[
                self.superpatch, self.patch, self.block, self.embed_dim, self.depth,
                self.num_heads, self.decoder_embed_dim, self.decoder_depth,
                self.decoder_num_heads, self.warmup, self.crops, self.hu_window,
                self.intensity, self.augment, self.seed, self.checkpoint_every, self.log_every,
                self.precision, self.num_workers,
            ],
            labels=True,
        )  # fmt: skip
        self.advanced.visible = False

        # the linear probe while training (maesil_core.probe_monitor)
        self.probe_on = CheckBox(value=False, text="Probe the encoder while training")
        self.probe_dicom = CheckBox(value=False, text="Probe CTs are DICOM folders")
        self.probe_image = FileEdit(mode="r", label="Probe CT", value="")
        self.probe_labels = FileEdit(mode="r", label="Probe labels", value="")
        self.probe_classes = LineEdit(value="liver spleen", label="Probe classes")
        self.probe_every = SpinBox(min=1, max=10_000_000, value=100, label="Probe every")
        self.probe_test_image = FileEdit(mode="r", label="Probe test CT", value="")
        self.probe_test_labels = FileEdit(mode="r", label="Probe test labels", value="")
        self.probe_resample_labels = CheckBox(
            value=False, text="Align the probe labels in world coordinates"
        )
        self.probe_box = Container(
            widgets=[
                self.probe_dicom, self.probe_image, self.probe_labels, self.probe_classes, self.probe_every,
                self.probe_test_image, self.probe_test_labels, self.probe_resample_labels,
            ],
            labels=True,
        )  # fmt: skip
        self.probe_box.tooltip = (
            "A linear probe of the frozen encoder, scored every N steps: Dice per class on the "
            "test CT (empty: the other half of the probe CT), beside the same probe on a "
            "randomly initialised encoder and on raw patch statistics."
        )
        self.probe_box.visible = False
        self.metrics = wrapped_label("")
        self.extend(
            [
                self.source, self.layers, self.folder, self.preset, self.steps,
                self.batch_size, self.lr, self.mask_mode, self.mask_ratio, self.spacing,
                self.device, self.out_dir, self.resume, self.overwrite, self.show_advanced,
                self.advanced, self.probe_on, self.probe_box, self.start_button, self.cancel_button, self.progress_bar,
                self.status, self.metrics,
            ]
        )  # fmt: skip
        self._lock_while_running += [self.preset, self.resume, self.source]
        self.plot = CurvePlot(v, "step", "loss")
        self.add_plot(self.plot)
        self.probe_plot = CurvePlot(v, "step", "probe Dice", height=220)
        self.probe_plot.ylim = (0.0, 1.0)
        self.probe_plot.legend_columns = 3  # a class with its two references on one row
        self.add_plot(self.probe_plot)
        self.probe_plot.widget.setVisible(False)
        #: {curve name: [(step, dice), ...]} of the probe plot
        self.probe_history: dict[str, list[tuple[float, float]]] = {}

        self.preset.changed.connect(self._apply_preset)
        self.source.changed.connect(self._update_source)
        self.show_advanced.changed.connect(self._show_advanced)
        self.probe_on.changed.connect(self._show_probe)
        self.probe_dicom.changed.connect(self._probe_ct_mode)
        self.start_button.changed.connect(self.start)
        self._apply_preset(self.preset.value)
        self._update_source(self.source.value)
        self.history: list[tuple[int, float]] = []

    # ------------------------------------------------------------------ settings
    def _apply_preset(self, name: str) -> None:
        from maesil_core.config import preset

        cfg = preset(name)
        d, m, t = cfg.data, cfg.model, cfg.train
        self.steps.value, self.batch_size.value, self.lr.value = t.steps, t.batch_size, t.lr
        self.mask_mode.value, self.mask_ratio.value = m.mask_mode, m.mask_ratio
        self.spacing.value = float(d.spacing[0]) if d.spacing else 1.5
        self.superpatch.value, self.patch.value, self.block.value = (
            m.superpatch[0], m.patch[0], m.block[0],
        )  # fmt: skip
        self.embed_dim.value, self.depth.value, self.num_heads.value = (
            m.embed_dim, m.depth, m.num_heads,
        )  # fmt: skip
        self.decoder_embed_dim.value = m.decoder_embed_dim
        self.decoder_depth.value = m.decoder_depth
        self.decoder_num_heads.value = m.decoder_num_heads
        self.warmup.value, self.crops.value = t.warmup_steps, d.crops_per_volume
        if isinstance(d.hu_window, str):
            self.hu_window.value = d.hu_window
        self.intensity.value, self.seed.value = d.intensity, t.seed
        self.augment.value = d.augment
        self.checkpoint_every.value, self.log_every.value = t.checkpoint_every, t.log_every
        self.precision.value = t.precision

    def _show_advanced(self, on: bool) -> None:
        self.advanced.visible = bool(on)

    def _show_probe(self, on: bool) -> None:
        self.probe_box.visible = bool(on)
        self.probe_plot.widget.setVisible(bool(on) or bool(self.probe_history))

    def _probe_ct_mode(self, folders: bool) -> None:
        """The probe CT fields browse for DICOM folders or for files (.nii, .nii.gz, .nrrd)."""
        for edit in (self.probe_image, self.probe_test_image):
            edit.mode = "d" if folders else "r"

    def probe_config(self) -> Any:
        """The ProbeConfig the probe fields describe (validated), None when it is off."""
        from maesil_core.config import ProbeConfig

        if not self.probe_on.value:
            return None

        def path(edit: FileEdit) -> tuple[str, ...]:
            text = str(edit.value or "").strip()
            return () if text in ("", ".") else (text,)

        return ProbeConfig(
            images=path(self.probe_image),
            labels=path(self.probe_labels),
            classes=tuple(self.probe_classes.value.replace(",", " ").split()),
            test_images=path(self.probe_test_image),
            test_labels=path(self.probe_test_labels),
            every=int(self.probe_every.value),
            resample_labels=bool(self.probe_resample_labels.value),
        ).validate()

    def _update_source(self, source: str) -> None:
        self.layers.visible = source == SOURCES[0]
        self.folder.visible = source == SOURCES[1]

    def config(self) -> Any:
        """The RunConfig the widget describes (validated; ConfigError if impossible)."""
        from maesil_core.config import preset

        cfg = preset(self.preset.value)
        s = float(self.spacing.value)
        cfg = cfg.override(
            "data",
            spacing=(s, s, s),
            hu_window=self.hu_window.value,
            intensity=self.intensity.value,
            crops_per_volume=int(self.crops.value),
            num_workers=int(self.num_workers.value),
            augment=bool(self.augment.value),
        )
        cfg = cfg.override(
            "model",
            superpatch=int(self.superpatch.value),
            patch=int(self.patch.value),
            block=int(self.block.value),
            embed_dim=int(self.embed_dim.value),
            depth=int(self.depth.value),
            num_heads=int(self.num_heads.value),
            decoder_embed_dim=int(self.decoder_embed_dim.value),
            decoder_depth=int(self.decoder_depth.value),
            decoder_num_heads=int(self.decoder_num_heads.value),
            mask_mode=self.mask_mode.value,
            mask_ratio=float(self.mask_ratio.value),
        )
        cfg = cfg.override(
            "train",
            steps=int(self.steps.value),
            batch_size=int(self.batch_size.value),
            lr=float(self.lr.value),
            warmup_steps=int(self.warmup.value),
            seed=int(self.seed.value),
            checkpoint_every=int(self.checkpoint_every.value),
            log_every=int(self.log_every.value),
            precision=self.precision.value,
            device=self.device.value,
        )
        return cfg.validate()

    # ------------------------------------------------------------------ run
    def start(self, *_: Any) -> None:
        from maesil_core.errors import MaesilError

        try:
            cfg = self.config()
            probe = self.probe_config()
            snapshots, paths = self._inputs()
            run_dir = str(self.out_dir.value or "").strip()
            if not run_dir or run_dir == ".":
                raise MaesilError("choose an output folder for the run.")
        except MaesilError as exc:
            self.notify_error(exc)
            return
        self.history = []
        self.plot.clear()
        self.probe_history = {}
        self.probe_plot.clear()
        self.progress_bar.value = 0
        self.status.value = "starting..."
        self.metrics.value = ""
        self.launch(
            _pretrain_job,
            snapshots,
            paths,
            run_dir,
            cfg,
            bool(self.resume.value),
            bool(self.overwrite.value),
            probe,
            on_progress=self._on_progress,
            on_done=self._on_done,
        )

    def _inputs(self) -> tuple[list[tuple[str, Any, dict]], list[str]]:
        from maesil_core.errors import MaesilError

        if self.source.value == SOURCES[2]:
            return [], []
        if self.source.value == SOURCES[1]:
            folder = str(self.folder.value or "").strip()
            if not folder or folder == "." or not Path(folder).exists():
                raise MaesilError("choose a folder (or file) of CT scans for pretraining.")
            return [], [folder]
        chosen = list(self.layers.value or [])
        if not chosen:
            raise MaesilError(
                "select one or more CT Image layers to pretrain on (or choose a folder)."
            )
        snaps = []
        for name in chosen:
            layer = self.viewer.layers[name]
            problem = label_map_problem(layer)
            if problem:
                raise MaesilError(problem)
            meta = {
                "scale": tuple(layer.scale),
                "translate": tuple(layer.translate),
                "rotate": layer.rotate,
                "metadata": dict(layer.metadata),
            }
            # a copy: the job must not see later edits of the layer (or a freed array)
            snaps.append((name, layer.data.copy(), meta))
        return snaps, []

    def _on_progress(self, info: dict) -> None:
        phase = info.get("phase")
        if phase == "prepare":
            self.status.value = info.get("message", "")
            return
        step, steps = int(info.get("step", 0)), int(info.get("steps", 1))
        self.progress_bar.max = max(1, steps)
        self.progress_bar.value = min(step, steps)
        loss = info.get("loss")
        vps = info.get("volumes_per_s")
        text = f"step {step}/{steps}"
        if loss is not None:
            text += f" · loss {loss:.4f}"
        if vps is not None:
            text += f" · {vps:.1f} vol/s"
        if phase == "train":
            text += f" · ETA {fmt_seconds(info.get('eta_s'))}"
            if loss is not None and (not self.history or self.history[-1][0] != step):
                self.history.append((step, float(loss)))
                self.plot.set("loss", self.history)
                self.plot.draw()
            self._plot_probe(step, info)
        elif phase == "checkpoint":
            text += " · checkpoint saved"
        self.status.value = text

    def _plot_probe(self, step: int, row: dict) -> None:
        """Add a row's probe scores to the probe plot: one curve per class, and its two
        references (random init dashed, patch statistics dotted) in the class's colour as
        flat lines from the first probe step on."""
        from maesil_core.probe_monitor import probe_columns

        scores = probe_columns(row)
        if not scores.get("encoder"):
            return
        self.probe_plot.widget.setVisible(True)
        for name, dice in scores["encoder"].items():
            curve = self.probe_history.setdefault(name, [])
            if not curve or curve[-1][0] != step:
                curve.append((step, dice))
        first = min(points[0][0] for points in self.probe_history.values() if points)
        for source, label in (("random_init", "random init"), ("patch_stats", "patch stats")):
            for name, dice in scores.get(source, {}).items():
                self.probe_history[f"{name} ({label})"] = [(first, dice), (step, dice)]
        classes = list(scores["encoder"])
        for name, points in self.probe_history.items():
            cls, _, ref = name.partition(" (")
            colour = f"C{classes.index(cls) % 10}" if cls in classes else None
            style = {"color": colour}
            if ref:
                style.update(ls="--" if ref.startswith("random") else ":", marker="")
            self.probe_plot.set(name, points, **style)
        self.probe_plot.draw()

    def _on_done(self, result: Any) -> None:
        self.plot.draw(force=True)
        self.probe_plot.draw(force=True)
        if result is None:
            return
        LAST["pretrain"] = str(result.run_dir)
        what = "cancelled at" if result.cancelled else "finished at"
        ckpt = Path(result.checkpoint) if result.checkpoint else None
        where = f"{ckpt.parent.parent.name}/{ckpt.parent.name}/{ckpt.name}" if ckpt else "-"
        self.metrics.value = f"{what} step {result.step}: {where}"
        self.metrics.tooltip = str(result.checkpoint)
        if not result.cancelled:
            self.status.value = f"done · step {result.step}"
            notify_info(f"Pretraining finished: checkpoint {result.checkpoint}")
