"""Running ``maesil_core`` jobs off the Qt thread (nothing here touches Qt).

A :class:`Job` runs ``fn(*args, progress=..., cancel=..., **kwargs)`` in its own thread
(named ``maesil-<owner>``): the core call reports through ``progress(dict)`` and stops when
its ``cancel`` Event is set. The widget that owns the job drains :meth:`Job.poll` from a Qt
timer on the main thread, so progress dicts and the final :class:`JobResult` arrive there;
the result is whatever ``fn`` returned, already in the shape the viewer needs (array work
belongs in ``fn``, not in the Qt thread).

Jobs are independent: each widget runs its own, and :func:`running_jobs` says what runs
where. When the process exits (the viewer window closed, a script ending) every job is
asked to stop and joined before the interpreter shuts down, so no thread is left inside
torch or a file write at exit.

User errors (:class:`~maesil_core.errors.MaesilError`) become ``JobResult.error`` (the widget
shows a notification); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: at exit, how long to wait for each job to reach its next cancellation check
STOP_AT_EXIT_S = 120.0

_jobs: list[Job] = []
_jobs_lock = threading.Lock()


@dataclass
class JobResult:
    """What a job ended with: ``value`` or an ``error`` message; ``cancelled`` if stopped."""

    value: Any = None
    error: str | None = None
    cancelled: bool = False
    bug: str | None = None  #: traceback of an unexpected exception
    #: the MaesilError behind ``error``: a widget renders the settings it names as its fields
    exception: BaseException | None = None


class Job:
    """One core call in its own thread, with a cancel Event and a progress queue.

    Args:
        fn: called as ``fn(*args, progress=put, cancel=event, **kwargs)``.
        owner: who started it (a widget title), for :func:`running_jobs` and the thread name.
        after_preload: first wait for :func:`preload`'s imports (MONAI's import is not
            thread-safe: two threads importing it at once can see a half-made module).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        owner: str,
        after_preload: bool = True,
        **kwargs: Any,
    ) -> None:
        self.owner = owner
        self.after_preload = after_preload
        self.cancel_event = threading.Event()
        self.phase = "starting"
        self.result: JobResult | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._call = (fn, args, kwargs)
        self.thread = threading.Thread(target=self._run, name=f"maesil-{owner}", daemon=True)

    def start(self) -> Job:
        with _jobs_lock:
            _jobs[:] = [j for j in _jobs if j.alive] + [self]
        self.thread.start()
        return self

    def _progress(self, info: dict[str, Any]) -> None:
        phase = info.get("message") or info.get("phase")
        if phase:
            self.phase = str(phase)
        self._queue.put(info)

    def _run(self) -> None:
        from maesil_core.errors import Cancelled, MaesilError

        fn, args, kwargs = self._call
        if self.after_preload:
            wait_for_preload()
        try:
            value = fn(*args, progress=self._progress, cancel=self.cancel_event, **kwargs)
            cancelled = self.cancel_event.is_set() or bool(getattr(value, "cancelled", False))
            result = JobResult(value=value, cancelled=cancelled)
        except Cancelled:
            result = JobResult(cancelled=True)
        except MaesilError as exc:
            result = JobResult(error=str(exc), cancelled=self.cancel_event.is_set(), exception=exc)
        except BaseException as exc:  # a bug: keep the traceback for the log
            result = JobResult(error=f"{type(exc).__name__}: {exc}", bug=traceback.format_exc())
        self.result = result
        self._queue.put(result)

    def poll(self) -> list[Any]:
        """Everything reported since the last call: progress dicts, then the JobResult."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended."""
        if self.thread.ident is not None:
            self.thread.join(timeout)
        return not self.alive


def running_jobs() -> list[Job]:
    """Jobs whose thread is still running (finishing a cancelled step included)."""
    with _jobs_lock:
        return [j for j in _jobs if j.alive]


def busy() -> bool:
    """True while any job thread is alive."""
    return bool(running_jobs())


def cancel_all(wait_s: float = 0.0) -> bool:
    """Ask every job to stop (viewer closing, process exit, tests); wait up to ``wait_s``.

    Returns True when no job thread is left.
    """
    import time

    jobs = running_jobs()
    for job in jobs:
        job.cancel()
    deadline = time.monotonic() + wait_s
    for job in jobs:
        job.join(max(0.0, deadline - time.monotonic()))
    return not busy()


#: what every job imports first (torch, MONAI: seconds): :func:`preload` imports it early
PRELOAD_MODULES = ("maesil_core.api", "maesil_core.segmentation", "maesil_core.inference")
_preload: list[threading.Thread] = []


def preload() -> None:
    """Import the core's heavy modules in a background thread, once per process (called
    when a widget opens), so a job's first phase neither waits for them nor ignores Cancel
    while they load. Nothing on the Qt thread imports them."""
    with _jobs_lock:
        if _preload:
            return

        def run() -> None:
            import importlib

            for name in PRELOAD_MODULES:
                try:
                    importlib.import_module(name)
                except Exception:  # a job importing it will report the problem
                    return
            set_job_threads()
            _find_gpus()

        thread = threading.Thread(target=run, name="preload-maesil-core", daemon=True)
        _preload.append(thread)
        thread.start()  # under the lock: preloaded() never sees it added and not started


#: ``(name, device)`` of each CUDA GPU, found by the preload (CUDA's start-up is seconds:
#: not on the Qt thread); read by the widgets' device lists
GPUS: list[tuple[str, str]] = []


def _find_gpus() -> None:
    try:
        import torch

        GPUS[:] = [
            (f"GPU {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}")
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # a broken CUDA install must not break the widgets
        GPUS[:] = []


def set_job_threads() -> None:
    """torch's CPU threads for the jobs that do not choose their own (Segment, the explorer;
    training chooses per run: ``maesil_core.threads``): one core fewer than this process may
    use (at least one), so the viewer keeps a core; ``OMP_NUM_THREADS`` wins. More threads
    than free cores make each wait on the others."""
    import os

    import torch

    from maesil_core.threads import usable_cores

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cores() - 1))


def preloaded() -> bool:
    """Whether :func:`preload` ran and has finished (torch is then fully imported or failed)."""
    with _jobs_lock:
        return bool(_preload) and not any(t.is_alive() for t in _preload)


def wait_for_preload() -> None:
    """Until :func:`preload`'s imports are done (at once if it never ran or has finished)."""
    for thread in list(_preload):
        thread.join()


def _stop_at_exit() -> None:
    # runs before the interpreter tears down: a daemon thread still inside torch (or a
    # checkpoint write, or an import) when Python finalises is what aborted the process
    # ("terminate called without an active exception", exit 134)
    cancel_all(wait_s=STOP_AT_EXIT_S)
    for thread in _preload:
        thread.join(STOP_AT_EXIT_S)


atexit.register(_stop_at_exit)
