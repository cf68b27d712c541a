"""The napari plugin in a real viewer (run under Xvfb: ``xvfb-run -a python -m pytest``).

Real CT from ``../shared/data`` goes through the plugin's reader; widgets are driven as a
user would (set values, click, wait for the worker) with tiny configs so the file runs on
two CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

napari = pytest.importorskip("napari")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture(autouse=True)
def no_job_left_behind():
    """Stop any job a failing test left running, so it cannot disturb the next test."""
    yield
    from napari_maesil._worker import cancel_all

    assert cancel_all(wait_s=60), "a job thread did not stop within 60 s of Cancel"


@pytest.fixture
def errors(monkeypatch):
    """Every napari error/warning notification shown by the plugin, as text."""
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(str(msg)))
    return shown


def open_ct(viewer, path):
    layers = viewer.open(str(path), plugin="napari-maesil")
    assert len(layers) == 1
    return layers[0]


def wait_done(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def click(qtbot, button):
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)


def lps_world(affine_ras, ijk):
    """World coordinates (napari order z, y, x of LPS) of voxel ``ijk`` of a file."""
    ras = np.asarray(affine_ras) @ np.r_[np.asarray(ijk, float), 1.0]
    lps = np.array([-ras[0], -ras[1], ras[2]])
    return lps[::-1]


def fast_config(steps=12):
    """A very small MAESIL (16^3 superpatches of 4^3 patches) that trains in seconds."""
    from maesil_core.config import preset

    cfg = preset("tiny")
    cfg = cfg.override("data", crops_per_volume=8, num_workers=0)
    cfg = cfg.override(
        "model",
        superpatch=16,
        patch=4,
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=64,
        decoder_depth=1,
        decoder_num_heads=2,
        mask_mode="random",
        mask_ratio=0.5,
    )
    return cfg.override(
        "train", steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, log_every=2, device="cpu"
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shared_data):
    """A small MAESIL pretrained on the abdomen CT (chest_ct stays unseen)."""
    from maesil_core import api

    cfg = fast_config(steps=int(os.environ.get("MAESIL_TEST_PRETRAIN_STEPS", "40")))
    cfg = cfg.override("train", log_every=25, checkpoint_every=1000)
    run = tmp_path_factory.mktemp("plugin_pretrained") / "run"
    result = api.pretrain([shared_data / "abdomen_ct" / "ct.nii.gz"], run, cfg)
    assert result.checkpoint is not None
    return run


# ---------------------------------------------------------------------------- manifest


def test_manifest_validates():
    exe = Path(sys.executable).with_name("npe2")
    out = subprocess.run(
        [str(exe), "validate", "napari-maesil", "--imports"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


# ---------------------------------------------------------------------------- reader / writer


@pytest.mark.parametrize("case", ["abdomen_ct", "chest_ct"])
def test_reader_places_ct_and_labels_in_patient_space(viewer, shared_data, case):
    ct_path = shared_data / case / "ct.nii.gz"
    lab_path = shared_data / case / "labels.nii.gz"
    ct = open_ct(viewer, ct_path)
    labels = open_ct(viewer, lab_path)
    img = nib.load(str(ct_path))
    spacing = np.asarray(img.header.get_zooms()[:3], float)

    assert type(ct).__name__ == "Image" and type(labels).__name__ == "Labels"
    assert ct.name == case
    assert ct.data.shape == tuple(np.asarray(img.shape)[::-1])  # (z, y, x)
    np.testing.assert_allclose(ct.scale, spacing[::-1], rtol=1e-5)  # spacing, z first
    assert tuple(ct.contrast_limits) == (-175.0, 250.0)  # CT window in HU
    assert ct.data.min() < -500  # HU
    # the file's corner voxels land at their LPS world positions, whatever the orientation
    shape = np.asarray(img.shape)
    for corner in ([0, 0, 0], shape - 1, [shape[0] - 1, 0, shape[2] - 1]):
        world = lps_world(img.affine, corner)
        data_idx = np.asarray(ct.world_to_data(world))
        assert np.all(data_idx > -0.01) and np.all(data_idx < np.asarray(ct.data.shape) - 0.99)
        hu = ct.data[tuple(np.round(data_idx).astype(int))]
        assert hu == pytest.approx(float(np.asanyarray(img.dataobj)[tuple(corner)]))
    # labels sit on the CT: the world position of labelled voxels picks tissue in the CT
    lab_file = np.asanyarray(nib.load(str(lab_path)).dataobj)
    organ = 5 if case == "abdomen_ct" else 1  # liver / lung tumour
    idx = np.argwhere(labels.data == organ)
    world = np.asarray(labels.data_to_world(idx.mean(0)))
    assert np.asarray(ct.data[tuple(np.round(ct.world_to_data(world)).astype(int))]) > -200
    assert (lab_file == organ).sum() == len(idx)
    hu_inside = ct.data[labels.data == organ].mean()
    assert -100 < hu_inside < 250, hu_inside  # soft tissue, not air or bone
    if case == "abdomen_ct":
        # radiological display: the liver (patient's right) is left of the spleen on screen
        assert "liver" in list(labels.features["name"])
        liver_x = np.argwhere(labels.data == 5)[:, 2].mean()
        spleen_x = np.argwhere(labels.data == 1)[:, 2].mean()
        assert liver_x < spleen_x
        # anterior is at the top of the axial slice: the aorta (52) is behind the liver front
        assert labels.get_status(labels.data_to_world(np.argwhere(labels.data == 5)[0]))
    else:
        # LPS file kept its voxel order: data is the file transposed, no flips needed
        np.testing.assert_array_equal(labels.data, lab_file.transpose(2, 1, 0))


def test_reader_dicom_series_and_las_labels_align(viewer, shared_data):
    ct = open_ct(viewer, shared_data / "dicom_ct")
    labels = open_ct(viewer, shared_data / "dicom_ct_labels" / "labels.nii.gz")
    assert ct.data.shape == labels.data.shape == (20, 512, 512)
    np.testing.assert_allclose(ct.translate, labels.translate, atol=0.01)
    for organ in (5, 1):  # liver, spleen: soft tissue in the CT under the labels
        assert 0 < ct.data[labels.data == organ].mean() < 200


def test_reader_bad_file_notifies(viewer, tmp_path, errors):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(200))
    layers = viewer.open(str(bad), plugin="napari-maesil")
    assert layers == [] and len(viewer.layers) == 0
    assert errors and "broken" in errors[0] and "corrupt" in errors[0]


def test_writer_saves_on_the_source_grid(viewer, shared_data, tmp_path):
    from napari_maesil._writer import write_labels

    for case in ("abdomen_ct", "chest_ct"):
        src = nib.load(str(shared_data / case / "labels.nii.gz"))
        labels = open_ct(viewer, shared_data / case / "labels.nii.gz")
        labels.data[0, 0, 0] = 1  # an edit
        out = tmp_path / f"{case}_seg.nii.gz"
        written = viewer.layers.save(str(out), selected=False, plugin="napari-maesil")
        if not written:  # napari saves the selected layers; save this one explicitly
            written = write_labels(str(out), labels.data, labels._get_state())
        saved = nib.load(str(out))
        np.testing.assert_allclose(saved.affine, src.affine, atol=1e-4)
        expected = np.asanyarray(src.dataobj).copy()
        assert saved.shape == expected.shape
        diff = np.argwhere(np.asanyarray(saved.dataobj) != expected)
        assert len(diff) <= 1  # only the edited voxel
        names = out.parent / "label_names.json"
        if case == "abdomen_ct":
            assert json.loads(names.read_text())["5"] == "liver"
        viewer.layers.clear()


def test_sample_data_phantom_and_public_ct(viewer, shared_data, tmp_path, monkeypatch):
    from maesil_core.errors import MaesilError

    viewer.open_sample("napari-maesil", "phantom")
    assert [type(lay).__name__ for lay in viewer.layers] == ["Image", "Labels"]
    assert "liver" in list(viewer.layers[1].features["name"])
    viewer.layers.clear()

    from maesil_core.data import download

    # offline and nothing cached: a notification that says where to put the file
    monkeypatch.setenv("MAESIL_CACHEDIR", str(tmp_path / "empty"))
    for entry in download.PUBLIC_CT.values():
        monkeypatch.setitem(entry, "url", "http://127.0.0.1:9/unreachable.nii.gz")
    with pytest.raises(MaesilError, match="MAESIL_CACHEDIR") as info:
        viewer.open_sample("napari-maesil", "abdomen_ct")
    assert str(tmp_path / "empty") in str(info.value) and len(viewer.layers) == 0

    # the files in the cache (same bytes as upstream): opened without the network
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(shared_data / "abdomen_ct" / "ct.nii.gz", cache / "totalseg_example_ct_sm.nii.gz")
    shutil.copy(shared_data / "abdomen_ct" / "labels.nii.gz", cache / "totalseg_example_seg.nii.gz")
    monkeypatch.setenv("MAESIL_CACHEDIR", str(cache))
    viewer.open_sample("napari-maesil", "abdomen_ct")
    assert [lay.name for lay in viewer.layers] == ["abdomen_ct", "abdomen_labels"]
    assert viewer.layers[0].data.shape == (30, 101, 122)


# ---------------------------------------------------------------------------- pretrain


def _setup_pretrain(viewer, out_dir, layer_name, steps):
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Pretrain")
    cfg = fast_config(steps)
    w.preset.value = "tiny"
    w.layers.value = [layer_name]
    w.steps.value = steps
    w.batch_size.value = cfg.train.batch_size
    w.lr.value = cfg.train.lr
    w.mask_mode.value = "random"
    w.mask_ratio.value = 0.5
    w.show_advanced.value = True
    w.superpatch.value, w.patch.value = 16, 4
    w.embed_dim.value, w.depth.value, w.num_heads.value = 64, 2, 2
    w.decoder_embed_dim.value, w.decoder_depth.value, w.decoder_num_heads.value = 64, 1, 2
    w.warmup.value, w.crops.value, w.log_every.value = 5, 8, 2
    w.device.value = "cpu"
    w.out_dir.value = str(out_dir)
    return w


def test_pretrain_widget_trains_and_keeps_viewer_responsive(viewer, qtbot, shared_data, tmp_path):
    from qtpy.QtCore import QTimer

    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    w = _setup_pretrain(viewer, tmp_path / "run", ct.name, steps=16)
    assert w.device.choices[-1] == "cpu"  # only devices that exist
    assert w.augment.value  # the preset's default, turned off here: the run must record it
    w.augment.value = False
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start(50)
    click(qtbot, w.start_button)
    assert w.running and not w.start_button.enabled and w.cancel_button.enabled
    t0 = time.monotonic()
    wait_done(qtbot, w)
    duration = time.monotonic() - t0
    timer.stop()

    result = w.last_result.value
    assert w.last_result.error is None and not result.cancelled
    assert result.checkpoint.is_file() and result.step == 16
    from maesil_core.checkpoint import load_checkpoint

    assert load_checkpoint(result.checkpoint).config.data.augment is False
    losses = [loss for _, loss in w.history]
    assert len(losses) >= 6 and losses[-1] < losses[0]
    assert w.progress_bar.value == w.progress_bar.max == 16
    assert "loss" in w.status.value or "done" in w.status.value
    # the Qt event loop kept running: at least one tick per 0.5 s of training
    assert len(ticks) >= duration / 0.5, (len(ticks), duration)
    gaps = np.diff(ticks)
    assert gaps.max() < 2.0, gaps.max()
    assert w.start_button.enabled and not w.cancel_button.enabled


def test_pretrain_cancel_and_resume(viewer, qtbot, shared_data, tmp_path):
    from maesil_core.checkpoint import list_checkpoints
    from napari_maesil._worker import busy

    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    run = tmp_path / "run"
    w = _setup_pretrain(viewer, run, ct.name, steps=12)
    click(qtbot, w.start_button)
    qtbot.waitUntil(lambda: len(w.history) >= 1, timeout=60_000)
    t0 = time.monotonic()
    click(qtbot, w.cancel_button)
    wait_done(qtbot, w, timeout=5_000)
    assert w.released_at - t0 < 1.0  # buttons back, the viewer's job is over
    assert w.last_result.cancelled
    qtbot.waitUntil(lambda: not busy(), timeout=30_000)  # its last step and checkpoint
    stopped_at = int(list_checkpoints(run)[-1].stem.split("_")[1])
    assert 0 < stopped_at < 12

    # resume: continues from that checkpoint to the run's 12 steps
    w.resume.value = True
    click(qtbot, w.start_button)
    wait_done(qtbot, w)
    assert w.last_result.error is None, w.last_result.error
    assert w.last_result.value.step == 12
    assert w.history[0][0] > stopped_at


def test_pretrain_bad_settings_notify(viewer, tmp_path, errors):
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    w.out_dir.value = str(tmp_path / "run")
    w.start()
    assert errors and "Image layers" in errors[-1]  # nothing selected
    w.source.value = "Phantom (built in)"
    w.superpatch.value, w.patch.value = 24, 7  # patch does not divide the superpatch
    w.start()
    assert "does not divide" in errors[-1]
    assert not w.running


# ---------------------------------------------------------------------------- explorer


def _explorer(viewer, ckpt, layer):
    from napari_maesil._widgets.explorer import ExplorerWidget

    w = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(w, name="Superpatch explorer")
    w.checkpoint.value = str(ckpt)
    w.image.value = layer
    return w


def test_explorer_superpatch_layers_aligned_and_better_than_mean(
    make_napari_viewer, qtbot, shared_data, pretrained
):
    from maesil_core.checkpoint import list_checkpoints

    viewer = make_napari_viewer(show=True)  # a drawn canvas, for the screenshot
    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    w = _explorer(viewer, list_checkpoints(pretrained)[-1], ct)
    w.mode.value, w.ratio.value, w.seed.value = "random", 0.5, 0
    click(qtbot, w.load_button)
    wait_done(qtbot, w)
    grid = w.grid
    assert grid is not None and "superpatch grid" in viewer.layers
    # pick a superpatch inside the body from the cursor position (2D view)
    body = np.argwhere(ct.data > 0).mean(0)
    viewer.dims.current_step = (int(body[0]), 0, 0)
    viewer.cursor.position = tuple(ct.data_to_world(body))
    w.pick_from_cursor()
    wait_done(qtbot, w)
    expected = w.tile_at(ct.data_to_world(body))
    assert w.tile.value == expected

    names = ["masked input", "reconstruction", "|error|", "mask"]
    assert all(n in viewer.layers for n in names)
    for n in names:
        layer = viewer.layers[n]
        assert layer.data.shape == grid.tile  # one superpatch (16^3 on the model grid)
        np.testing.assert_allclose(layer.scale, viewer.layers["mask"].scale)
    assert type(viewer.layers["mask"]).__name__ == "Labels"
    # aligned with the CT in world coordinates: the superpatch around the picked point
    mask = viewer.layers["mask"]
    lo = np.asarray(mask.data_to_world((0, 0, 0)))
    hi = np.asarray(mask.data_to_world(np.asarray(mask.data.shape) - 1))
    point = np.asarray(ct.data_to_world(body))
    assert np.all(np.minimum(lo, hi) - 3 <= point) and np.all(point <= np.maximum(lo, hi) + 3)
    # the masked input shows the CT where visible: compare in world space with the CT
    masked = viewer.layers["masked input"]
    vis = np.argwhere(mask.data == 0)[::97]
    ct_vals = [
        ct.data[tuple(np.clip(np.round(ct.world_to_data(masked.data_to_world(v))), 0, None)
                      .astype(int))]
        for v in vis
    ]  # fmt: skip
    got = masked.data[tuple(vis.T)]
    inside = (np.asarray(ct_vals) > -150) & (np.asarray(ct_vals) < 230)
    assert np.corrcoef(np.asarray(ct_vals)[inside], got[inside])[0, 1] > 0.5
    # the reconstruction beats filling the hidden voxels with the CT's mean (a model this
    # briefly trained on two CPU cores does not yet beat the superpatch's visible mean,
    # which the widget also shows; see the README)
    out = w.last_output
    assert out["mask"].mean() == pytest.approx(0.5, abs=0.05)
    assert out["scores"]["mse"] < out["baseline"]["volume_mean_mse"], out
    np.testing.assert_allclose(out["recon"][~out["mask"]], out["target"][~out["mask"]])
    assert "PSNR" in w.scores.value and "SSIM" in w.scores.value

    # 3D view: pick by a ray through the grid
    viewer.dims.ndisplay = 3
    centre = grid.affine_at(grid.corner(3)) @ np.r_[np.asarray(grid.tile) / 2, 1]
    world = tuple(np.array([-centre[0], -centre[1], centre[2]])[::-1])
    tile3d = w.tile_at(world, view_direction=(1.0, 0.0, 0.0), dims_displayed=[0, 1, 2])
    assert tile3d is not None
    viewer.dims.ndisplay = 2

    # screenshot of the viewer with the explorer's layers (test artefact, not blank)
    ARTIFACTS.mkdir(exist_ok=True)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    from skimage.io import imsave

    imsave(ARTIFACTS / "explorer_viewer.png", shot, check_contrast=False)
    rgb = shot[..., :3]
    assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20


def test_explorer_whole_volume_and_bad_checkpoint(
    viewer, qtbot, shared_data, pretrained, tmp_path, errors
):
    from maesil_core.checkpoint import list_checkpoints

    ct = open_ct(viewer, shared_data / "chest_ct" / "ct.nii.gz")  # LPS, unseen in training
    bad = tmp_path / "not_a_model.safetensors"
    bad.write_bytes(b"garbage")
    w = _explorer(viewer, bad, ct)
    click(qtbot, w.start_button)
    wait_done(qtbot, w)
    assert errors and "not_a_model" in errors[-1]
    assert "reconstruction" not in viewer.layers and len(viewer.layers) == 1

    w.checkpoint.value = str(list_checkpoints(pretrained)[-1])
    click(qtbot, w.whole_button)
    wait_done(qtbot, w)
    grid = w.grid
    for n in ("masked input", "reconstruction", "|error|", "mask"):
        assert viewer.layers[n].data.shape == grid.unit.shape[::-1]
    # the whole reconstruction covers the CT's extent in world coordinates
    rec = viewer.layers["reconstruction"]
    ct_lo, ct_hi = ct.extent.world
    rec_lo, rec_hi = rec.extent.world
    assert np.all(np.abs(np.asarray(ct_lo) - rec_lo) < 5)
    assert np.all(np.abs(np.asarray(ct_hi) - rec_hi) < 5)
    assert w.last_output["mask"].mean() == pytest.approx(0.75, abs=0.1)


# ---------------------------------------------------------------------------- fine-tune, segment


def test_finetune_then_segment_and_save(viewer, qtbot, shared_data, pretrained, tmp_path, errors):
    from maesil_core.checkpoint import list_checkpoints
    from napari_maesil._widgets.finetune import FinetuneWidget
    from napari_maesil._widgets.segment import SegmentWidget

    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    labels = open_ct(viewer, shared_data / "abdomen_ct" / "labels.nii.gz")
    ft = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(ft, name="Fine-tune")
    ft.image.value, ft.labels.value = ct, labels
    ft.pretrained.value = str(list_checkpoints(pretrained)[-1])
    ft.classes.value = "liver, spleen"
    ft.steps.value, ft.batch_size.value, ft.eval_every.value = 6, 2, 3
    ft.device.value = "cpu"
    ft.out_dir.value = str(tmp_path / "seg")
    click(qtbot, ft.start_button)
    wait_done(qtbot, ft)
    assert ft.last_result.error is None, ft.last_result.error
    result = ft.last_result.value
    assert result.step == 6 and result.checkpoint.is_file()
    assert ft.dice_history and {"liver", "spleen"} <= set(ft.dice_history[-1])
    assert "liver" in ft.dice.value

    sw = SegmentWidget(viewer)
    viewer.window.add_dock_widget(sw, name="Segment")
    sw.image.value = ct
    # a pretraining checkpoint is not a segmenter: a notification, no layer, no crash
    sw.checkpoint.value = str(list_checkpoints(pretrained)[-1])
    click(qtbot, sw.start_button)
    wait_done(qtbot, sw)
    assert errors and "not a segmentation model" in errors[-1]
    n_layers = len(viewer.layers)

    sw.checkpoint.value = str(result.run_dir)
    click(qtbot, sw.start_button)
    wait_done(qtbot, sw)
    seg = sw.result_layer
    assert len(viewer.layers) == n_layers + 1 and type(seg).__name__ == "Labels"
    assert seg.data.shape == ct.data.shape
    np.testing.assert_allclose(seg.scale, ct.scale)
    np.testing.assert_allclose(seg.translate, ct.translate)
    assert list(seg.features["name"][:3]) == ["background", "liver", "spleen"]
    assert set(np.unique(seg.data)) <= {0, 1, 2}
    assert sw.progress_bar.value == sw.progress_bar.max > 0

    # "largest piece": each organ becomes one connected component, voxels only removed
    from scipy import ndimage

    raw = seg.data.copy()
    assert sw.largest.value is False  # the model's own setting (fine-tuned without it)
    sw.largest.value = True
    click(qtbot, sw.start_button)
    wait_done(qtbot, sw)
    seg = sw.result_layer
    kept = seg.data
    assert np.all((kept == raw) | (kept == 0)) and (kept > 0).sum() > 0
    touching = np.ones((3, 3, 3))  # MONAI's default: voxels touching by a face, edge or corner
    for organ in np.unique(kept[kept > 0]):
        assert ndimage.label(kept == organ, touching)[1] == 1

    sw.save_path.value = str(tmp_path / "ct_seg.nii.gz")
    click(qtbot, sw.save_button)
    saved = nib.load(str(tmp_path / "ct_seg.nii.gz"))
    src = nib.load(str(shared_data / "abdomen_ct" / "ct.nii.gz"))
    assert saved.shape == src.shape
    np.testing.assert_allclose(saved.affine, src.affine, atol=1e-4)
    # the RAS file's own voxel order: the layer's (S, P, L) axes back to (R, A, S)
    expected = seg.data.transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), expected)
    names = json.loads((tmp_path / "label_names.json").read_text())
    assert names == {"1": "liver", "2": "spleen"}
