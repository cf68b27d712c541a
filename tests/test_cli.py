"""The ``maesil`` command line as a user runs it: real CT, real files, exit codes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maesil_core.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``maesil`` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "maesil_core.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def assert_usage_error(result: subprocess.CompletedProcess | tuple, *needles: str) -> None:
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


def in_process(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_help_has_examples():
    # ``python -m maesil_core.cli`` (what torchrun runs) knows the segmentation commands too
    for command in ("pretrain", "reconstruct", "info", "finetune", "segment", "evaluate", "probe"):
        out = run_cli(command, "--help")
        assert out.returncode == 0, out.stderr
        assert "examples:" in out.stdout and f"maesil {command}" in out.stdout


def test_reconstruct_writes_aligned_volumes_and_figure(trained_run, tmp_path):
    ct = SHARED / "chest_ct" / "ct.nii.gz"  # LPS, anisotropic, not seen in pretraining
    out = tmp_path / "recon"
    result = run_cli(
        "reconstruct",
        "--checkpoint",
        trained_run,
        "--input",
        ct,
        "--out",
        out,
        "--device",
        "cpu",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert 10 < scores["psnr"] < 60 and 0 < scores["ssim"] <= 1
    # the no-learning reference is printed beside the model's score
    assert 10 < scores["interpolation_psnr"] < 60 and "to beat" in result.stdout
    assert scores["mean_fill_mse"] > 0 and "the mean of the visible voxels" in result.stdout
    src = nib.load(ct)
    for name in ("masked", "reconstruction", "interpolation", "mask", "error"):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == src.shape, name
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    mask = np.asarray(nib.load(out / "mask.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert 0.55 < mask.mean() < 0.95  # 0.75 of every superpatch, padding at the borders aside
    assert (out / "figure.png").stat().st_size > 20_000
    # the figure's columns: the reference picture beside the model's (PNG text)
    from PIL import Image

    with Image.open(out / "figure.png") as png:
        panels = png.text["Panels"].split(" | ")
        assert "to beat" in png.text["Title"]
    assert panels == ["CT", "masked", "reconstruction", "interpolation (reference)", "error"]

    again = run_cli("reconstruct", "--checkpoint", trained_run, "--input", ct, "--out", out)
    assert_usage_error(again, "--force")


def test_info_describes_a_run(trained_run):
    result = run_cli("info", trained_run, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["method"] == "maesil" and info["step"] == 200
    assert info["superpatch"] == [32, 32, 32] and info["parameters"] > 100_000


@pytest.fixture
def bad_inputs(tmp_path):
    """A folder of broken inputs, each with the words its error message must contain."""
    cases = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", ["does not exist"])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty folder"] = (empty, ["no ct"])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), flat)
    cases["2d"] = (flat, ["2d"])
    truncated = tmp_path / "truncated.nii.gz"
    raw = (SHARED / "abdomen_ct" / "ct.nii.gz").read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    cases["corrupt gzip"] = (truncated, ["truncated.nii.gz"])
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"this is not an image"))
    cases["not an image"] = (text, ["notes.nii.gz"])
    nan = tmp_path / "nan.nii.gz"
    arr = np.zeros((40, 40, 40), np.float32)
    arr[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), nan)
    cases["nan"] = (nan, ["nan"])
    return cases


def test_pretrain_refuses_bad_inputs_with_exit_2(bad_inputs, tmp_path, capsys):
    for name, (path, needles) in bad_inputs.items():
        code, err = in_process(
            capsys, "pretrain", "--data", path, "--out", tmp_path / name, "--steps", "1"
        )
        assert_usage_error((code, err), *needles)


def test_reconstruct_refuses_bad_inputs_with_exit_2(bad_inputs, trained_run, tmp_path, capsys):
    for name, (path, needles) in bad_inputs.items():
        if name == "empty folder":
            needles = ["empty"]
        code, err = in_process(
            capsys,
            "reconstruct",
            "--checkpoint",
            trained_run,
            "--input",
            path,
            "--out",
            tmp_path / name,
        )
        assert_usage_error((code, err), *needles)


def test_impossible_settings_exit_2(tmp_path, trained_run, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"superpatch": [30, 32, 32], "patch": [8, 8, 8]}}))
    code, err = in_process(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "a")
    assert_usage_error((code, err), "does not divide")

    cfg.write_text("{not json")
    code, err = in_process(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "b")
    assert_usage_error((code, err), "not valid json")

    code, err = in_process(capsys, "pretrain", "--out", tmp_path / "c", "--window", "300", "100")
    assert_usage_error((code, err), "high > low")

    code, err = in_process(capsys, "pretrain", "--out", tmp_path / "d", "--batch-size", "0")
    assert_usage_error((code, err), "batch size")

    code, err = in_process(
        capsys,
        "reconstruct",
        "--checkpoint",
        tmp_path / "none",
        "--input",
        SHARED / "abdomen_ct" / "ct.nii.gz",
        "--out",
        tmp_path / "e",
    )
    assert_usage_error((code, err), "does not exist")

    code, err = in_process(
        capsys,
        "reconstruct",
        "--checkpoint",
        trained_run,
        "--mask-ratio",
        "1.5",
        "--input",
        SHARED / "abdomen_ct" / "ct.nii.gz",
        "--out",
        tmp_path / "f",
    )
    assert_usage_error((code, err), "mask ratio")

    code, err = in_process(capsys, "pretrain", "--out", trained_run, "--steps", "1")
    assert_usage_error((code, err), "already holds a run")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    code, err = in_process(capsys, "info", corrupt)
    assert_usage_error((code, err), "corrupt.safetensors")


def test_two_process_ddp_on_cpu_writes_one_checkpoint(tmp_path):
    run = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "-m",
            "maesil_core.cli",
            "pretrain",
            "--data",
            SHARED / "abdomen_ct" / "ct.nii.gz",
            SHARED / "chest_ct" / "ct.nii.gz",
            "--out",
            run,
            "--preset",
            "smoke",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--checkpoint-every",
            "3",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_??????.safetensors"))
    assert ckpts == ["step_000003.safetensors", "step_000006.safetensors"]
    states = sorted(p.name for p in (run / "checkpoints").glob("*.state.safetensors"))
    assert states == ["step_000003.state.safetensors", "step_000006.state.safetensors"]
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    steps = [line.split(",")[0] for line in rows[1:]]
    assert len(steps) == len(set(steps)), rows  # one writer, no duplicated rows
    assert result.stdout.count("finished at step 6") == 1  # rank 0 alone reports


def test_pretrain_resume_keeps_the_runs_own_step_count(tmp_path, capsys):
    """``pretrain --resume`` without --steps finishes the run as planned (the preset's step
    count must not stretch it); ``--steps N`` extends it."""
    from maesil_core import api
    from maesil_core.checkpoint import load_checkpoint, resolve_checkpoint
    from maesil_core.config import preset

    ct, run = SHARED / "abdomen_ct" / "ct.nii.gz", tmp_path / "run"
    cfg = preset("smoke").override("train", steps=4, log_every=2, batch_size=2)
    cfg = cfg.override("data", num_workers=0)
    assert preset("smoke").train.steps != 4
    flag = {"stop": False}

    def stop_after_2(info):
        flag["stop"] = flag["stop"] or info.get("step", 0) >= 2

    first = api.pretrain([ct], run, cfg, progress=stop_after_2, cancel=lambda: flag["stop"])
    assert first.cancelled and first.step == 2
    code, err = in_process(capsys, "pretrain", "--data", ct, "--out", run, "--resume")
    assert code == 0, err
    assert load_checkpoint(resolve_checkpoint(run)).step == 4
    code, err = in_process(capsys, "pretrain", "--data", ct, "--out", run, "--resume", "--steps", 6)
    assert code == 0, err
    last = load_checkpoint(resolve_checkpoint(run))
    assert last.step == 6 and last.config.train.steps == 6


def test_pretrain_augments_unless_told_not_to(tmp_path, capsys):
    """Augmentation is on by default and recorded in the checkpoint; --no-augment turns it off."""
    from maesil_core.checkpoint import load_checkpoint, resolve_checkpoint

    ct = SHARED / "abdomen_ct" / "ct.nii.gz"
    for flags, expected in (([], True), (["--no-augment"], False)):
        run = tmp_path / f"run{len(flags)}"
        code, err = in_process(
            capsys, "pretrain", "--data", ct, "--out", run, "--steps", 2, "--batch-size", 2, *flags
        )
        assert code == 0, err
        assert load_checkpoint(resolve_checkpoint(run)).config.data.augment is expected


def test_a_config_files_preset_is_the_runs_preset(tmp_path):
    """`--config` naming a preset starts from that preset (it was read over --preset's default
    and only its name kept); --preset alone, or neither, as before."""
    from maesil_core.cli import build_parser
    from maesil_core.cli.common import run_config_from_args
    from maesil_core.config import preset

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"preset": "smoke", "train": {"lr": 5e-4}}))
    parser = build_parser()

    def cfg(*argv):
        return run_config_from_args(
            parser.parse_args(["pretrain", "--out", str(tmp_path / "r"), *argv])
        )

    got = cfg("--config", str(config))
    want = preset("smoke").override("train", lr=5e-4)
    assert got.to_dict() == want.to_dict()  # 3 mm, batch 4, dual masking: not the default's
    assert cfg("--config", str(config), "--preset", "smoke").to_dict() == want.to_dict()
    assert cfg().to_dict() == preset("tiny").to_dict()
    assert cfg("--preset", "cpu").preset == "cpu"
