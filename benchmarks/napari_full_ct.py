"""napari at the size users bring: a 512 x 512 x 400 CT in a real viewer (run under Xvfb).

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/napari_full_ct.py --out /tmp/nfc.json

``--before SRC`` (a ``src`` folder of the code before a change, e.g. ``git archive``d) runs
each scenario of ``--only`` on that code first and then on this checkout, in the same run.

What it measures, each scenario in a fresh process (so imports and peak RSS are its own):

- **open**: ``viewer.open(ct)`` with the plugin's reader, the first time in the process
  (cold: torch / MONAI imports included if the reader triggers them) and a second time
  (warm), beside the reference: decoding the same file with nibabel alone, in the same
  process. Then the longest event-loop stall from the reader's return until the layer is
  complete (a lazily loaded layer) and 2 s after.
- **segment** / **explorer**: the Segment widget (smoke fine-tuned model) and the superpatch
  explorer (*Load model and draw grid*, then *Whole volume*; smoke pretrained model) on that
  CT: wall time, the longest stall while the job runs and from its end until the result
  layer is in the viewer (+ 2 s), and the process's peak RSS (``ru_maxrss``: open + job),
  beside the reference ``maesil segment`` on the same file (time, peak RSS of its process).
- **cancel**: Cancel in every phase of every widget (Segment: model loading / resampling,
  sliding windows; explorer: loading, whole volume; Pretrain: preparing the data, training;
  Fine-tune: preparing, training): seconds from the click until the widget lets go of the UI
  and until the job's thread has ended.
- **close**: ``--close-tries`` fresh processes, each starts a job (cycling over the phases
  above) and closes the main window while it runs; the exit status of each process, and
  whether a run folder holds a half-written file (a temporary file, or a checkpoint without
  its metadata) afterwards.

Stalls are measured by a ``QTimer`` ticking every 50 ms: the longest gap between ticks.
The CT is made at run time by resampling ``../shared/data/chest_ct`` in z (512 x 512 x 61,
5 mm -> 400 slices of 0.76 mm, linear for the CT and nearest for its tumour label); it lives
in ``--work`` (default ``/tmp/napari_full_ct``) and is never committed. The smoke models are
trained there once with the ``maesil`` command (a few steps on ``abdomen_ct``: the figures are
about the viewer, not about the model's quality). The machine load (1-min load average) is
recorded at the start and the end of each scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ct import SHAPE, SHARED, make_full_ct  # noqa: E402

DATA = SHARED
TICK_MS = 50

# ---------------------------------------------------------------------------- inputs (driver)


def make_models(work: Path) -> tuple[Path, Path]:
    """A smoke pretrained run and a smoke segmenter fine-tuned from it (a few steps each)."""
    maesil = str(Path(sys.executable).with_name("maesil"))
    pre, seg = work / "pretrained", work / "segmenter"
    abd = DATA / "abdomen_ct"
    if not list(pre.glob("checkpoints/*.safetensors")):
        subprocess.run(
            [maesil, "pretrain", "--data", str(abd / "ct.nii.gz"), "--out", str(pre),
             "--preset", "smoke", "--steps", "30", "--threads", "1", "--force"],
            check=True,
        )  # fmt: skip
    if not list(seg.glob("checkpoints/*.safetensors")):
        subprocess.run(
            [maesil, "finetune", "--images", str(abd / "ct.nii.gz"), "--labels",
             str(abd / "labels.nii.gz"), "--pretrained", str(pre), "--classes", "liver",
             "spleen", "--steps", "10", "--out", str(seg), "--threads", "1", "--force"],
            check=True,
        )  # fmt: skip
    return pre, seg


def run_child(
    args: list[str], timeout: float = 1800, src: Path | None = None
) -> tuple[int, dict, float]:
    """Run this script as a child (with ``src``: importing ``maesil_core`` and
    ``napari_maesil`` from that ``src`` folder, another version of the code); returns (exit
    status, its RESULT json, its peak RSS GB)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(":")
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    out_lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out_lines.append(line)
            sys.stderr.write("    | " + line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    reader.join(timeout=5)
    code = os.waitstatus_to_exitcode(status)
    result: dict = {}
    for line in out_lines:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    return code, result, usage.ru_maxrss / 1024**2


# ---------------------------------------------------------------------------- in the viewer (child)


class Probe:
    """A viewer with a 50 ms ticker; helpers to wait in the event loop and read stalls."""

    def __init__(self) -> None:
        t0 = time.perf_counter()
        import napari
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication

        self.import_s = time.perf_counter() - t0
        self.napari = napari
        self.viewer = napari.Viewer(show=True)
        self.viewer.window._qt_window.resize(1400, 900)
        self.app = QApplication.instance()
        self.ticks: list[float] = []
        self.notes: list[str] = []  #: what the watched widget said at each tick
        self.watched = None
        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)
        self.timer.start(TICK_MS)
        self.wait(0.5)

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())
        self.notes.append(str(self.watched.status.value) if self.watched is not None else "")

    def where(self, start: float, end: float) -> str:
        """What the watched widget said just before and after the longest gap in [start, end]."""
        idx = [i for i, t in enumerate(self.ticks) if start <= t <= end]
        if len(idx) < 2:
            return ""
        gaps = [self.ticks[i + 1] - self.ticks[i] for i in idx[:-1]]
        i = idx[int(np.argmax(gaps))]
        return f"{self.notes[i]!r} -> {self.notes[i + 1]!r}"

    def wait_until(self, cond, timeout: float = 1800.0, poll_s: float = 0.01) -> bool:
        """Run the event loop until ``cond()`` (False on timeout)."""
        from qtpy.QtCore import QEventLoop

        deadline = time.perf_counter() + timeout
        while not cond():
            if time.perf_counter() > deadline:
                return False
            self.app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
            time.sleep(poll_s)
        return True

    def wait(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        self.wait_until(lambda: time.perf_counter() >= end)

    def stall(self, start: float, end: float) -> float:
        """Longest gap between ticks (or the window's ends) within [start, end], seconds."""
        inside = [t for t in self.ticks if start <= t <= end]
        points = [start, *inside, end]
        return float(np.max(np.diff(points))) if len(points) > 1 else 0.0

    def open(self, path: Path) -> tuple[object, float, float]:
        """Open with the plugin; returns (layer, reader seconds, seconds until complete)."""
        t0 = time.perf_counter()
        layers = self.viewer.open(str(path), plugin="napari-maesil")
        t1 = time.perf_counter()
        layer = layers[0]
        self.wait_until(lambda: not _loading(layer), timeout=600)
        return layer, t1 - t0, time.perf_counter() - t0


def _loading(layer) -> bool:
    return bool((layer.metadata.get("maesil") or {}).get("loading", False))


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1024**3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def job_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("maesil-") and t.is_alive()]


