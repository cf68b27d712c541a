"""Shared parts of the widgets: a job runner (Start / Cancel / progress), device and layer
choices, and the notifications for user errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from magicgui.widgets import Container, Label, ProgressBar, PushButton

from .._worker import JobResult, busy, job_generator

#: the newest checkpoint written by a widget in this session (pre-fills the others)
LAST = {"pretrain": None, "segmentation": None}


def device_choices() -> list[tuple[str, str]]:
    """Only devices that exist: each CUDA GPU by name, then the CPU."""
    out: list[tuple[str, str]] = []
    try:
        import torch

        for i in range(torch.cuda.device_count()):
            out.append((f"GPU {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    except Exception:  # a broken CUDA install must not break the widget
        pass
    out.append(("CPU", "cpu"))
    return out


def layers_of(viewer: Any, kind: str) -> list[Any]:
    """The viewer's 3D layers of ``kind`` ("image" / "labels")."""
    from napari.layers import Image, Labels

    cls = Image if kind == "image" else Labels
    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, cls) and layer.ndim == 3 and not getattr(layer, "rgb", False)
    ]


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _guarded(slot: Callable[..., Any]) -> Callable[..., Any]:
    """A slot that ignores a widget already deleted (viewer closed while a job ran)."""

    def call(*args: Any) -> Any:
        try:
            return slot(*args)
        except RuntimeError as exc:
            if "has been deleted" not in str(exc):
                raise
            return None

    return call


class JobWidget(Container):
    """A container with Start / Cancel, a progress bar and a status line.

    Subclasses call :meth:`launch` with a core function taking ``progress`` and ``cancel``.
    While a job runs every widget in ``self._lock_while_running`` is disabled.
    """

    def __init__(self, viewer: Any, start_text: str = "Start") -> None:
        super().__init__(labels=True)
        self.viewer = viewer
        self.start_button = PushButton(text=start_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=100, label="Progress")
        self.status = Label(value="", label="Status")
        self._worker: Any = None
        self._cancel_event: threading.Event | None = None
        self._lock_while_running: list[Any] = [self.start_button]
        self.last_result: JobResult | None = None
        self.released_at: float | None = None  #: monotonic time the last job let go of the UI
        self.cancel_button.changed.connect(self.cancel)
        self.native.destroyed.connect(lambda *_: self._cancel_event and self._cancel_event.set())

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _set_running(self, running: bool) -> None:
        for w in self._lock_while_running:
            w.enabled = not running
        self.cancel_button.enabled = running

    def cancel(self, *_: Any) -> None:
        if self._cancel_event is not None:
            self._cancel_event.set()
            self.status.value = "stopping..."

    # ------------------------------------------------------------------ jobs
    def launch(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_progress: Callable[[dict], None],
        on_done: Callable[[Any], None],
        **kwargs: Any,
    ) -> None:
        """Run ``fn(*args, progress=, cancel=, **kwargs)`` in a napari worker thread."""
        from napari.qt.threading import create_worker

        if self.running:
            return
        if busy():
            notify_error("The previous job is still stopping (finishing its step); try again.")
            return
        self._cancel_event = threading.Event()
        self.last_result = None
        worker = create_worker(
            job_generator, fn, self._cancel_event, *args, _start_thread=False, **kwargs
        )
        worker.yielded.connect(_guarded(on_progress))
        worker.returned.connect(_guarded(lambda res: self._on_returned(worker, res, on_done)))
        worker.errored.connect(_guarded(self._on_errored))
        worker.finished.connect(_guarded(lambda: self._release(worker)))
        self._worker = worker
        self._set_running(True)
        worker.start()

    def _on_returned(self, worker: Any, result: JobResult, on_done: Callable[[Any], None]) -> None:
        self._release(worker)  # before on_done, which may launch the next job
        self.last_result = result
        if result.error:
            self.status.value = "failed: see the notification"
            notify_error(result.error)
        elif result.cancelled:
            self.status.value = "cancelled" + (
                " (the current step finishes in the background)" if result.still_running else ""
            )
            notify_info("Job cancelled.")
            if result.value is not None:
                on_done(result.value)
        else:
            on_done(result.value)

    def _on_errored(self, exc: BaseException) -> None:
        # napari's worker already shows the traceback notification (this is a bug)
        self.last_result = JobResult(error=f"{type(exc).__name__}: {exc}")
        self.status.value = f"failed: {type(exc).__name__}"

    def _release(self, worker: Any) -> None:
        if self._worker is worker:
            import time

            self.released_at = time.monotonic()
            self._worker = None
            self._cancel_event = None
            self._set_running(False)
