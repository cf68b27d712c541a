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
import threading
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
    """Stop any job a failing test left running, so it cannot disturb the next test; give
    torch back the thread count the widgets changed (the other test files share it)."""
    import torch

    threads = torch.get_num_threads()
    yield
    from napari_maesil._worker import cancel_all, wait_for_preload

    assert cancel_all(wait_s=60), "a job thread did not stop within 60 s of Cancel"
    wait_for_preload()
    torch.set_num_threads(threads)


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

    cfg = preset("smoke")
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
    assert ct.data.dtype == np.int16  # the file's own integers: half of float32
    for layer in (ct, labels):  # patient millimetres, axes named after where they point
        assert [str(u) for u in layer.units] == ["millimeter"] * 3
        assert tuple(layer.axis_labels) == ("superior", "posterior", "left")
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


def test_reader_decodes_each_file_once_without_torch(shared_data):
    """The reader runs on napari's Qt thread: one decode per file, and neither torch nor
    MONAI imported (they took most of the 26 s the first open of a full-size CT froze)."""
    script = f"""
import sys
import maesil_core.data.io as io
from napari_maesil._reader import read_volume
calls = []
decode = io.read_raw
io.read_raw = lambda p: calls.append(p) or decode(p)
data = {str(shared_data)!r}
for p in ("/chest_ct/ct.nii.gz", "/chest_ct/labels.nii.gz", "/dicom_ct", "/head_ct/ct_not_hu.nii.gz"):
    read_volume(data + p)
print(len(calls), sorted(m for m in ("torch", "monai") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "4 []", out.stdout


def test_opening_a_widget_never_imports_torch_on_the_qt_thread():
    """A widget builds its device list on the Qt thread as it opens: importing torch there
    waited up to 2 s for the background preload's import lock (the 2.5 s stall of opening a
    widget). Before the preload is done the list is auto and the CPU, torch untouched; after
    it, the GPUs torch finds (none here) between them."""
    script = """
