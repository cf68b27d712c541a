"""Faults while a command runs: signals, kill -9, a second run on the same folder, a full disk.

Training runs here are the smoke preset on the real ``abdomen_ct`` with one crop per step;
those that receive a signal or a kill run as a user runs them (``python -m maesil_core``
in a process of their own), the rest in this process. What must hold (docs/bad-input.md,
"Faults"): a stop by SIGINT / SIGTERM writes a checkpoint and exits 75 ("stopped early,
resumable"); a killed run leaves only checkpoints that load and resume to the same weights;
a second run on a folder in use is refused (a lock) and a killed run's lock is not; a full
disk is one line (exit 2) that says so and leaves the previous checkpoint / the earlier
outputs as they were, no orphan, no temporary file.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maesil_core.checkpoint import list_checkpoints, load_checkpoint
from maesil_core.cli import main

EXIT_STOPPED = 75  #: stopped early by a signal, resumable


def tiny(ct: Path, out: Path, *more) -> list[str]:
    return [
        "pretrain", "--data", str(ct), "--out", str(out), "--preset", "smoke", "--batch-size", "1", "--workers",
        "0", "--threads", "1", *map(str, more),
    ]  # fmt: skip


def start(argv: list[str]) -> subprocess.Popen:
    """``maesil ARGV`` in a process of its own, output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "maesil_core", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists (the run got that far); fails if ``proc`` ended first."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {path.name}:\n{err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def assert_loads(weights: Path) -> None:
    """A complete checkpoint: its weights, metadata and resume state all read."""
    from maesil_core.resume_state import load_resume_state

    ckpt = load_checkpoint(weights)
    assert ckpt.state_dict and ckpt.step >= 1
    state = load_resume_state(weights)
    assert state is not None and state["optimizer"]["state"], weights


def leftovers(run: Path) -> list[str]:
    """Temporary files and checkpoint pieces without their .json (a write that never ended)."""
    found = [str(p) for p in run.rglob("*.tmp")] + [str(p) for p in run.rglob(".*partial*")]
    ckpts = run / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.glob("step_*"):
            stem = p.name.split(".")[0]
            if not (ckpts / f"{stem}.json").is_file():
                found.append(str(p))
    return found


@pytest.fixture(scope="module")
def ct(shared_data) -> Path:
    return shared_data / "abdomen_ct" / "ct.nii.gz"


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_training_writes_a_checkpoint_and_exits_75(sig, ct, tmp_path, capsys):
    run = tmp_path / "run"
    proc = start(tiny(ct, run, "--steps", 100_000, "--checkpoint-every", 100_000))
    wait_for(run / "config.json", proc)  # training has begun
    time.sleep(0.5)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped early" in out + err and "resumable" in out + err
    assert f"maesil pretrain --out {run} --resume" in out + err
    (last,) = list_checkpoints(run)
    assert_loads(last)
    assert not leftovers(run)
    assert (run / "loss.png").stat().st_size > 0  # drawn by the command after the stop
    # resumable indeed: it continues from there (and stops the same way once it holds the run)
    step = load_checkpoint(last).step
    proc = start(tiny(ct, run, "--resume"))
    end = time.monotonic() + 300
    lock = run / ".maesil.lock"  # made by the run that holds the folder, with its pid
    while not lock.is_file() or lock.read_text().strip() != str(proc.pid):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    newest = load_checkpoint(list_checkpoints(run)[-1]).step
    if code == 130 and "cancelled" in err:  # still reading the CT: stopped, nothing new written
        assert newest == step and not leftovers(run)
    else:  # training: a step more, its checkpoint, the same status
        assert code == EXIT_STOPPED and newest > step, err[-3000:]


# --------------------------------------------------------------------------- kill -9 and locks


