"""Issue 17, item 5: the commands say what is happening, on real CT.

``pretrain`` lists the scans it found before the first step, ``--resume`` says from which
step, the non-HU warning is one plain line per scan, ``info`` shows a segmentation run's
classes and settings as tables, ``finetune --help`` describes its own batch and config,
and the reconstruction figure carries the score to beat beside the model's.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from maesil_core.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pretrain_lists_its_scans_and_resume_says_the_step(tmp_path, shared_data, capsys):
    out_dir = tmp_path / "run"
    data = [shared_data / "abdomen_ct" / "ct.nii.gz", shared_data / "dicom_ct"]
    tiny = ["--steps", "1", "--batch-size", "1", "--checkpoint-every", "1"]
    code, out, err = run(capsys, "pretrain", "--data", *data, "--out", out_dir, *tiny)
    assert code == 0, err
    listing = out[: out.index("finished at step")]
    assert "found 2 scans:" in listing
    assert re.search(r"abdomen_ct/ct\.nii\.gz\s+122 x 101 x 30\s+3\.00 x 3\.00 x 3\.00 mm", out)
    assert re.search(r"dicom_ct\s+512 x 512 x 20\s+0\.98 x 0\.98 x 2\.00 mm\s+DICOM", out)
    assert "computing with" in listing  # the thread count, before the first step

    code, out, err = run(capsys, "pretrain", "--out", out_dir, "--resume", "--steps", "3")
    assert code == 0, err
    assert "resuming from step 1 of 3" in out and "finished at step 3" in out
    code, out, err = run(capsys, "pretrain", "--out", out_dir, "--resume")
    assert code == 0, err
    assert "resuming from step 3 of 3: the run is complete; give --steps above 3" in out


def test_non_hu_warning_is_one_plain_line_per_scan(tmp_path, shared_data, capsys):
    head = shared_data / "head_ct" / "ct_not_hu.nii.gz"
    code, out, err = run(
        capsys, "pretrain", "--data", head, "--out", tmp_path / "run", "--steps", "2",
        "--batch-size", "1",
    )  # fmt: skip
    assert code == 0, err
    warned = [line for line in err.splitlines() if "Hounsfield" in line]
    assert warned == [
        f"maesil pretrain: warning: {head} does not look like CT in Hounsfield units (no "
        "values below -500); scaling its 0.5..99.5 percentiles to [0, 1] instead "
        "(--intensity hu or percentile to choose)."
    ]
    assert "UserWarning" not in err and ".py:" not in err  # no Python source line


def test_info_shows_a_segmentation_runs_classes_and_settings(tmp_path, shared_data, capsys):
    """Fine-tuned for one step on abdomen_ct (images and labels given as one folder)."""
    folder = shared_data / "abdomen_ct"
    run_dir = tmp_path / "seg"
    code, out, err = run(
        capsys, "finetune", "--images", folder, "--labels", folder, "--out", run_dir,
        "--classes", "liver", "spleen", "--steps", "1", "--batch-size", "1",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run(capsys, "info", run_dir)
    assert code == 0, err
    assert "{" not in out and "'" not in out, out  # no raw dict
    lines = out.splitlines()
    classes = lines.index("classes")
    assert re.match(r"\s+id\s+name\s+from source label ids", lines[classes + 1])
    assert re.match(r"\s+1\s+liver\s+5$", lines[classes + 2])
    assert re.match(r"\s+2\s+spleen\s+1$", lines[classes + 3])
    assert "segmentation settings" in lines
    assert re.search(r"roi\s+training crop / window \(voxels\)\s+the superpatch", out)
    assert re.search(r"pos_weight\s+crops on an organ : anywhere\s+2 : 1", out)
    # the pretraining mask says nothing about a segmenter (the body mask does)
    assert not re.search(r"^\s*mask", out, re.M), out
    assert re.search(r"body_mask\s+inside the body only\s+True", out)
    assert str(folder / "ct.nii.gz") in out  # the training data, listed


def test_finetune_help_describes_its_own_batch_and_config(capsys):
    for command, batch, config in (
        ("finetune", "training crops (ROI", "JSON file of training settings"),
        ("pretrain", "superpatches per step", "JSON file overriding the preset"),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert batch in text and config in text, (command, text)


def test_figure_shows_the_score_to_beat(trained_run, tmp_path, shared_data, capsys):
    out_dir = tmp_path / "recon"
    code, out, err = run(
        capsys, "reconstruct", "--checkpoint", trained_run,
        "--input", shared_data / "abdomen_ct" / "ct.nii.gz", "--out", out_dir,
    )  # fmt: skip
    assert code == 0, err
    title = Image.open(out_dir / "figure.png").text["Title"]
    model = re.search(r"masked region: PSNR ([\d.]+) dB", out).group(1)
    to_beat = re.search(r"to beat, interpolating the visible voxels: PSNR ([\d.]+) dB", out)
    assert f"PSNR {model} dB" in title
    assert f"to beat, interpolating the visible voxels: PSNR {to_beat.group(1)} dB" in title