import json, sys
from napari_maesil import _worker
from napari_maesil._widgets._base import device_choices
choices = [v for _, v in device_choices()]
print(json.dumps(["torch" in sys.modules, choices]))
_worker.preload()
_worker.wait_for_preload()
choices = [v for _, v in device_choices()]
print(json.dumps(["torch" in sys.modules, choices]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = (json.loads(line) for line in out.stdout.split("\n")[:2])
    assert before == [False, ["auto", "cpu"]], out.stdout
    loaded, choices = after
    assert loaded and choices[0] == "auto" and choices[-1] == "cpu", out.stdout
    assert all(c.startswith("cuda:") for c in choices[1:-1]), out.stdout  # the GPUs, if any


def test_large_ct_opens_at_once_and_fills_in(viewer, qtbot, shared_data, monkeypatch, errors):
    """Above LAZY_BYTES a NIfTI CT is decoded in the background: the layer is there at once
    (placed from the header), the widgets wait for it, then it holds the same voxels."""
    from napari_maesil import _lazy
    from napari_maesil._reader import read_volume
    from napari_maesil._widgets.layers_io import label_map_problem
    from napari_maesil._widgets.segment import SegmentWidget

    monkeypatch.setattr(_lazy, "LAZY_BYTES", 1)  # the 32 MB chest CT counts as large
    gate = threading.Event()  # the decoding waits for the test: no race with the swap
    decode = _lazy._decode
    monkeypatch.setattr(_lazy, "_decode", lambda *a, **k: gate.wait(120) and decode(*a, **k))
    path = shared_data / "chest_ct" / "ct.nii.gz"
    ct = open_ct(viewer, path)
    assert _lazy.is_loading(ct) and ct.data.shape == (61, 512, 512)
    w = SegmentWidget(viewer)
    w.image.value, w.checkpoint.value = ct, str(path)
    w.start()
    assert "still being read" in errors[-1] and not w.running
    gate.set()
    qtbot.waitUntil(lambda: not _lazy.is_loading(ct), timeout=120_000)
    assert label_map_problem(ct) is None
    data, kwargs, kind = read_volume(path, lazy=False)
    assert kind == "image" and ct.data.dtype == data.dtype == np.int16
    np.testing.assert_array_equal(ct.data, data)
    np.testing.assert_allclose(ct.scale, kwargs["scale"])
    np.testing.assert_allclose(ct.translate, kwargs["translate"])
    assert tuple(ct.contrast_limits) == (-175.0, 250.0) and ct.metadata["maesil"]["is_hu"]
    assert ct.contrast_limits_range[0] < -1000 < 1000 < ct.contrast_limits_range[1]


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
        names = out.with_name(f"{case}_seg.json")  # <stem>.json beside the label map
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
    names = list(viewer.layers[1].features["name"])  # the organ names arrive with the labels
    assert names[5] == "liver" and names[1] == "spleen"


# ---------------------------------------------------------------------------- pretrain


def _setup_pretrain(viewer, out_dir, layer_name, steps):
    """A docked Pretrain widget with a very small model, on ``layer_name`` (None: the
    built-in phantom)."""
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Pretrain")
    cfg = fast_config(steps)
    w.preset.value = "smoke"
    if layer_name is None:
        w.source.value = "Phantom (built in)"
    else:
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


def test_pretrain_widget_starts_on_the_preset_that_learns(viewer):
    """The Pretrain widget opens on `tiny`, the setting measured to learn (RESULTS.md), and
    the config its untouched fields describe is that preset's: 1.5 mm, random masking, its
    decoder options, batch 32, 1,000 steps. Choosing `smoke` shows the 3 mm test preset."""
    from maesil_core.config import preset
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    assert w.preset.value == "tiny"
    got, want = w.config(), preset("tiny")
    assert got.model == want.model and got.data.spacing == want.data.spacing == (1.5,) * 3
    assert (got.train.batch_size, got.train.steps, got.train.lr) == (32, 1000, want.train.lr)
    w.preset.value = "smoke"
    got = w.config()
    assert got.model == preset("smoke").model and got.data.spacing == (3.0,) * 3
    assert (got.train.batch_size, got.train.steps) == (4, 300)


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
    # the Qt event loop kept running while the job trained (a job on the Qt thread would
    # have let no tick through; how many depends on the machine's load, so not counted)
    assert len(ticks) >= 2, (len(ticks), duration)
    assert w.start_button.enabled and not w.cancel_button.enabled


def test_pretrain_cancel_and_resume(viewer, qtbot, shared_data, tmp_path):
    from maesil_core.checkpoint import list_checkpoints
    from napari_maesil._worker import busy

    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    run = tmp_path / "run"
    w = _setup_pretrain(viewer, run, ct.name, steps=12)
    click(qtbot, w.start_button)
    qtbot.waitUntil(lambda: len(w.history) >= 1, timeout=60_000)
    click(qtbot, w.cancel_button)
    wait_done(qtbot, w)
    # the buttons come back once the job's thread has ended (last step + checkpoint)
    assert w.last_result.cancelled and not busy() and w.start_button.enabled
    stopped_at = int(list_checkpoints(run)[-1].stem.split("_")[1])
    assert 0 < stopped_at < 12

    # resume: continues from that checkpoint to the run's 12 steps
    w.resume.value = True
    click(qtbot, w.start_button)
    wait_done(qtbot, w)
    assert w.last_result.error is None, w.last_result.error
    assert w.last_result.value.step == 12
    assert w.history[0][0] > stopped_at


def test_pretrain_widget_plots_the_probe(viewer, qtbot, shared_data, tmp_path, errors):
    """The probe while training, from the widget: without a probe CT it names the field,
    with labels of another grid the alignment check box; with abdomen_ct and its labels, every 3 of 6 steps, the probe plot gets the liver
    curve at steps 3 and 6 (the metrics.csv values) and the two references beside it."""
    import csv

    ab = shared_data / "abdomen_ct"
    ct = open_ct(viewer, ab / "ct.nii.gz")
    w = _setup_pretrain(viewer, tmp_path / "run", ct.name, steps=6)
    w.probe_on.value = True
    w.probe_classes.value = "liver"
    w.probe_every.value = 3
    w.start()
    assert not w.running and "\u201cProbe CT\u201d" in errors[-1], errors
    w.probe_image.value = str(ab / "ct.nii.gz")
    w.probe_labels.value = str(shared_data / "chest_ct" / "labels.nii.gz")  # another grid
    w.start()
    wait_done(qtbot, w)
    assert "do not match" in errors[-1] and "\u201cAlign the probe labels" in errors[-1], errors
    w.probe_labels.value = str(ab / "labels.nii.gz")
    click(qtbot, w.start_button)
    wait_done(qtbot, w)
    assert w.last_result.error is None, w.last_result.error
    with (tmp_path / "run" / "metrics.csv").open() as f:
        written = [(int(r["step"]), float(r["probe_liver"])) for r in csv.DictReader(f)
                   if r.get("probe_liver")]  # fmt: skip
    assert [s for s, _ in written] == [3, 6]
    assert [(s, round(d, 5)) for s, d in w.probe_history["liver"]] == [
        (s, round(d, 5)) for s, d in written
    ]
    assert all(0.0 <= d <= 1.0 for _, d in written)
    assert {"liver (random init)", "liver (patch stats)"} <= set(w.probe_history)
    lines = {line.get_label(): line for line in w.probe_plot.axes.get_lines()}
    assert {"liver", "liver (random init)", "liver (patch stats)"} <= set(lines)
    ref = lines["liver (random init)"]  # the class's colour, dashed
    assert ref.get_color() == lines["liver"].get_color() and ref.get_linestyle() == "--"
    assert not w.probe_plot.widget.isHidden()  # shown once the probe is on


def test_pretrain_widget_probes_on_a_dicom_folder(viewer, shared_data):
    """The check box "Probe CTs are DICOM folders" makes both probe CT fields browse for
    folders (and back for files; the label fields stay files); the dicom_ct series folder then
    goes into the ProbeConfig as the test CT (reading it is maesil probe's, tested there)."""
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    edits = (w.probe_image, w.probe_test_image)
    assert [e.mode.value for e in edits] == ["r", "r"]
    w.probe_dicom.value = True
    assert [e.mode.value for e in edits] == ["d", "d"]
    assert w.probe_labels.mode.value == "r"  # label maps stay files
    w.probe_on.value = True
    w.probe_image.value = str(shared_data / "abdomen_ct" / "ct.nii.gz")
    w.probe_labels.value = str(shared_data / "abdomen_ct" / "labels.nii.gz")
    w.probe_test_image.value = str(shared_data / "dicom_ct")
    w.probe_test_labels.value = str(shared_data / "dicom_ct_labels" / "labels.nii.gz")
    w.probe_resample_labels.value = True
    probe = w.probe_config()
    assert probe.test_images == (str(shared_data / "dicom_ct"),)
    assert probe.resample_labels
    w.probe_dicom.value = False
    assert [e.mode.value for e in edits] == ["r", "r"]


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


def test_core_errors_name_the_widget_fields(viewer, qtbot, pretrained, errors):
    """A core error names its setting; the widget writes it as its field's label, never as
    a command-line flag (issue 12): here the run folder that already holds a run."""
    from napari_maesil._widgets.pretrain import PretrainWidget

    w = PretrainWidget(viewer)
    w.source.value = "Phantom (built in)"
    w.out_dir.value = str(pretrained)
    w.device.value = "cpu"
    w.start()
    wait_done(qtbot, w)
    message = errors[-1]
    assert "already holds a run" in message, message
    assert "\u201cOutput folder\u201d" in message and "\u201cResume the run" in message, message
    assert "--" not in message, message


# ---------------------------------------------------------------------------- explorer


def _explorer(viewer, ckpt, layer):
    from napari_maesil._widgets.explorer import ExplorerWidget

    w = ExplorerWidget(viewer)
    viewer.window.add_dock_widget(w, name="Superpatch explorer")
    w.checkpoint.value = str(ckpt)
    w.image.value = layer
    return w


def test_explorer_scores_an_edge_superpatch_on_its_real_voxels(shared_data, pretrained):
    """abdomen_ct cut to 114 slices (7 superpatches of 16 and 2 slices): the far corner
    superpatch holds 2 x 5 x 14 real voxels, too thin for SSIM, and at a low ratio its
    hidden patches may all fall in the padding. Either way a score or a plain note, never an
    error (both were ValueErrors shown with a traceback)."""
    import threading

    from maesil_core.checkpoint import list_checkpoints
    from maesil_core.data import load_volume
    from maesil_core.segmentation.data import crop_volume
    from napari_maesil._widgets.explorer_jobs import load_job, superpatch_job

    quiet = {"progress": lambda info: None, "cancel": threading.Event()}
    volume = load_volume(shared_data / "abdomen_ct" / "ct.nii.gz")
    volume = crop_volume(volume, [(0, 114), (None, None), (None, None)])
    grid, _ = load_job(str(list_checkpoints(pretrained)[-1]), volume, **quiet)
    corner = tuple((n - 1) * t for n, t in zip(grid.counts, grid.tile))
    real = [min(t, s - c) for c, s, t in zip(corner, grid.unit.shape, grid.tile)]
    assert min(real) < 3, real  # the case: SSIM cannot score it
    texts = set()
    for ratio in (0.75, 0.05):
        for seed in range(4):
            out = superpatch_job(grid, corner, "random", ratio, seed, **quiet)
            assert out.scores_text.startswith("PSNR") or "nothing to score" in out.scores_text
            assert "SSIM" not in out.scores_text
            texts.add(out.scores_text.split(" ")[0])
    assert "PSNR" in texts


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

    names = ["masked input", "reconstruction", "interpolation (reference)", "|error|", "mask"]
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
    idx = np.round([ct.world_to_data(masked.data_to_world(v)) for v in vis]).astype(int)
    in_ct = np.all((idx >= 0) & (idx < np.asarray(ct.data.shape)), axis=1)  # not the padding
    ct_vals = ct.data[tuple(idx[in_ct].T)].astype(float)
    got = masked.data[tuple(vis[in_ct].T)]
    inside = (ct_vals > -150) & (ct_vals < 230)
    assert inside.sum() > 10
    assert np.corrcoef(ct_vals[inside], got[inside])[0, 1] > 0.5
    # the reconstruction beats filling the hidden voxels with the CT's mean (a model this
    # briefly trained on two CPU cores does not yet beat the superpatch's visible mean,
    # which the widget also shows; see the README)
    out = w.last_output
    assert out["mask"].mean() == pytest.approx(0.5, abs=0.05)
    assert out["scores"]["mse"] < out["baseline"]["volume_mean_mse"], out
    np.testing.assert_allclose(out["recon"][~out["mask"]], out["target"][~out["mask"]])
    assert "PSNR" in w.scores.value and "SSIM" in w.scores.value
    # the interpolation reference: the CT where visible; where hidden, exactly
    # metrics.fill_from_visible (sigma half a patch) on the superpatch's real voxels, and
    # its layer shows it in HU, on the superpatch's place
    from maesil_core.metrics import fill_from_visible

    hidden, target, ref = out["mask"], out["target"], out["reference"]
    corner = out["corner"]
    real = tuple(slice(0, min(t, n - c)) for c, n, t in zip(corner, grid.unit.shape, grid.tile))
    sigma = [p / 2 for p in grid.cfg.model.patch]
    expected = fill_from_visible(target[real], hidden[real], sigma)
    np.testing.assert_allclose(ref[real], expected, atol=1e-6)
    assert not np.allclose(ref[real][hidden[real]], target[real][hidden[real]], atol=1e-3)
    layer = viewer.layers["interpolation (reference)"]
    np.testing.assert_allclose(layer.scale, viewer.layers["mask"].scale)
    from napari_maesil._geometry import volume_to_layer

    in_hu, _, _ = volume_to_layer(grid.to_units(ref), grid.affine_at(corner))
    np.testing.assert_allclose(layer.data, in_hu, atol=1e-3)
    assert "interpolating the visible" in w.scores.value

    # shown first: original | masked input | reconstruction | interpolation reference side
    # by side (grid mode), the error map one checkbox away
    assert viewer.canvas.grid.enabled
    shown = [layer.name for layer in viewer.layers if layer.visible]
    assert shown == ["original", "masked input", "reconstruction", "interpolation (reference)"]
    w.show_reference.value = False  # one click hides it
    assert not viewer.layers["interpolation (reference)"].visible
    w.show_reference.value = True
    # each viewbox is fitted to the superpatch, not to the (hidden) CT it came from
    ext = np.asarray(viewer.layers["original"].extent.world)[:, -2:]
    framed = viewer.camera.zoom
    viewer.reset_view()  # fitted to every layer, the CT included
    assert framed > 3 * viewer.camera.zoom, (framed, viewer.camera.zoom, ext)
    w.show_error.value = True
    assert viewer.layers["|error|"].visible and viewer.canvas.grid.enabled
    w.side_by_side.value = False  # back to the results over the CT (and picking by click)
    assert not viewer.canvas.grid.enabled and ct.visible
    assert viewer.layers["superpatch grid"].visible and viewer.layers["reconstruction"].visible
    assert not viewer.layers["original"].visible
    assert not viewer.layers["interpolation (reference)"].visible  # it would cover it

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
    for n in ("masked input", "reconstruction", "interpolation (reference)", "|error|", "mask"):
        assert viewer.layers[n].data.shape == grid.unit.shape[::-1]
    # the whole volume's reference: each superpatch's hidden voxels from its visible ones
    from maesil_core.metrics import interpolation_fill

    out = w.last_output
    expected = interpolation_fill(grid.unit, out["mask"], grid.cfg.model.patch, grid.tile)
    np.testing.assert_allclose(out["reference"], expected, atol=1e-6)
    assert "interpolating the visible" in w.scores.value
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
    ft.image.value, ft.labels_layer.value = ct, labels
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
    wait_done(qtbot, sw)  # saved in the job's thread
    saved = nib.load(str(tmp_path / "ct_seg.nii.gz"))
    src = nib.load(str(shared_data / "abdomen_ct" / "ct.nii.gz"))
    assert saved.shape == src.shape
    np.testing.assert_allclose(saved.affine, src.affine, atol=1e-4)
    # the RAS file's own voxel order: the layer's (S, P, L) axes back to (R, A, S)
    expected = seg.data.transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), expected)
    names = json.loads((tmp_path / "ct_seg.json").read_text())
    assert names == {"1": "liver", "2": "spleen"}
    reopened = open_ct(viewer, tmp_path / "ct_seg.nii.gz")  # names come back with the map
    assert list(reopened.features["name"][:3]) == ["background", "liver", "spleen"]
    # "only inside the body", the model's own setting: no label in the air around the patient
    from maesil_core.data import load_volume
    from maesil_core.data.body import body_mask

    assert sw.body.value is True
    vol = load_volume(shared_data / "abdomen_ct" / "ct.nii.gz")
    assert not expected[~body_mask(vol.array, vol.affine)].any()

    # DICOM-SEG (issue 16) refers to the series the CT was read from: refused for a NIfTI CT
    sw.save_path.value = str(tmp_path / "ct_seg.dcm")
    click(qtbot, sw.save_button)
    wait_done(qtbot, sw)
    assert "DICOM series" in errors[-1] and ".nii.gz" in errors[-1], errors[-1]
    assert not (tmp_path / "ct_seg.dcm").exists()

    # a DICOM series segmented, edited in napari (a painted box of spleen), saved as DICOM-SEG:
    # pydicom reads back one named segment per class present, on exactly the layer's voxels
    from maesil_core.interop.dicom_seg import read_dicom_seg
    from napari_maesil._writer import volume_for_saving

    series = shared_data / "dicom_ct"
    sw.image.value = open_ct(viewer, series)
    sw.overlap.value = 0.0
    click(qtbot, sw.start_button)
    wait_done(qtbot, sw)
    seg = sw.result_layer
    seg.data[5:8, 200:240, 200:240] = 2
    dcm = tmp_path / "series_seg.dcm"
    sw.save_path.value = str(dcm)
    click(qtbot, sw.save_button)
    wait_done(qtbot, sw)
    assert sw.last_result.error is None, sw.last_result.error
    back, numbers = read_dicom_seg(dcm, series)
    data, meta, _ = seg.as_layer_data_tuple()
    ids, _ = volume_for_saving(data, meta)  # the series' own voxel order
    names = {"liver": 1, "spleen": 2}
    assert set(numbers.values()) == {n for n, i in names.items() if (ids == i).any()}
    assert "spleen" in numbers.values()
    for number, name in numbers.items():
        np.testing.assert_array_equal(back == number, ids == names[name])


