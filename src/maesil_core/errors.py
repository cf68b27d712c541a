"""User-facing errors.

Every problem a user can fix (a missing file, a 2D image, an impossible setting, a
checkpoint of another architecture) is raised as :class:`MaesilError` with one line that
names the problem and the fix. The CLI prints it and exits with status 2; the napari
widgets show it as a notification. Anything else is a bug and keeps its traceback.

An error about a setting carries it: ``option`` is the setting's name in the Python API and
the config dataclasses (``"lr"``, ``"n_labelled"``, ``"run_dir"``), and the message writes
the settings it names as ```name``` (backticks) instead of a CLI flag. Each front end
renders those in its own words with :meth:`MaesilError.render`: the CLI with its flags
(``run_dir`` -> ``--out``), a widget with its field labels. ``str(error)`` writes them in the
flag convention (``n_labelled`` -> ``--n-labelled``), which is what the command line and
most readers of a log expect.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_OPTION = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class MaesilError(Exception):
    """A problem in the user's input or settings, with a message that says how to fix it.

    ``option``: the setting the problem is about (None when it is about an input file).
    """

    def __init__(self, message: str = "", *, option: str | None = None):
        self.template = str(message)
        self.option = option
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | Callable[[str], str | None] | None = None) -> str:
        """The message with every ```name``` written as ``names[name]`` (or ``names(name)``);
        a name without an entry is written in the flag convention, ``--name-with-dashes``."""

        def sub(match: re.Match) -> str:
            name = match.group(1)
            got = None
            if names is not None:
                got = names(name) if callable(names) else names.get(name)
            return got or "--" + name.replace("_", "-")

        return _OPTION.sub(sub, self.template)


class CheckpointError(MaesilError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


class DataError(MaesilError):
    """An input volume or dataset that cannot be used (missing, corrupt, 2D, NaN, ...)."""


class ConfigError(MaesilError):
    """An impossible or inconsistent setting."""


class Cancelled(Exception):
    """Raised inside a job when the user asked it to stop (not an error)."""