def click(button) -> None:
    button.native.click()


def report(result: dict) -> None:
    result["load_end"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(result), flush=True)


def scenario_open(a) -> None:
    load = os.getloadavg()[0]
    p = Probe()
    import nibabel as nib

    res: dict = {"load_start": load, "import_napari_s": p.import_s}
    for tag in ("cold", "warm"):
        layer, reader_s, ready_s = p.open(a.ct)
        t = time.perf_counter()
        p.wait(2.0)
        res[tag] = {
            "reader_s": reader_s,
            "complete_s": ready_s,
            "stall_after_reader_s": p.stall(t - (ready_s - reader_s), time.perf_counter()),
            "dtype": str(layer.data.dtype),
        }
        p.viewer.layers.clear()
        p.wait(0.5)
    t0 = time.perf_counter()
    np.asanyarray(nib.load(str(a.ct)).dataobj)
    res["reference_decode_s"] = time.perf_counter() - t0
    res["peak_rss_gb"] = peak_rss_gb()
    report(res)


def _open_ready(p: Probe, path: Path):
    layer, _, _ = p.open(path)
    p.wait(1.0)
    return layer


def _job(p: Probe, w, button, result_ready, timeout: float = 1800) -> dict:
    """Click ``button``; wait for the job and its result; stalls during and after."""
    p.watched = w
    t0 = time.perf_counter()
    click(button)
    p.wait_until(lambda: w.running, timeout=5)
    p.wait_until(lambda: not w.running, timeout=timeout)
    t1 = time.perf_counter()
    p.wait_until(result_ready, timeout=600)
    t2 = time.perf_counter()
    p.wait(2.0)
    t3 = time.perf_counter()
    ticks = [t for t in p.ticks if t0 <= t <= t1]
    # the last tick before the job let go: the gap after it holds the result handling
    # when a widget adds its result in the same callback that releases it
    last = ticks[-1] if ticks else t0
    return {
        "job_s": t1 - t0,
        "result_shown_after_s": t2 - t1,
        "stall_during_s": p.stall(t0, last),
        "stall_during_where": p.where(t0, last),
        "stall_at_result_s": p.stall(last, t3),
        "status": str(w.status.value),
        "reference_add_layer_stall_s": reference_add_layer(p),
    }


