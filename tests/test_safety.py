"""Other people's files and colleagues: no pickle is ever loaded, outputs follow the umask,
and the ranks of a resumed DDP run draw their own random streams."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maesil_core import api
from maesil_core.checkpoint import list_checkpoints, resolve_checkpoint
from maesil_core.cli import main
from maesil_core.config import preset

TESTS = Path(__file__).resolve().parent


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's state file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(weights: Path, marker: Path) -> Path:
    """Replace the resume state beside ``weights`` by an old-format ``.state.pt`` whose
    unpickling creates ``marker``."""
    for old in weights.parent.glob(weights.stem + ".state.*"):
        old.unlink()
    planted = weights.with_suffix(".state.pt")
    torch.save({"step": 2, "optimizer": _Payload(marker), "rng": {}}, planted)
    return planted


def _tiny_run_flags(steps: int) -> list[str]:
    return ["--steps", str(steps), "--batch-size", "1", "--device", "cpu", "--workers", "0"]


def test_resume_never_unpickles_a_planted_state_file(tmp_path, capsys, shared_data):
    """A run directory from someone else with a pickle payload in
    ``checkpoints/step_N.state.pt``: ``pretrain --resume`` and ``finetune --resume`` refuse
    it with one line (exit 2) and the payload never runs."""
    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    labels = shared_data / "abdomen_ct" / "labels.nii.gz"
    marker = tmp_path / "payload-ran"

    run = tmp_path / "pre"
    assert main(["pretrain", "--data", str(ct), "--out", str(run), *_tiny_run_flags(2)]) == 0
    planted = _plant_payload(resolve_checkpoint(run), marker)
    capsys.readouterr()
    code = main(["pretrain", "--out", str(run), "--resume", "--steps", "3"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and "Traceback" not in err, err
    assert "old pickle format" in err and str(planted) in err, err
    assert [p.name for p in list_checkpoints(run)] == ["step_000002.safetensors"]  # untouched

    seg = tmp_path / "seg"
    flags = ["--images", str(ct), "--labels", str(labels), "--classes", "liver"]
    flags += ["--roi", "32", "--feature-size", "4", *_tiny_run_flags(2)]
    assert main(["finetune", *flags, "--out", str(seg)]) == 0
    _plant_payload(resolve_checkpoint(seg), marker)
    capsys.readouterr()
    code = main(["finetune", *flags, "--out", str(seg), "--resume"])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted pickle ran"
    assert code == 2 and "old pickle format" in err, err


def test_resume_state_round_trips_without_pickle(tmp_path):
    """Optimiser moments and the torch / NumPy / Python RNG states come back exactly from
    safetensors + JSON; the file holds no pickle."""
    from maesil_core.checkpoint import save_checkpoint
    from maesil_core.models import build_model
    from maesil_core.resume_state import load_resume_state, state_path
    from maesil_core.train.loop import make_optimizer
    from maesil_core.train.seeding import rng_state, set_rng_state

    cfg = preset("smoke")
    model = build_model(cfg.model)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    model(torch.rand(2, 1, 32, 32, 32)).loss.backward()
    opt.step()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    weights = save_checkpoint(tmp_path, model, cfg, 1, optimizer=opt, rng=rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert not state_path(weights).read_bytes().startswith(b"PK")  # not a torch.save zip

    state = load_resume_state(weights)
    assert state["step"] == 1
    again = make_optimizer(build_model(cfg.model), cfg.train, torch.device("cpu"))
    again.load_state_dict(state["optimizer"])
    before, after = opt.state_dict(), again.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for i, s in before["state"].items():
        for name, value in s.items():
            torch.testing.assert_close(after["state"][i][name], value, rtol=0, atol=0)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_planted_disk_cache_file_is_recomputed_not_run(tmp_path, shared_data):
    """``cache="disk"``: a pickle planted in the cache folder is refused by
    ``torch.load(weights_only=True)``, recomputed, and never runs."""
    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    cache = tmp_path / "cache"
    cfg = preset("smoke").override("train", steps=1, batch_size=1)
    cfg = cfg.override("data", num_workers=0, cache="disk", cache_dir=str(cache))
    api.pretrain([ct], tmp_path / "a", cfg)
    cached = list(cache.rglob("*.pt"))
    assert cached, "nothing was cached"
    marker = tmp_path / "payload-ran"
    for path in cached:
        torch.save({"image": _Payload(marker)}, path)
    with pytest.warns(UserWarning, match="Corrupt cache file"):
        result = api.pretrain([ct], tmp_path / "b", cfg)
    assert result.step == 1 and not marker.exists()


def test_outputs_follow_the_umask(tmp_path, capsys, trained_run, shared_data):
    """Under umask 022 every output is -rw-r--r-- (mkstemp alone would leave -rw-------):
    checkpoints and their state, metrics.csv, loss.png, config.json, NIfTI outputs and the
    figure; under 027 a file is -rw-r-----."""

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    before = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["pretrain", "--data", str(ct), "--out", str(run), *_tiny_run_flags(2)]) == 0
        recon = tmp_path / "recon"
        args = ["--checkpoint", str(trained_run), "--input", str(ct), "--out", str(recon)]
        assert main(["reconstruct", *args, "--device", "cpu"]) == 0
        files = [p for p in (run / "checkpoints").iterdir()]
        files += [run / n for n in ("metrics.csv", "loss.png", "config.json")]
        files += sorted(recon.iterdir())
        assert {p.suffix for p in files} >= {".safetensors", ".json", ".csv", ".png", ".gz"}
        assert {p.name: oct(mode(p)) for p in files} == {p.name: "0o644" for p in files}
        from maesil_core.files import atomic_write_text

        os.umask(0o027)
        assert mode(atomic_write_text(tmp_path / "x.txt", "x")) == 0o640
    finally:
        os.umask(before)
    capsys.readouterr()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resumed_ddp_ranks_draw_their_own_random_streams(tmp_path, shared_data):
    """Two gloo processes resume one run: each rank's global RNG (the masks are drawn from
    it) differs, where restoring rank 0's saved state on every rank made them equal."""
    run = tmp_path / "run"
    cfg = preset("smoke").override("train", steps=2, batch_size=1)
    api.pretrain(
        [shared_data / "abdomen_ct" / "ct.nii.gz"], run, cfg.override("data", num_workers=0)
    )
    out = tmp_path / "rng"
    out.mkdir()
    argv = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _free_port()]
    argv += [TESTS / "_ddp_rng_probe.py", run, out, 3]
    result = subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = np.load(out / "rank0.npy"), np.load(out / "rank1.npy")
    assert not np.array_equal(rank0, rank1)
    assert [p.name for p in list_checkpoints(run)][-1] == "step_000003.safetensors"


def test_csv_outputs_read_back_whatever_the_case_names(tmp_path):
    """evaluate's CSV goes through csv.DictWriter: a scan named with a comma or a quote (a
    folder name a user chose) stays one cell, and the file reads back as written."""
    import csv

    from maesil_core.segmentation.evaluate import Evaluation

    rows = [
        {"case": 'ct, "late" phase', "class": "liver", "id": 1, "dice": 0.91, "hd95_mm": 4.25},
        {"case": "ct_2", "class": "liver", "id": 1, "dice": float("nan"), "hd95_mm": None},
    ]
    path = Evaluation(rows, {1: "liver"}).save_csv(tmp_path / "eval.csv")
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["case"] for r in back] == ['ct, "late" phase', "ct_2", "mean"]
    assert back[0]["dice"] == "0.910000" and back[1]["dice"] == "nan"
    assert back[2]["dice"] == "0.910000"  # the mean leaves out the case without a score