# ---------------------------------------------------------------------------- jobs and widgets


WIDGETS = ["Pretrain", "Superpatch explorer", "Fine-tune", "Segment"]


def test_every_widget_on_an_empty_viewer_shows_its_field_labels(viewer):
    """Opened from the plugin menu before any layer exists (the Fine-tune widget used to lose
    every field label: its ``labels`` attribute hid magicgui's ``Container.labels``)."""
    from qtpy.QtWidgets import QLabel

    for name in WIDGETS:
        _, w = viewer.window.add_plugin_dock_widget("napari-maesil", name)
        assert w.labels is True, name  # magicgui's flag, not a widget
        shown = {lab.text() for lab in w.native.findChildren(QLabel) if lab.isVisibleTo(w.native)}
        fields = [
            c
            for c in w
            if getattr(c, "label", "")
            and c.native.isVisibleTo(w.native)
            and c.widget_type != "Label"
        ]
        assert fields, name
        for field in fields:
            assert field.label in shown, (name, field.label)
        if name == "Fine-tune":
            assert "Labels layer" in shown


def test_closing_a_widget_disconnects_it_and_stops_its_job(viewer, qtbot, tmp_path):
    from napari_maesil._widgets.explorer import ExplorerWidget

    def callbacks():
        return [cb for cb in viewer.layers.events.inserted.callbacks if cb]

    before = len(callbacks())
    ex = ExplorerWidget(viewer)
    dock = viewer.window.add_dock_widget(ex, name="Explorer")
    assert ex._on_click in viewer.mouse_drag_callbacks and len(callbacks()) > before
    viewer.window.remove_dock_widget(dock)  # what the dock's close button does
    assert ex.closed and ex._on_click not in viewer.mouse_drag_callbacks
    assert len(callbacks()) == before  # napari's and ours, both gone

    pw = _setup_pretrain(viewer, tmp_path / "run", None, steps=1_000_000)
    click(qtbot, pw.start_button)
    job = pw.job
    assert job is not None
    viewer.window.remove_dock_widget(pw.native)
    assert pw.closed and job.cancel_event.is_set() and job.join(120)


