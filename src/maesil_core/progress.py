"""How a long job reports and stops, the same for the CLI, the Python API and napari.

A job (``api.pretrain``, ``segmentation.finetune``, ``segment``, ...) takes ``progress``, a
callable receiving plain dicts (``{"phase", "step", "steps", "loss", ...}``), and ``cancel``,
a callable returning True or a :class:`threading.Event`, checked between units of work
(a training step, a batch of windows). Nothing here touches Qt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: receives one plain dict per report (never blocks for long: it runs in the job's thread)
ProgressFn = Callable[[dict[str, Any]], None]
#: "stop after this unit of work": a callable, an Event, or None (never)
CancelFlag = Callable[[], bool] | threading.Event | None


def cancel_fn(cancel: CancelFlag) -> Callable[[], bool]:
    """``cancel`` as a plain ``() -> bool``."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return lambda: bool(cancel())
