"""Regenerate the README screenshots (docs/images/*.png). Not part of the test suite (the
file name keeps pytest from collecting it); run it by hand:

    xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest tests/readme_screenshots.py

PNGs are palette-quantised to stay small (< 300 KB each). The explorer is shown on the
Pretrain widget's 30-step run, or on the run ``MAESIL_EXPLORER_CHECKPOINT`` names (the
README's screenshot: a tiny run, README says which), with the interpolation
reference beside the reconstruction.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from test_plugin import click, open_ct, wait_done

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


def save_small(array: np.ndarray, name: str, width: int = 1100) -> Path:
    from PIL import Image

    img = Image.fromarray(np.asarray(array)[..., :3].astype(np.uint8))
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img = img.quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / name
    img.save(path, optimize=True)
    assert path.stat().st_size < 300_000, (path, path.stat().st_size)
    return path


def grab(widget) -> np.ndarray:
    from qtpy.QtGui import QImage

    img = widget.native.grab().toImage().convertToFormat(QImage.Format.Format_RGBA8888)
    ptr = img.constBits()
    ptr.setsize(img.height() * img.width() * 4)
    return np.frombuffer(ptr, np.uint8).reshape(img.height(), img.width(), 4).copy()


def test_readme_screenshots(make_napari_viewer, qtbot, shared_data, tmp_path):
    from napari_maesil._widgets.explorer import ExplorerWidget
    from napari_maesil._widgets.finetune import FinetuneWidget
    from napari_maesil._widgets.pretrain import PretrainWidget
    from napari_maesil._widgets.segment import SegmentWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    labels = open_ct(viewer, shared_data / "abdomen_ct" / "labels.nii.gz")

    # Pretrain: a short run so the progress bar and the loss curve show something
    pw = PretrainWidget(viewer)
    pw_dock = viewer.window.add_dock_widget(pw, name="Pretrain")
    pw.layers.value = [ct.name]
    pw.steps.value, pw.batch_size.value, pw.lr.value = 30, 8, 3e-3
    pw.mask_mode.value, pw.mask_ratio.value = "random", 0.5
    pw.show_advanced.value = False
    pw.out_dir.value = str(tmp_path / "pre")
    pw.superpatch.value, pw.patch.value = 16, 4
    pw.embed_dim.value, pw.depth.value, pw.num_heads.value = 64, 2, 2
    pw.decoder_embed_dim.value, pw.decoder_depth.value, pw.decoder_num_heads.value = 64, 1, 2
    pw.log_every.value, pw.crops.value, pw.warmup.value = 2, 8, 5
    pw.device.value = "cpu"
    click(qtbot, pw.start_button)
    wait_done(qtbot, pw, timeout=600_000)

    run = tmp_path / "pre"
    save_small(grab(pw), "pretrain_widget.png", width=420)
    viewer.window.remove_dock_widget(pw_dock)
    # Explorer, in a viewer of its own: the DICOM series of another patient (no run here
    # trained on it)
    ev = make_napari_viewer(show=True)
    ev.window._qt_window.resize(1500, 950)
    held_out = open_ct(ev, shared_data / "dicom_ct")
    ew = ExplorerWidget(ev)
    ev.window.add_dock_widget(ew, name="Superpatch explorer")
    ew.checkpoint.value = os.environ.get("MAESIL_EXPLORER_CHECKPOINT") or str(run)
    ew.image.value = held_out
    ew.mode.value, ew.ratio.value = "random", 0.75
    click(qtbot, ew.load_button)
    wait_done(qtbot, ew)
    body = held_out.data_to_world(np.argwhere(held_out.data > 0).mean(0))
    ev.dims.set_point(0, float(body[0]))
    ew.tile.value = ew.tile_at(body)
    click(qtbot, ew.start_button)
    wait_done(qtbot, ew)
    # shown first: the CT as the model sees it | masked input | reconstruction | the
    # interpolation reference (grid mode)
    assert ev.canvas.grid.enabled  # the widget frames the superpatch in each viewbox
    assert ev.layers["interpolation (reference)"].visible
    qtbot.wait(300)
    save_small(ev.screenshot(canvas_only=False, flash=False), "explorer_viewer.png")
    save_small(grab(ew), "explorer_widget.png", width=420)
    ev.close()

    # Fine-tune + Segment; the viewer while fine-tuning: the Dice curve in napari's theme and
    # the job in napari's activity dock
    fw = FinetuneWidget(viewer)
    fw_dock = viewer.window.add_dock_widget(fw, name="Fine-tune")
    fw.image.value, fw.labels_layer.value = ct, labels
    fw.pretrained.value = str(run)
    fw.classes.value = "liver, spleen, kidney_left, kidney_right"
    fw.steps.value, fw.eval_every.value, fw.batch_size.value = 16, 4, 2
    fw.device.value = "cpu"
    fw.out_dir.value = str(tmp_path / "seg")
    click(qtbot, fw.start_button)
    qtbot.waitUntil(lambda: len(fw.dice_history) >= 2, timeout=900_000)
    viewer.window._qt_window._activity_dialog.show()  # as the status bar's activity button does
    qtbot.wait(500)
    save_small(viewer.screenshot(canvas_only=False, flash=False), "finetune_viewer.png")
    wait_done(qtbot, fw, timeout=900_000)
    viewer.window._qt_window._activity_dialog.hide()
    save_small(grab(fw), "finetune_widget.png", width=420)
    viewer.window.remove_dock_widget(fw_dock)

    sw = SegmentWidget(viewer)
    viewer.window.add_dock_widget(sw, name="Segment")
    sw.image.value = ct
    sw.checkpoint.value = str(tmp_path / "seg")
    click(qtbot, sw.start_button)
    wait_done(qtbot, sw, timeout=600_000)
    save_small(grab(sw), "segment_widget.png", width=420)
