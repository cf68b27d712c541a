"""One ``maesil`` command timed at two (or more) versions of the code, interleaved, so that
"before" and "after" share the machine's load: the ratio is the figure, not the seconds.

    git worktree add /tmp/before f19e8e7           # the code before a change
    python benchmarks/compare_commits.py --trees before=/tmp/before/src after=src \\
        --rounds 3 -- pretrain --preset small --steps 12 --data ../shared/data/chest_ct \\
        --out {out} --force --workers 0

Every round runs ``python -m maesil_core ARGS`` once per tree, in turn (the order alternates
between rounds), with ``PYTHONPATH`` set to the tree and ``OMP_NUM_THREADS`` to ``--threads``;
``{out}`` in ARGS becomes a fresh folder per run. Reported per tree: the median wall time of
the whole command (import, data, steps, checkpoint: what a user waits), its spread, and the
peak RSS of the process (``ru_maxrss`` of the finished child); then each tree's time as a
ratio to the first tree's. ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(src: Path, args: list[str], threads: int, workdir: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -m maesil_core ARGS`` with ``src`` first
    on the path. A failing command stops the benchmark with its stderr."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    argv = [a.replace("{out}", str(out / "run")) for a in args]
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONWARNINGS": "ignore",
    }
    err_path = out / "stderr.txt"
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "maesil_core", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: this child's own peak RSS
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{src}: maesil {' '.join(argv)} failed:\n{err_path.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024.0  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs="+", required=True, help="NAME=SRC_FOLDER, first = reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the maesil command")
    ns = ap.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in ns.trees]
    times: dict[str, list[float]] = {name: [] for name, _ in trees}
    peaks: dict[str, list[float]] = {name: [] for name, _ in trees}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ns.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for name, src in order:
                seconds, peak = run_once(src, args, ns.threads, Path(tmp))
                times[name].append(seconds)
                peaks[name].append(peak)
                print(f"round {r + 1} {name:<10} {seconds:8.1f} s  peak RSS {peak:7.0f} MiB")
    ref = statistics.median(times[trees[0][0]])
    print(
        f"\nmaesil {' '.join(args)}  ({ns.rounds} rounds, {ns.threads} thread(s), "
        f"load average at start {load:.1f})"
    )
    print("| code | median s | min-max s | peak RSS MiB | time / " + trees[0][0] + " |")
    print("|---|---|---|---|---|")
    result = {"args": args, "rounds": ns.rounds, "threads": ns.threads, "load": load, "trees": {}}
    for name, src in trees:
        med = statistics.median(times[name])
        print(
            f"| {name} | {med:.1f} | {min(times[name]):.1f}-{max(times[name]):.1f} | "
            f"{max(peaks[name]):.0f} | {med / ref:.2f}x |"
        )
        result["trees"][name] = {"src": str(src), "seconds": times[name], "peak_mib": peaks[name]}
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