def reference_add_layer(p: Probe) -> float:
    """The reference: the stall of napari adding a 2 x 2 x 2 Labels layer (and removing
    it), in the same process and moment: napari's own cost, whatever the data."""
    p.wait(0.5)
    t0 = time.perf_counter()
    layer = p.viewer.add_labels(np.zeros((2, 2, 2), np.uint8), name="reference")
    p.wait(0.5)
    p.viewer.layers.remove(layer)
    p.wait(0.5)
    return p.stall(t0, time.perf_counter())


def _open_widget(p: Probe, cls, name: str):
    """Open and dock a widget, then wait (in the event loop) until the core's heavy modules
    have been imported in the background, as they are while a user fills the form; returns
    the widget and what the opening cost the event loop."""
    t0 = time.perf_counter()
    w = cls(p.viewer)
    p.viewer.window.add_dock_widget(w, name=name)
    preload = [t for t in threading.enumerate() if t.name == "preload-maesil-core"]
    p.wait_until(lambda: not any(t.is_alive() for t in preload), timeout=600)
    t1 = time.perf_counter()
    p.wait(0.5)
    return w, {"widget_open_s": t1 - t0, "stall_opening_widget_s": p.stall(t0, t1)}


def _one_widget(a, cls, name: str, checkpoint: Path):
    """A viewer with the full CT open and widget ``cls`` docked and set to it; returns
    ``(probe, widget, figures so far)``."""
    load = os.getloadavg()[0]
    p = Probe()
    ct = _open_ready(p, a.ct)
    rss_open = rss_gb()
    w, opening = _open_widget(p, cls, name)
    w.image.value = ct
    w.checkpoint.value = str(checkpoint)
    return p, w, {"load_start": load, "rss_after_open_gb": rss_open, **opening}


def scenario_segment(a) -> None:
    from napari_maesil._widgets.segment import SegmentWidget

    p, w, res = _one_widget(a, SegmentWidget, "Segment", a.seg)
    w.device.value = "cpu"
    name = f"{w.image.value.name} segmentation"
    res.update(_job(p, w, w.start_button, lambda: name in p.viewer.layers))
    res["peak_rss_gb"] = peak_rss_gb()
    report(res)


def scenario_explorer(a) -> None:
    from napari_maesil._widgets.explorer import ExplorerWidget

    p, w, res = _one_widget(a, ExplorerWidget, "Superpatch explorer", a.pre)
    res["load_grid"] = _job(p, w, w.load_button, lambda: w.grid is not None)
    res["whole_volume"] = _job(p, w, w.whole_button, lambda: "reconstruction" in p.viewer.layers)
    res["peak_rss_gb"] = peak_rss_gb()
    report(res)


def _widgets(p: Probe, a, ct, labels):
    """The four widgets, set up on the full CT (smoke settings), docked."""
    from napari_maesil._widgets.explorer import ExplorerWidget
    from napari_maesil._widgets.finetune import FinetuneWidget
    from napari_maesil._widgets.pretrain import PretrainWidget
    from napari_maesil._widgets.segment import SegmentWidget

    v = p.viewer
    seg = SegmentWidget(v)
    seg.image.value, seg.checkpoint.value, seg.device.value = ct, str(a.seg), "cpu"
    exp = ExplorerWidget(v)
    exp.image.value, exp.checkpoint.value = ct, str(a.pre)
    pre = PretrainWidget(v)
    pre.preset.value = "smoke"
    pre.layers.value = [ct.name]
    pre.steps.value, pre.device.value = 200, "cpu"
    pre.out_dir.value = str(a.work / f"pretrain_job_{os.getpid()}")
    pre.overwrite.value = True
    ft = FinetuneWidget(v)
    ft.image.value = ct
    _fine_tune_labels(ft, labels)
    ft.pretrained.value = str(a.pre)
    ft.steps.value, ft.eval_every.value, ft.device.value = 200, 100, "cpu"
    ft.out_dir.value = str(a.work / f"finetune_job_{os.getpid()}")
    ft.overwrite.value = True
    for w, n in ((seg, "Segment"), (exp, "Explorer"), (pre, "Pretrain"), (ft, "Fine-tune")):
        v.window.add_dock_widget(w, name=n)
    preload = [t for t in threading.enumerate() if t.name == "preload-maesil-core"]
    p.wait_until(lambda: not any(t.is_alive() for t in preload), timeout=600)
    return {"segment": seg, "explorer": exp, "pretrain": pre, "finetune": ft}


