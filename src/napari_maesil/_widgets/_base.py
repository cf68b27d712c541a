"""Shared parts of the widgets: a job runner (Start / Cancel / progress in the widget and in
napari's activity dock), device and layer choices, notifications, and the bookkeeping that
disconnects every viewer callback and stops the job when the widget closes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from magicgui.widgets import CheckBox, Container, Label, ProgressBar, PushButton
from magicgui.widgets.bases import Widget

from maesil_core.errors import MaesilError

from .. import _worker
from .._worker import Job, JobResult, preload, preloaded, running_jobs

#: the newest checkpoint written by a widget in this session (pre-fills the others)
LAST = {"pretrain": None, "segmentation": None}

#: how often the Qt thread collects a job's progress (ms)
POLL_MS = 50


def device_choices(*_: Any) -> list[tuple[str, str]]:
    """``auto`` first (a GPU if there is one, as the command line's ``--device auto``), each
    CUDA GPU by name once the background preload has found them, then the CPU. Never touches
    torch: the list is built when a widget opens, on the Qt thread, where importing torch
    waited up to 2 s for the preload's import lock (and CUDA's start-up takes seconds); the
    widget asks again when the preload is done (:meth:`JobWidget._refresh_when_preloaded`)."""
    gpus = list(_worker.GPUS) if preloaded() else []
    return [("auto (a GPU if there is one)", "auto"), *gpus, ("CPU", "cpu")]


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


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def wrapped_label(label: str, value: str = "") -> Label:
    """A Label whose long text wraps instead of widening the dock."""
    widget = Label(value=value, label=label)
    widget.native.setWordWrap(True)
    return widget


class _Lifecycle:
    """What a widget must undo when it closes: viewer callbacks, its job, its timer and its
    activity-dock entry. Holds no reference to the widget, so it can run from ``destroyed``.
    """

    def __init__(self) -> None:
        self.connections: list[tuple[Any, Callable[..., Any]]] = []
        self.mouse_callbacks: list[tuple[list, Callable[..., Any]]] = []
        self.job: Job | None = None
        self.timer: Any = None
        self.activity: Any = None
        self.closed = False

    def close_activity(self) -> None:
        if self.activity is not None:
            bar, self.activity = self.activity, None
            with contextlib.suppress(Exception):  # the activity dock may be gone
                bar.close()

    def teardown(self, *_: Any) -> None:
        """Idempotent; never raises (it can run from Qt's ``destroyed`` at exit, where an
        exception would abort the process)."""
        if self.closed:
            return
        self.closed = True
        if self.job is not None:
            self.job.cancel()  # joined at exit (see _worker), or by the next poll
        with contextlib.suppress(Exception):  # the timer may be gone with the app
            self.timer.stop()
        self.close_activity()
        for emitter, callback in self.connections:
            with contextlib.suppress(Exception):
                emitter.disconnect(callback)
        self.connections.clear()
        for callbacks, callback in self.mouse_callbacks:
            with contextlib.suppress(Exception):
                callbacks.remove(callback)
        self.mouse_callbacks.clear()


def _watch_close(native: Any, life: _Lifecycle) -> None:
    """Tear down when the widget is deleted, closed, or taken out of its dock (napari's
    ``remove_dock_widget`` and the dock's close button unparent it)."""
    from qtpy.QtCore import QEvent, QObject

    class Watcher(QObject):
        docked = False

        def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt's name)
            kind = event.type()
            if kind == QEvent.Type.ParentChange:
                if obj.parent() is not None:
                    self.docked = True
                elif self.docked:
                    life.teardown()
            elif kind == QEvent.Type.Close:
                life.teardown()
            return False

    watcher = Watcher(native)
    native.installEventFilter(watcher)
    native.destroyed.connect(life.teardown)


class JobWidget(Container):
    """A container with Start / Cancel, a progress bar and a status line.

    Subclasses call :meth:`launch` with a core function taking ``progress`` and ``cancel``;
    connect viewer events with :meth:`connect_viewer` (disconnected when the widget
    closes). While a job runs every widget in ``self._lock_while_running`` is disabled; after
    Cancel they come back when the job's thread has ended (every phase checks the cancel
    flag, so within about a second). Jobs of different widgets are independent.
    """

    #: how the widget is named in messages ("Segment is also running")
    title = "job"
    #: a core setting's name (``MaesilError.option``, ```name``` in its message) -> the
    #: attribute holding this widget's field for it, where the two names differ
    option_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, viewer: Any, start_text: str = "Start") -> None:
        super().__init__(labels=True)
        from qtpy.QtCore import QTimer

        self.viewer = viewer
        self.start_button = PushButton(text=start_text)
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=100, label="Progress")
        self.status = wrapped_label("Status")
        self._lock_while_running: list[Any] = [self.start_button]
        self.last_result: JobResult | None = None
        #: the other widgets' jobs that were running when this widget's job started
        self.also_running: list[str] = []
        self.released_at: float | None = None  #: monotonic time the last job let go of the UI
        self._life = _Lifecycle()
        self._on_progress_cb: Callable[[dict], None] | None = None
        self._on_done_cb: Callable[[Any], Any] | None = None
        self._showing: Iterator[Any] | None = None
        timer = QTimer()
        timer.setInterval(POLL_MS)
        timer.timeout.connect(self._poll)
        self._life.timer = timer
        self.cancel_button.changed.connect(self.cancel)
        _watch_close(self.native, self._life)
        self.connect_viewer(viewer.layers.events.inserted, self.reset_choices)
        self.connect_viewer(viewer.layers.events.removed, self.reset_choices)
        preload()  # torch / MONAI imported in the background while the user fills the form
        self._refresh_when_preloaded()

    def _refresh_when_preloaded(self) -> None:
        """Ask the choices again (the device list: GPUs are known once torch is imported)
        when the background preload is done; polls on the Qt thread, never waits."""
        from qtpy.QtCore import QTimer

        if self._life.closed:
            return
        if preloaded():
            self.reset_choices()
            return
        QTimer.singleShot(200, self._refresh_when_preloaded)

    # ------------------------------------------------------------------ lifecycle
    def connect_viewer(self, emitter: Any, callback: Callable[..., Any]) -> None:
        """``emitter.connect(callback)``, undone when the widget closes (pass bound methods:
        napari holds them weakly, so a closed widget is not kept alive)."""
        emitter.connect(callback)
        self._life.connections.append((emitter, callback))

    def add_mouse_callback(self, callback: Callable[..., Any]) -> None:
        """Append to the viewer's mouse-drag callbacks, removed when the widget closes."""
        self.viewer.mouse_drag_callbacks.append(callback)
        self._life.mouse_callbacks.append((self.viewer.mouse_drag_callbacks, callback))

    def add_plot(self, plot: Any) -> None:
        """Put a :class:`~._plots.CurvePlot` at the bottom; its theme callback is undone on
        close."""
        self.native.layout().addWidget(plot.widget)
        self._life.connections.extend(plot.connections)

    def close_widget(self) -> None:
        """What closing the dock does: cancel the job, disconnect every viewer callback."""
        self._life.teardown()

    @property
    def closed(self) -> bool:
        return self._life.closed

    # ------------------------------------------------------------------ messages
    def field_label(self, option: str) -> str | None:
        """How core setting ``option`` is called in this widget: its field's label (a check
        box's text) in quotes; None when the widget has no field for it."""
        widget = getattr(self, self.option_fields.get(option, option), None)
        if not isinstance(widget, Widget) or not hasattr(widget, "value"):  # a field: FileEdit too
            return None
        text = getattr(widget, "text", "") if isinstance(widget, CheckBox) else widget.label
        return f"“{text}”" if text else None

    def error_text(self, exc: BaseException) -> str:
        """A core error in this widget's words: the settings it names (``--run-dir`` on the
        command line) written as the labels of the fields that hold them."""
        if not isinstance(exc, MaesilError):
            return str(exc)
        return exc.render(lambda name: self.field_label(name) or f"“{name}”")

    def notify_error(self, exc: BaseException | str) -> None:
        """A notification for a user error, in this widget's words (:meth:`error_text`)."""
        notify_error(exc if isinstance(exc, str) else self.error_text(exc))

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        """A job of this widget is running (or finishing after Cancel), or its result is
        still being put in the viewer."""
        return self._life.job is not None or self._showing is not None

    @property
    def job(self) -> Job | None:
        return self._life.job

    def _set_running(self, running: bool) -> None:
        for w in self._lock_while_running:
            w.enabled = not running
        self.cancel_button.enabled = running

    def cancel(self, *_: Any) -> None:
        job = self._life.job
        if job is not None and not job.cancel_event.is_set():
            job.cancel()
            self.cancel_button.enabled = False
            self.status.value = f"stopping ({job.phase})..."

    # ------------------------------------------------------------------ jobs
    def launch(
        self,
        fn: Callable[..., Any],
        *args: Any,
        on_progress: Callable[[dict], None],
        on_done: Callable[[Any], None],
        **kwargs: Any,
    ) -> bool:
        """Run ``fn(*args, progress=, cancel=, **kwargs)`` in a thread of its own.

        ``on_progress(dict)`` and ``on_done(value)`` run on the Qt thread; ``value`` should
        be ready to show (arrays computed in ``fn``). An ``on_done`` that is a generator is
        stepped once per turn of the event loop (yield after each layer it adds), the widget
        counting as running until it ends. A cancelled job's value (a run's checkpoint) is
        delivered too. Returns False if nothing started.
        """
        if self.running or self.closed:
            return False
        from napari.utils import cancelable_progress

        others = sorted({j.owner for j in running_jobs() if j.owner != self.title})
        self.also_running = others
        self.last_result = None
        self._on_progress_cb, self._on_done_cb = on_progress, on_done
        job = Job(fn, *args, owner=self.title, **kwargs)
        self._life.job = job
        self._life.activity = cancelable_progress(total=0, desc=f"{self.title}: starting")
        self._set_running(True)
        if others:
            also = ", ".join(others)
            self.status.value = f"started ({also} also running: they share the CPU/GPU)"
        job.start()
        self._life.timer.start()
        return True

    def _poll(self) -> None:
        job = self._life.job
        if job is None:
            self._life.timer.stop()
            return
        bar = self._life.activity
        if bar is not None and getattr(bar, "is_canceled", False):
            self.cancel()  # Cancel in napari's activity dock
        items = job.poll()
        for item in items:
            if isinstance(item, JobResult):
                self._finish(job, item)
                return
            if self._on_progress_cb is not None:
                self._on_progress_cb(item)
            if job.cancel_event.is_set():
                self.status.value = f"stopping ({job.phase})..."
        if items:
            self._activity(items[-1])

    def _activity(self, info: dict) -> None:
        """napari's activity dock: the same step / total and status text as the widget."""
        bar = self._life.activity
        if bar is None:
            return
        steps = int(info.get("steps") or 0)
        if steps and bar.total != steps:
            bar.total = steps
        step = info.get("step")
        if steps and step is not None:
            bar.update(int(step) - bar.n)
        bar.set_description(f"{self.title}: {self.status.value}")

    def _finish(self, job: Job, result: JobResult) -> None:
        self._life.timer.stop()
        self._life.close_activity()
        self._life.job = None
        self.released_at = time.monotonic()
        self.last_result = result
        if self.closed:
            return
        if result.bug:
            import logging

            logging.getLogger("napari_maesil").error("%s failed:\n%s", self.title, result.bug)
            self.status.value = f"failed: {result.error}"
            notify_error(f"{self.title} failed: {result.error} (a bug: see the log)")
        elif result.error:
            self.status.value = "failed: see the notification"
            self.notify_error(result.exception or result.error)
        elif result.cancelled:
            self.status.value = "cancelled"
            notify_info(f"{self.title}: cancelled.")
        if result.value is not None and not result.error and self._on_done_cb is not None:
            self._set_running(False)  # before on_done, which may launch the next job
            steps = self._on_done_cb(result.value)
            if isinstance(steps, Iterator):  # one layer per turn of the event loop
                self._showing = steps
                self._set_running(True)
                self._show_step()
            return
        self._set_running(False)

    def _show_step(self) -> None:
        """Run one step of an ``on_done`` generator, the next one on the next turn of the
        event loop (each adds a layer: the viewer keeps painting in between)."""
        from qtpy.QtCore import QTimer

        steps = self._showing
        if steps is None:
            return
        try:
            if self.closed:
                raise StopIteration
            next(steps)
        except StopIteration:
            self._showing = None
            if not self.closed and self._life.job is None:
                self._set_running(False)
            return
        QTimer.singleShot(0, self._show_step)
