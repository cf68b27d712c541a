"""Running ``maesil_core`` jobs off the Qt thread.

A core call (``api.pretrain``, ``reconstruct_volume``, ``finetune`` ...) reports through a
``progress(dict)`` callback and stops when its ``cancel`` Event is set. :func:`job_generator`
runs it in a plain daemon thread and turns its callbacks into a generator, which napari's
``thread_worker`` machinery runs in a worker thread: every progress dict is *yielded* to
the Qt thread (the widget updates its progress bar there). Nothing here touches Qt.

User errors (:class:`~maesil_core.errors.MaesilError`) do not propagate as exceptions
(napari would show a traceback): the generator returns a :class:`JobResult` with the
message, and the widget shows it as a notification.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

#: after Cancel, the UI is released at most this long after the job was asked to stop
CANCEL_GRACE_S = 0.4

_DONE = object()
_live_threads: list[threading.Thread] = []
_live_events: list[threading.Event] = []


@dataclass
class JobResult:
    """What a job ended with: ``value`` or an ``error`` message; ``cancelled`` if stopped."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False
    still_running: bool = False  #: cancelled, but the core call is still finishing its step


def busy() -> bool:
    """True while a job thread from an earlier (cancelled) run is still finishing."""
    _live_threads[:] = [t for t in _live_threads if t.is_alive()]
    return bool(_live_threads)


def cancel_all(wait_s: float = 0.0) -> bool:
    """Ask every running job to stop (viewer closing, tests); wait up to ``wait_s`` for them.

    Returns True when no job thread is left.
    """
    for event in list(_live_events):
        event.set()
    deadline = time.monotonic() + wait_s
    for thread in list(_live_threads):
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return not busy()


def job_generator(
    fn: Callable[..., Any], cancel: threading.Event, *args: Any, **kwargs: Any
) -> Generator[dict[str, Any], None, JobResult]:
    """Run ``fn(*args, progress=..., cancel=cancel, **kwargs)``; yield its progress dicts.

    Returns a :class:`JobResult`. When ``cancel`` is set the generator returns within
    :data:`CANCEL_GRACE_S` even if ``fn`` is busy inside one long step (it then finishes
    that step in the background and stops; :func:`busy` tells when it is done).
    """
    from maesil_core.errors import Cancelled, MaesilError

    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, progress=q.put, cancel=cancel, **kwargs)
        except Cancelled:
            box["cancelled"] = True
        except MaesilError as exc:
            box["error"] = str(exc)
        except BaseException as exc:  # a bug: keep the traceback for the log
            box["bug"] = exc
            box["trace"] = traceback.format_exc()
        finally:
            q.put(_DONE)

    thread = threading.Thread(target=target, name=f"maesil-{fn.__name__}", daemon=True)
    _live_threads.append(thread)
    _live_events[:] = [e for e in _live_events if not e.is_set()] + [cancel]
    thread.start()
    cancelled_at: float | None = None
    while True:
        try:
            item = q.get(timeout=0.05)
        except queue.Empty:
            if cancel.is_set():
                cancelled_at = cancelled_at or time.monotonic()
                if time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    return JobResult(cancelled=True, still_running=True)
            continue
        if item is _DONE:
            break
        yield item
    if "bug" in box:
        raise RuntimeError(f"{fn.__name__} failed:\n{box['trace']}") from box["bug"]
    value = box.get("value")
    cancelled = bool(box.get("cancelled")) or bool(getattr(value, "cancelled", False))
    return JobResult(value=value, error=box.get("error"), cancelled=cancelled)
