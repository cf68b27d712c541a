"""The shape of the code, checked (docs/architecture.md says this test is the check).

- Layers: ``maesil_core`` is ordered config -> checkpoint I/O -> models -> train ->
  api / segmentation -> cli (:data:`LAYERS`); a module imports only from its own layer or
  below (lazy imports inside functions count), and no import cycle exists between modules.
- ``maesil_core`` imports no Qt and no napari (it runs on headless GPU servers).
- Core error messages name settings as ```option``` placeholders, never as CLI flags; the
  CLI renders them as its flags.
- The command line is assembled from explicit registrations (one module per command group).

Static (AST) and fast: no module is imported, except by the last two tests.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "src" / "maesil_core"

#: bottom to top; a module may import from its own layer and the layers below
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors", "progress", "files", "model_options", "threads"),  # no project imports
    ("config",),  # dataclass configs and presets
    ("checkpoint", "resume_state", "data", "metrics", "figures"),  # files in and out
    ("models",),  # architectures, masking, the model registry
    ("train", "runs", "inference"),  # the training loop, run folders, tiled inference
    ("api", "segmentation", "classification", "probe", "probe_monitor", "interop"),  # tasks, API
    ("cli", "__main__"),  # the command line
]
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def layer_of(module: str) -> int:
    """Layer index of a module ``maesil_core.a.b`` (by its first component ``a``)."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(CORE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported maesil_core module, line) for every import in the file, lazy ones too.

    ``from .pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "maesil_core" or t.startswith("maesil_core."):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                found.append((t, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: {t for t, _ in imports_of(n, p, known) if t != n} for n, p in known.items()}


def test_every_import_stays_in_its_layer_or_goes_down():
    known = modules()
    upward = []
    for name, path in known.items():
        for target, line in imports_of(name, path, known):
            if layer_of(target) > layer_of(name):
                upward.append(f"{path.relative_to(CORE.parent)}:{line} {name} -> {target}")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_no_import_cycle_inside_maesil_core():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m) :] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_maesil_core_imports_no_qt_or_napari():
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{name}:{node.lineno} {n}" for n in names if n.split(".")[0] in GUI]
    assert not bad, bad


def test_the_checker_sees_what_it_must():
    """The AST reading above resolves relative, lazy and package imports (a checker that
    saw nothing would pass everything)."""
    edges = graph()
    assert "maesil_core.models.registry" in edges["maesil_core.api"]  # top-level import
    assert "maesil_core.models" in edges["maesil_core.api"]  # lazy, inside pretrain()
    assert "maesil_core.cli.pretrain" in edges["maesil_core.cli"]  # from . import pretrain
    assert layer_of("maesil_core.checkpoint") < layer_of("maesil_core.models.registry")
    assert "maesil_core.models" not in edges["maesil_core.checkpoint"]


FLAG = re.compile(r"(^|[\s(/'\"])--[a-z][a-z0-9-]+")
ERRORS = {"MaesilError", "ConfigError", "DataError", "CheckpointError"}


def test_core_error_messages_name_settings_not_cli_flags():
    """Outside ``cli/``, an error names a setting as ```name``` (rendered by each front end),
    never as a ``--flag`` of one front end."""
    bad = []
    for name, path in modules().items():
        if name.startswith("maesil_core.cli"):
            continue
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ERRORS):
                continue
            for arg in node.args[:1]:
                text = "".join(
                    c.value
                    for c in ast.walk(arg)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
                if FLAG.search(text):
                    bad.append(f"{path.relative_to(CORE.parent)}:{node.lineno} {text[:70]!r}")
    assert not bad, "core errors that name CLI flags:\n" + "\n".join(bad)


def test_errors_are_rendered_in_each_front_ends_words():
    from maesil_core import cli
    from maesil_core.errors import ConfigError

    err = ConfigError(
        "`n_labelled` 3 but only 1 volume; or choose another `run_dir`.", option="n_labelled"
    )
    assert err.option == "n_labelled"
    assert str(err) == "--n-labelled 3 but only 1 volume; or choose another --run-dir."
    flags = cli.flag_names(cli.build_parser(), "finetune")
    assert flags["n_labelled"] == "--n-labelled" and flags["run_dir"] == "--out"
    assert err.render(flags) == "--n-labelled 3 but only 1 volume; or choose another --out."
    widget = {"n_labelled": "'Labelled volumes'", "run_dir": "'Output folder'"}
    assert err.render(widget).startswith("'Labelled volumes' 3")


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
    assert {"pretrain", "finetune", "segment", "evaluate", "probe"} <= set(commands)
    for name in commands:
        assert f"    {name}" in result.stdout, (name, result.stdout)
    assert all(callable(getattr(module, "register", None)) for module in COMMANDS)


@pytest.mark.parametrize("limit", [500])
def test_no_source_file_over_the_limit_without_a_reason(limit):
    """Files under src/ stay under ~500 lines, or say at their top why they do not
    ("Longer than 500 lines because ...")."""
    long = []
    for path in sorted(CORE.parent.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > limit and not any("Longer than 500 lines" in ln for ln in lines[:40]):
            long.append(f"{path.relative_to(CORE.parent)}: {len(lines)} lines")
    assert not long, long


def test_readme_what_is_where_matches_the_tree():
    """Every file and folder README's "What is where" names exists, and every module and
    package of maesil_core is named there."""
    root = CORE.parents[1]
    text = (root / "README.md").read_text()
    block = text.split("## What is where", 1)[1].split("```")[1]
    named, missing = set(), []
    for line in block.splitlines():
        left = line[:30].strip()
        if not left or line.startswith(" " * 30):
            continue
        base = CORE if line.startswith("  ") else root
        for item in left.split(", "):
            if item.endswith((".py", "/")):
                named.add(item.rstrip("/"))
                if not (base / item).exists():
                    missing.append(item)
    assert not missing, missing
    top = {p.name for p in CORE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    unnamed = sorted(top - named - {"__init__.py", "__main__.py"})
    assert not unnamed, f"not in README's What is where: {unnamed}"
