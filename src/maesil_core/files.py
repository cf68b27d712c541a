"""Atomic writes that respect the user's umask.

Every file maesil writes (checkpoints, metrics, figures, NIfTI outputs, JSON) goes through
:func:`atomic_write`: the content is written to a temporary file in the target folder and
moved onto the target with ``os.replace``, so a crash or a kill never leaves half a file.
``tempfile.mkstemp`` creates that file with mode 0600 whatever the umask; it gets the mode
a plain ``open()`` would have given (``0o666 & ~umask``) before the move, so a colleague on
a shared server can read a run as the umask allows.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc),
    else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | Path, write: Callable[[Path], object], *, suffix: str = ".tmp"
) -> Path:
    """Call ``write(tmp_path)``, give the file the mode ``0o666 & ~umask``, then move it onto
    ``path`` atomically; the temporary file is removed if anything fails.

    ``suffix`` ends the temporary name, for writers that choose the format by extension
    (nibabel: ``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_csv(
    path: str | Path, fieldnames: Sequence[str], rows: Iterable[Mapping[str, object]]
) -> Path:
    """Write ``rows`` as CSV with a header (``csv.DictWriter``: a name with a comma or a quote
    is quoted, a missing value is an empty cell), atomically as :func:`atomic_write_text`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