def _fine_tune_labels(ft, labels) -> None:
    """The Labels combo box (``labels`` before the rename that issue 14 asks for)."""
    combo = getattr(ft, "labels_layer", None)
    if combo is None or not hasattr(combo, "reset_choices"):
        combo = ft.labels
    combo.reset_choices()
    combo.value = labels


def _progressed(w) -> bool:
    """The job has reached its main phase (windows, tiles or training steps)."""
    return int(w.progress_bar.value or 0) > 0 or bool(getattr(w, "history", None))


#: (widget, phase, the button to click, when to press Cancel)
PHASES = [
    ("segment", "prepare", "start_button", "after 1.5 s"),
    ("segment", "windows", "start_button", "progress"),
    ("explorer", "load", "load_button", "after 1.5 s"),
    ("explorer", "whole volume", "whole_button", "progress"),
    ("pretrain", "prepare", "start_button", "after 1.5 s"),
    ("pretrain", "train", "start_button", "progress"),
    ("finetune", "prepare", "start_button", "after 1.5 s"),
    ("finetune", "train", "start_button", "progress"),
]


def _start_phase(p: Probe, w, phase: tuple) -> str:
    """Start the job of ``phase`` and wait until it is in that phase; returns the status."""
    kind, name, button, when = phase
    if kind == "explorer" and name == "whole volume" and w.grid is None:
        click(w.load_button)
        p.wait_until(lambda: w.running, timeout=5)
        p.wait_until(lambda: not w.running)
    w.progress_bar.value = 0
    if hasattr(w, "history"):
        w.history = []
    click(getattr(w, button))
    p.wait_until(lambda: w.running, timeout=5)
    if when == "progress":
        p.wait_until(lambda: _progressed(w) or not w.running)
    else:
        p.wait(1.5)
    return str(w.status.value)


def scenario_cancel(a) -> None:
    load = os.getloadavg()[0]
    p = Probe()
    ct = _open_ready(p, a.ct)
    labels = _open_ready(p, a.labels)
    widgets = _widgets(p, a, ct, labels)
    rows = []
    for phase in PHASES:
        w = widgets[phase[0]]
        status = _start_phase(p, w, phase)
        if not w.running:
            rows.append({"phase": phase[:2], "error": f"finished before Cancel: {status}"})
            continue
        t0 = time.perf_counter()
        click(w.cancel_button)
        p.wait_until(lambda w=w: not w.running, timeout=600)
        released = time.perf_counter() - t0
        p.wait_until(lambda: not job_threads(), timeout=600)
        ended = time.perf_counter() - t0
        rows.append(
            {
                "phase": phase[:2],
                "status_at_cancel": status,
                "status_after": str(w.status.value),
                "ui_released_s": released,
                "thread_ended_s": ended,
                "stall_s": p.stall(t0, time.perf_counter()),
            }
        )
        p.wait(1.0)
    report({"load_start": load, "phases": rows, "peak_rss_gb": peak_rss_gb()})


def scenario_close(a) -> None:
    """Start the job of phase ``a.phase``, close the main window while it runs, exit."""
    p = Probe()
    ct = _open_ready(p, a.ct)
    labels = _open_ready(p, a.labels)
    phase = PHASES[a.phase % len(PHASES)]
    w = _widgets(p, a, ct, labels)[phase[0]]
    status = _start_phase(p, w, phase)
    running = bool(w.running)
    print("RESULT " + json.dumps({"phase": phase[:2], "status": status, "running": running}))
    sys.stdout.flush()
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, p.viewer.window._qt_window.close)
    p.app.exec()  # returns when the last window is closed, as after a user's click on X


