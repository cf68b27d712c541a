"""Packaging: what setup.cfg declares is what the code imports, and the CLI needs no GUI."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _requirements(text: str) -> dict[str, str]:
    """``{normalised name: lower bound or ''}`` of a setup.cfg requirement list."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(>=\s*([0-9][^,;\s]*))?", line)
        assert m, line
        out[_norm(m.group(1))] = m.group(4) or ""
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(package: str) -> set[str]:
    """Top-level modules imported anywhere in ``src/<package>`` (also inside functions)."""
    found = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
    return {m for m in found if m not in sys.stdlib_module_names} - {"maesil_core", package}


def _distribution(module: str) -> str:
    dists = packages_distributions().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it"
    return _norm(dists[0])


def test_every_imported_package_is_declared_and_no_undeclared_one():
    cfg = _setup_cfg()
    core = _requirements(cfg["options"]["install_requires"])
    extras = cfg["options.extras_require"]
    gui = _requirements(extras["napari"])
    for package, allowed in (("maesil_core", core), ("napari_maesil", {**core, **gui})):
        for module in sorted(_third_party_imports(package)):
            dist = _distribution(module)
            assert dist in allowed, f"{package} imports {module} ({dist}) but does not declare it"
    # nothing declared that the code does not use (einops was)
    used = {_distribution(m) for m in _third_party_imports("maesil_core")}
    assert set(core) <= used, f"declared but never imported: {sorted(set(core) - used)}"


def test_qt_side_only_in_the_napari_extra():
    cfg = _setup_cfg()
    core = _requirements(cfg["options"]["install_requires"])
    gui = _requirements(cfg["options.extras_require"]["napari"])
    testing = _requirements(cfg["options.extras_require"]["testing"])
    for name in ("napari", "magicgui", "qtpy", "npe2", "pyqt6", "pyqt5", "pyside6"):
        assert name not in core, f"{name} would put a GUI stack on a headless server"
    assert {"napari", "magicgui", "qtpy", "npe2"} <= set(gui)
    assert set(gui) <= set(testing), "the testing extra must pull everything the tests need"


def test_lower_bounds_are_the_versions_make_test_min_installs():
    """.ci/min-versions.txt pins exactly the lower bounds of install_requires (torch aside:
    `make install` pins the build it tests)."""
    core = _requirements(_setup_cfg()["options"]["install_requires"])
    pins = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    for name, bound in core.items():
        assert bound, f"{name} has no lower bound"
        if name == "torch":
            continue
        assert pins.get(name) == bound, (
            f"{name}>={bound} but make test-min installs {pins.get(name)}"
        )


def test_license_file_matches_setup_cfg():
    meta = _setup_cfg()["metadata"]
    assert meta["license"] == "BSD-3-Clause"
    assert meta["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text  # clause 3


def test_classifiers_name_the_tested_python():
    classifiers = _setup_cfg()["metadata"]["classifiers"]
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"Programming Language :: Python :: {ours}" in classifiers, (
        f"the tests run on Python {ours}: classify it"
    )


def test_command_line_imports_no_gui():
    """`maesil --help` of every command loads neither Qt nor napari nor magicgui."""
    code = (
        "import sys\n"
        "from maesil_core.cli import build_parser\n"
        "p = build_parser()\n"
        "for name in list(p._subparsers._group_actions[0].choices):\n"
        "    p._subparsers._group_actions[0].choices[name].format_help()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'napari_maesil'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
