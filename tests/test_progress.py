"""The command line's progress report (tqdm): what a user sees in a terminal and in a log."""

from __future__ import annotations

import io

from maesil_core import api
from maesil_core.cli.common import Progress
from maesil_core.config import preset


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _pretrain(tmp_path, abdomen_ct, progress) -> None:
    cfg = preset("smoke").override("train", steps=6, log_every=2, checkpoint_every=4)
    api.pretrain([abdomen_ct], tmp_path / "run", cfg, progress=progress)


def test_a_log_gets_one_ascii_line_per_report_with_the_loss(tmp_path, abdomen_ct):
    log = io.StringIO()
    _pretrain(tmp_path, abdomen_ct, Progress(stream=log, every_s=0))
    lines = log.getvalue().splitlines()
    train = [line for line in lines if "step" in line and "loss" in line]
    assert [line.split("| ")[1].split()[0] for line in train[:3]] == ["2/6", "4/6", "6/6"], lines
    assert all("vol/s" in line and "lr " in line for line in train[:3]), lines
    assert any(line.startswith("  checkpoint: ") for line in lines), lines
    assert lines[-1].endswith("(done)"), lines
    assert log.getvalue().isascii()  # no block characters or carriage returns in a log file


def test_a_terminal_gets_a_live_bar_and_other_ranks_print_nothing(
    tmp_path, abdomen_ct, monkeypatch
):
    tty = Terminal()
    _pretrain(tmp_path, abdomen_ct, Progress(stream=tty))
    assert "\r" in tty.getvalue() and "6/6" in tty.getvalue() and "loss" in tty.getvalue()
    monkeypatch.setenv("RANK", "1")  # a second process under torchrun
    quiet = io.StringIO()
    _pretrain(tmp_path / "rank1", abdomen_ct, Progress(stream=quiet, every_s=0))
    assert quiet.getvalue() == ""