def test_jobs_in_different_widgets_run_side_by_side(
    viewer, qtbot, shared_data, pretrained, tmp_path, errors
):
    """While Pretrain trains, the explorer loads its model and draws the grid (it used to
    refuse: "The previous job is still stopping"); each says what else is running."""
    from napari.utils import progress

    from maesil_core.checkpoint import list_checkpoints

    ct = open_ct(viewer, shared_data / "abdomen_ct" / "ct.nii.gz")
    pw = _setup_pretrain(viewer, tmp_path / "run", None, steps=1_000_000)
    click(qtbot, pw.start_button)
    qtbot.waitUntil(lambda: len(pw.history) >= 1, timeout=120_000)  # training
    # the job reports in napari's activity dock too
    descs = [str(p.desc) for p in progress._all_instances]
    assert any(d.startswith("Pretrain:") for d in descs), descs

    ex = _explorer(viewer, list_checkpoints(pretrained)[-1], ct)
    click(qtbot, ex.load_button)
    assert ex.running and pw.running and ex.also_running == ["Pretrain"]
    wait_done(qtbot, ex)
    assert ex.grid is not None and "superpatch grid" in viewer.layers
    assert pw.running and not errors  # the pretraining went on; no refusal
    click(qtbot, pw.cancel_button)
    wait_done(qtbot, pw)
    assert pw.last_result.cancelled and pw.last_result.value.checkpoint.is_file()
    assert not [p for p in progress._all_instances if str(p.desc).startswith("Pretrain")]