def test_kill_9_at_random_moments_leaves_checkpoints_that_load_and_resume_exactly(
    ct, tmp_path, capsys
):
    run = tmp_path / "run"
    rng = random.Random(13)
    for _attempt in range(3):
        flags = ["--resume"] if list_checkpoints(run) else ["--force"]
        proc = start(tiny(ct, run, "--steps", 60, "--checkpoint-every", 2, *flags))
        ckpts = run / "checkpoints"
        wait_for(ckpts, proc)
        done = len(list(ckpts.glob("step_*.json")))
        end = time.monotonic() + 300
        while len(list(ckpts.glob("step_*.json"))) == done and proc.poll() is None:
            if time.monotonic() > end:
                break
            time.sleep(0.02)  # this run's first checkpoint, however loaded the machine is
        time.sleep(rng.uniform(0.0, 1.0))  # inside a step, a write, a prune: wherever it falls
        proc.kill()
        proc.communicate()
        for weights in list_checkpoints(run):
            assert_loads(weights)
    assert list_checkpoints(run)
    # the next start cleans what a kill left half-written
    start_step = load_checkpoint(list_checkpoints(run)[-1]).step
    twins = [tmp_path / "a", tmp_path / "b"]
    for twin in twins:
        shutil.copytree(run, twin)
        code = main(tiny(ct, twin, "--resume", "--steps", start_step + 2))  # 60, or 2 more
        assert code == 0, capsys.readouterr().err
        assert not leftovers(twin)
    # resuming twice from the same checkpoint gives the same weights: nothing else is read
    a, b = (load_checkpoint(list_checkpoints(t)[-1]) for t in twins)
    assert a.step == b.step == max(60, start_step + 2)
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_not(
    ct, tmp_path, capsys
):
    run = tmp_path / "run"
    first = start(tiny(ct, run, "--steps", 100_000, "--checkpoint-every", 2))
    wait_for(run / "config.json", first)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for flags in ([], ["--force"], ["--resume"]):
        code = main(tiny(ct, run, "--steps", 3, *flags))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "in use by another maesil run" in err and f"pid {first.pid}" in err, err
    assert first.poll() is None  # the first run goes on, its files untouched by the others
    for p, mtime in before.items():
        assert not p.exists() or p.stat().st_mtime_ns >= mtime
    first.kill()
    first.communicate()
    code = main(tiny(ct, run, "--steps", 2, "--force"))  # the dead run's lock does not hold
    assert code == 0, capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run)] == ["step_000002.safetensors"]


def test_stale_temporaries_are_cleaned_when_a_run_starts(ct, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny(ct, run, "--steps", 2)) == 0
    planted = [
        run / ".loss.png.k2j3h4ab.tmp",  # kill -9 while plotting
        run / "checkpoints" / ".step_000004.safetensors.x8y9zq1w.tmp",
        run / "checkpoints" / "step_000004.safetensors",  # weights whose .json never came
        run / "checkpoints" / "step_000004.state.safetensors",
    ]
    for p in planted:
        p.write_bytes(b"")
    assert main(tiny(ct, run, "--resume", "--steps", 3)) == 0, capsys.readouterr().err
    assert not [p for p in planted if p.exists()]
    assert not leftovers(run)


# --------------------------------------------------------------------------- full disk


def _disk_full_on(monkeypatch, match: str) -> None:
    """Every atomic write whose target name contains ``match`` gets half its bytes on disk,
    then ENOSPC, as a full disk does (the writers are wrapped wherever they were imported)."""
    import maesil_core.files as files

    real = files.atomic_write

    def atomic_write(path, write, *args, **kwargs):
        if match not in Path(path).name:
            return real(path, write, *args, **kwargs)

        def half_then_full(tmp):
            write(tmp)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

        return real(path, half_then_full, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "atomic_write", None) is real:
            monkeypatch.setattr(module, "atomic_write", atomic_write)


@pytest.mark.parametrize(
    "piece", ["step_000004.safetensors", "step_000004.state", "step_000004.json"]
)
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
    piece, ct, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    _disk_full_on(monkeypatch, piece)
    code = main(tiny(ct, run, "--steps", 6, "--checkpoint-every", 2))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and "disk full" in lines[-1].lower(), err
    assert "--resume" in lines[-1]
    (kept,) = list_checkpoints(run)
    assert kept.name == "step_000002.safetensors"
    assert_loads(kept)
    assert not leftovers(run)
    monkeypatch.undo()
    assert main(tiny(ct, run, "--resume")) == 0, capsys.readouterr().err
    assert load_checkpoint(list_checkpoints(run)[-1]).step == 6


def test_a_full_disk_while_writing_reconstruct_outputs_leaves_the_earlier_ones(
    tiny_runs, ct, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "recon"
    argv = ["reconstruct", "--checkpoint", str(tiny_runs["pretrain"]), "--input", str(ct)]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    _disk_full_on(monkeypatch, "mask")  # the fourth of the five volumes
    code = main([*argv, "--out", str(out), "--force", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err.lower() and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # nothing half-written
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    _disk_full_on(monkeypatch, "error")
    assert main([*argv, "--out", str(fresh)]) == 2
    assert not fresh.exists() or not list(fresh.iterdir())  # a plain rerun is not blocked


# --------------------------------------------------------------------------- diverging


def test_a_loss_that_becomes_nan_exits_2_and_leaves_nothing(ct, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(tiny(ct, run, "--steps", 40, "--lr", "1e9"))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "--lr" in lines[-1] and "Traceback" not in err, err
    assert not run.exists()  # a plain rerun is not told the folder holds a run
    assert main(tiny(ct, run, "--steps", 2)) == 0
    assert np.isfinite(load_checkpoint(list_checkpoints(run)[-1]).meta.metrics.get("loss", 0.0))
