"""CPU threads: ``auto`` (the default) is one thread per core that other jobs leave free.

The rule is checked with given core counts and load averages (never with this machine's
timing or load: the benchmark that measured it is benchmarks/threads.py, BENCHMARKS.md).
"""

from __future__ import annotations

import pytest
import torch

from maesil_core import api
from maesil_core.cli import build_parser, run_config_from_args
from maesil_core.config import preset
from maesil_core.threads import auto_threads, choose_threads, torch_threads, usable_cores


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [
        (2, 0.1, 2),  # an idle 2-core machine: both cores
        (2, 0.9, 1),  # one core busy: one thread
        (2, 9.5, 1),  # the loaded 2-core machine of issue 17: one thread, never 0
        (16, 3.2, 13),  # a workstation with three jobs running
        (8, 0.0, 8),
    ],
)
def test_auto_takes_one_thread_per_free_core(monkeypatch, cores, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    choice = auto_threads(cores=cores, load=load)
    assert choice.threads == expected and choice.auto
    assert f"load average {load:.1f}" in choice.describe()


def test_auto_respects_omp_num_threads_and_torchrun(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(cores=16, load=0.0).threads == 3
    assert "OMP_NUM_THREADS=3" in auto_threads().describe()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun processes share 16 cores
    assert auto_threads(cores=16, load=0.0).threads == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # on this machine, whatever its load: between 1 and the usable cores
    assert 1 <= auto_threads().threads <= usable_cores()


def test_explicit_threads_win_and_are_restored():
    assert choose_threads(3).threads == 3 and not choose_threads(3).auto
    assert choose_threads(0).auto and choose_threads(None).auto
    before = torch.get_num_threads()
    with torch_threads(2, "cpu") as choice:
        assert torch.get_num_threads() == 2 and choice.threads == 2
    assert torch.get_num_threads() == before
    with torch_threads(2, "cuda") as choice:  # a GPU run leaves the CPU threads alone
        assert choice is None and torch.get_num_threads() == before


def test_cli_threads_flag_takes_auto_or_a_count(tmp_path, capsys):
    parse = build_parser().parse_args
    assert run_config_from_args(parse(["pretrain", "--out", str(tmp_path)])).train.threads == 0
    assert (
        run_config_from_args(
            parse(["pretrain", "--out", str(tmp_path), "--threads", "auto"])
        ).train.threads
        == 0
    )
    args = parse(["finetune", "--out", str(tmp_path), "--threads", "2"])
    assert args.threads == 2
    args = parse(["reconstruct", "--checkpoint", "c", "--input", "i", "--out", "o"])
    assert args.threads is None  # None: auto
    with pytest.raises(SystemExit):
        parse(["pretrain", "--out", str(tmp_path), "--threads", "many"])
    assert "expected 'auto' or a number" in capsys.readouterr().err


def test_training_says_how_many_threads_and_restores_the_callers(tmp_path, abdomen_ct):
    """A run with the default (auto) reports its choice before the first step; the caller's
    own setting (napari's) is back afterwards."""
    cfg = preset("smoke").override("train", steps=1, batch_size=1, log_every=1)
    assert cfg.train.threads == 0
    before = torch.get_num_threads()
    messages = []
    api.pretrain(
        [abdomen_ct],
        tmp_path / "run",
        cfg,
        progress=lambda info: messages.append(info.get("message", "")),
    )
    said = [m for m in messages if m.startswith("computing with")]
    # conftest sets OMP_NUM_THREADS=1, which auto takes as the user's choice
    assert said == ["computing with 1 CPU thread (OMP_NUM_THREADS=1)"]
    assert torch.get_num_threads() == before