def test_segmenting_a_label_map_says_so(viewer, shared_data, errors):
    from napari_maesil._widgets.segment import SegmentWidget

    labels = open_ct(viewer, shared_data / "abdomen_ct" / "labels.nii.gz")
    viewer.add_image(labels.data, name="labels as image", scale=labels.scale)
    w = SegmentWidget(viewer)
    w.image.value = viewer.layers["labels as image"]
    w.checkpoint.value = str(shared_data)  # never reached
    w.start()
    assert errors and "looks like a label map" in errors[-1] and not w.running


CLOSE_SCRIPT = """
import sys, time
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication
from napari_maesil._widgets.pretrain import PretrainWidget

viewer = napari.Viewer(show=True)
w = PretrainWidget(viewer)
viewer.window.add_dock_widget(w, name="Pretrain")
w.source.value = "Phantom (built in)"
w.steps.value, w.log_every.value, w.checkpoint_every.value = 1_000_000, 1, 2
w.superpatch.value, w.patch.value = 16, 4
w.embed_dim.value, w.depth.value, w.num_heads.value = 64, 2, 2
w.decoder_embed_dim.value, w.decoder_depth.value, w.decoder_num_heads.value = 64, 1, 2
w.device.value = "cpu"
w.out_dir.value = {run!r}

def close_when_training():
    if len(w.history) >= 3:  # training, past a checkpoint or two
        print("closing at step", w.history[-1][0], flush=True)
        viewer.window._qt_window.close()
    else:
        QTimer.singleShot(50, close_when_training)

w.start_button.native.click()
QTimer.singleShot(50, close_when_training)
QApplication.instance().exec()
print("event loop ended", flush=True)
"""


def test_closing_the_viewer_during_a_job_exits_cleanly(tmp_path):
    """The window closed while Pretrain trains: exit status 0 (it was 134, "terminate called
    without an active exception", when a job thread was still inside torch at exit), and the
    run folder holds only whole files: no temporary file, every checkpoint with its metadata,
    and the last one loads."""
    from maesil_core.checkpoint import list_checkpoints, load_checkpoint

    run = tmp_path / "run"
    script = CLOSE_SCRIPT.format(run=str(run))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    assert "closing at step" in out.stdout and "event loop ended" in out.stdout
    assert "terminate called" not in out.stderr
    left = [p for p in run.rglob("*") if p.name.startswith(".")]
    assert not left, left
    ckpts = list_checkpoints(run)
    assert ckpts and all(c.with_suffix(".json").is_file() for c in ckpts)
    assert load_checkpoint(ckpts[-1]).step >= 2