def half_written(folder: Path) -> list[str]:
    """Temporary files left behind, checkpoints without their metadata, resume states
    without their checkpoint, or a ``.safetensors`` that does not open, in ``folder``."""
    from safetensors import safe_open

    bad = []
    if not folder.exists():
        return bad
    for f in folder.rglob("*"):
        if f.name.startswith(".") and f.is_file():
            bad.append(str(f))  # the temporary names of atomic writes
        if f.suffix != ".safetensors":
            continue
        if f.name.endswith(".state.safetensors"):  # step_N.state.safetensors: step_N's
            own = f.with_name(f.name.replace(".state.safetensors", ".safetensors"))
            if not own.is_file():
                bad.append(str(f))
        elif not f.with_suffix(".json").is_file():
            bad.append(str(f))
        try:
            with safe_open(str(f), "np") as st:
                list(st.keys())
        except Exception:
            bad.append(str(f))
    return bad


# ---------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/napari_full_ct"))
    ap.add_argument("--out", type=Path, default=None, help="JSON with every figure")
    ap.add_argument("--close-tries", type=int, default=10)
    ap.add_argument(
        "--only", nargs="*", default=["open", "segment", "explorer", "cancel", "close", "cli"]
    )
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a src folder of the code before a change (e.g. from git archive): each "
        "scenario of --only runs on it first, then on this checkout, in the same run",
    )
    ap.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.ct, a.labels = a.work / "full_ct" / "ct.nii.gz", a.work / "full_ct" / "labels.nii.gz"
    a.pre, a.seg = a.work / "pretrained", a.work / "segmenter"
    if a.scenario:
        {
            "open": scenario_open,
            "segment": scenario_segment,
            "explorer": scenario_explorer,
            "cancel": scenario_cancel,
            "close": scenario_close,
        }[a.scenario](a)
        return
    if not os.environ.get("DISPLAY"):
        sys.exit("run under Xvfb: xvfb-run -a -s '-screen 0 1280x1024x24' python " + __file__)
    a.work.mkdir(parents=True, exist_ok=True)
    make_full_ct(a.work)
    make_models(a.work)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    out: dict = {
        "commit": git.stdout.decode().strip(),
        "ct": {"shape": SHAPE, "bytes_gz": a.ct.stat().st_size},
        "cores": os.cpu_count(),
    }
    common = ["--work", str(a.work)]
    for name in ("open", "segment", "explorer", "cancel"):
        if name in a.only:
            if a.before is not None:  # the same scenario on the code before, just before
                print(f"== {name} (before: {a.before})", file=sys.stderr)
                code, res, peak = run_child(["--scenario", name, *common], src=a.before)
                out[f"{name}_before"] = {"exit": code, "peak_rss_child_gb": peak, **res}
            print(f"== {name}", file=sys.stderr)
            code, res, peak = run_child(["--scenario", name, *common])
            out[name] = {"exit": code, "peak_rss_child_gb": peak, **res}
    if "cli" in a.only:
        print("== cli segment (reference)", file=sys.stderr)
        maesil = str(Path(sys.executable).with_name("maesil"))
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [maesil, "segment", "--checkpoint", str(a.seg), "--input", str(a.ct),
             "--out", str(a.work / "cli_seg.nii.gz"), "--force"]
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        out["cli_segment"] = {
            "exit": os.waitstatus_to_exitcode(status),
            "s": time.perf_counter() - t0,
            "peak_rss_gb": usage.ru_maxrss / 1024**2,
        }
    if "close" in a.only:
        tries = []
        for i in range(a.close_tries):
            print(f"== close {i + 1}/{a.close_tries}", file=sys.stderr)
            code, res, _ = run_child(["--scenario", "close", "--phase", str(i), *common], 900)
            left = half_written(a.work) if code == 0 else []
            tries.append({"exit": code, **res, "half_written": left})
        out["close"] = {
            "tries": tries,
            "exit_0": sum(t["exit"] == 0 for t in tries),
            "n": len(tries),
        }
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
