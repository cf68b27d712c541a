"""The shape of the code, checked: the command line is assembled from explicit registrations."""

from __future__ import annotations

import os
import subprocess
import sys


def test_python_dash_m_maesil_core_is_the_command():
    """``python -m maesil_core`` (what torchrun runs) lists every registered command."""
    from maesil_core.cli import COMMANDS, build_parser

    result = subprocess.run(
        [sys.executable, "-m", "maesil_core", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    commands = build_parser()._subparsers._group_actions[0].choices  # name -> parser
    assert list(commands) == [
        "pretrain",
        "reconstruct",
        "info",
        "finetune",
        "segment",
        "evaluate",
        "probe",
        "export",
        "import",
    ]
    for name in commands:
        assert f"    {name}" in result.stdout, (name, result.stdout)
    assert all(callable(getattr(module, "register", None)) for module in COMMANDS)
