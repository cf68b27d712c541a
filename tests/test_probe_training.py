"""The linear probe scored while pretraining (``maesil pretrain --probe-*``, ``api.pretrain(probe=...)``).

Real labelled CT: ``abdomen_ct`` (TotalSegmentator labels, liver 5 / spleen 1, names in
``label_names.json``) is both what the tiny MAESIL trains on and the probe's labelled CT; with
no test CT given, the probe trains on its feet half and is scored on its head half.
"""

from __future__ import annotations

import csv
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from maesil_core import api, cli
from maesil_core.config import ProbeConfig, preset
from maesil_core.errors import Cancelled, ConfigError
from maesil_core.probe_monitor import ProbeMonitor, held_out_data, probe_columns


def read_rows(run) -> tuple[list[str], list[dict[str, str]]]:
    with (run / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def pretrain_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out + out.err


def test_pretrain_writes_probe_columns_and_resume_keeps_them(tmp_path, shared_data, capsys):
    """The probe set in a --config file's "probe" section, its classes and --probe-every 3
    from flags (a flag wins over the file), over 6 steps: probe rows at steps 3 and 6 (log_every is 10, so a row
    is written for the probe), Dice in [0, 1] for the encoder and both references, the
    references the same in every row; a resume without the probe flags probes on with the
    recorded settings (same columns, same references), also given a --config file with another
    probe (a resume reads no section of the file); and the probe leaves the training
    itself alone: the weights equal those of the same run without it (whose loss.png has
    no probe panel)."""
    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    run = tmp_path / "probed"
    common = ["--data", ct, "--preset", "smoke", "--threads", 1]
    ab = shared_data / "abdomen_ct"
    config = tmp_path / "run.json"  # the probe from a --config file, completed by a flag
    config.write_text(json.dumps({"probe": {
        "images": [str(ab / "ct.nii.gz")], "labels": [str(ab / "labels.nii.gz")],
        "classes": ["kidney"], "every": 50}}))  # fmt: skip
    err = pretrain_cli(capsys, "pretrain", *common, "--out", run, "--steps", 6, "--config", config,
                       "--probe-classes", "liver", "spleen", "--probe-every", 3)  # fmt: skip
    assert "probe:" in err  # it says what it reads and scores before training

    columns = [f"probe_{s}{c}" for s in ("", "random_init_", "patch_stats_") for c in ("liver", "spleen")]  # fmt: skip
    header, rows = read_rows(run)
    assert set(columns) <= set(header)
    probed = [r for r in rows if r.get("probe_liver")]
    assert [int(r["step"]) for r in probed] == [3, 6]
    for r in probed:
        assert all(0.0 <= float(r[c]) <= 1.0 for c in columns), r
    refs = [{c: r[c] for c in columns if "_init_" in c or "_stats_" in c} for r in probed]
    assert refs[0] == refs[1]
    from PIL import Image

    assert Image.open(run / "loss.png").size == (1100, 350)  # the probe's panel beside the loss

    other = tmp_path / "other.json"  # --resume reads no section of a config file: not its probe
    other.write_text(json.dumps({"probe": {"images": [str(ab / "ct.nii.gz")],
                                           "labels": [str(ab / "labels.nii.gz")], "classes": ["stomach"]}}))  # fmt: skip
    pretrain_cli(capsys, "pretrain", "--out", run, "--resume", "--steps", 9, "--threads", 1,
                 "--config", other)  # fmt: skip
    header2, rows2 = read_rows(run)
    assert header2 == header
    probed2 = [r for r in rows2 if r.get("probe_liver")]
    assert [int(r["step"]) for r in probed2] == [3, 6, 9]
    assert probed2[:2] == probed  # the rows before the resume are kept as they were
    assert {c: probed2[2][c] for c in refs[0]} == refs[0]  # the same references again

    plain = tmp_path / "plain"
    pretrain_cli(capsys, "pretrain", *common, "--out", plain, "--steps", 6)
    with_probe = load_file(run / "checkpoints" / "step_000006.safetensors")
    without = load_file(plain / "checkpoints" / "step_000006.safetensors")
    assert with_probe.keys() == without.keys()
    assert all(torch.equal(with_probe[k], without[k]) for k in without)
    assert Image.open(plain / "loss.png").size == (600, 350)


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard logs as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_shows_the_csv_rows_and_a_resume_replaces_what_it_redoes(
    tmp_path, shared_data, capsys
):
    """TensorBoard holds every metrics.csv column (loss, lr, the probe and its references),
    at the CSV's steps and values. A run stopped after logging step 4 but before its step-4
    checkpoint (that checkpoint removed) resumes at step 2 and logs step 4 again: TensorBoard
    shows it once, as metrics.csv does."""
    pytest.importorskip("tensorboard")  # the `testing` extra has it; `make test-min` does not
    ab = shared_data / "abdomen_ct"
    run = tmp_path / "tb"
    probe = ["--probe-images", ab / "ct.nii.gz", "--probe-labels", ab / "labels.nii.gz",
             "--probe-classes", "liver", "--probe-every", 2]  # fmt: skip
    pretrain_cli(capsys, "pretrain", "--data", ab / "ct.nii.gz", "--preset", "smoke", "--out", run,
                 "--steps", 4, "--checkpoint-every", 2, "--threads", 1, *probe)  # fmt: skip

    def assert_same_as_csv():
        header, rows = read_rows(run)
        tb = tensorboard_scalars(run)
        assert set(tb) == set(header) - {"step"}
        for column, points in tb.items():
            want = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
            assert [s for s, _ in points] == [s for s, _ in want], column
            assert [v for _, v in points] == pytest.approx([v for _, v in want], rel=1e-4)
        return tb

    first = assert_same_as_csv()
    assert {"loss", "probe_liver", "probe_random_init_liver", "probe_patch_stats_liver"} <= set(
        first
    )
    assert [s for s, _ in first["probe_liver"]] == [2, 4]

    for f in (run / "checkpoints").glob("step_000004.*"):
        f.unlink()
    pretrain_cli(capsys, "pretrain", "--out", run, "--resume", "--threads", 1)
    again = assert_same_as_csv()  # step 4 once: the resumed run's
    assert [s for s, _ in again["probe_liver"]] == [2, 4]


def test_probe_monitor_holds_out_the_other_half_and_restores_train_mode(shared_data):
    """One labelled CT: the probe trains on its feet half and is scored on its head half,
    whole 8-slice patch cells of 3 mm each (slices 0-15 and 16-23 of 30: a cell half padding
    would blur its statistics), both with liver; the hook leaves the model in train mode. A
    Cancel stops the reading, and a probe cancelled during training is left out of its row."""
    ab = shared_data / "abdomen_ct"
    cfg = preset("smoke")
    pcfg = ProbeConfig(images=[ab / "ct.nii.gz"], labels=[ab / "labels.nii.gz"],
                       classes=["liver"], random_inits=1, max_voxels=5000)  # fmt: skip
    data = held_out_data(cfg, pcfg)
    (train,), (test,) = data.train, data.test
    assert train.image.shape[1:3] == test.image.shape[1:3]  # cut along head-feet only
    assert (train.image.shape[3], test.image.shape[3]) == (16, 8)  # of 30 slices at 3 mm
    assert train.name.endswith("[feet]") and test.name.endswith("[head]")
    assert (train.target == 1).any() and (test.target == 1).any()

    from maesil_core.models import build_model

    stop = threading.Event()
    monitor = ProbeMonitor(cfg, pcfg, cancel=stop.is_set)
    model = build_model(cfg.model).train()
    row = monitor(model)
    assert model.training
    assert set(probe_columns(row)) == {"encoder", "random_init", "patch_stats"}
    assert 0.0 <= row["probe_liver"] <= 1.0
    # Cancel: the reading stops (nothing to train on), a probe in training leaves its row
    stop.set()
    assert monitor(model) == {} and model.training
    with pytest.raises(Cancelled):
        ProbeMonitor(cfg, pcfg, cancel=stop.is_set)


def test_probe_settings_are_checked_before_anything_runs(tmp_path, shared_data):
    ab = shared_data / "abdomen_ct"
    bad = [
        (ProbeConfig(labels=[ab / "labels.nii.gz"]), "probe_images"),
        (ProbeConfig(images=[ab / "ct.nii.gz"]), "probe_labels"),
        (ProbeConfig(images=[ab / "ct.nii.gz"], labels=[ab / "labels.nii.gz"], every=0), "probe_every"),
        (ProbeConfig(images=[ab / "ct.nii.gz"], labels=[ab / "labels.nii.gz"],
                     test_images=[ab / "ct.nii.gz"]), "probe_test_labels"),
    ]  # fmt: skip
    for pcfg, option in bad:
        with pytest.raises(ConfigError) as info:
            api.pretrain(None, tmp_path / "run", preset("smoke"), probe=pcfg)
        assert info.value.option == option
        assert not (tmp_path / "run").exists()
