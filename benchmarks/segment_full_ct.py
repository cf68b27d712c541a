"""A whole CT at the size users bring: ``maesil segment`` (and ``reconstruct``) time and memory.

The CT is 512 x 512 x 400 voxels, made at run time from ``../shared/data/chest_ct`` by
resampling in z (:mod:`full_ct`; never committed). Each setting runs the real command line
(``python -m maesil_core.cli segment ...``) in its own process, so its wall time includes
everything a user waits for (start-up, reading the .nii.gz, resampling, the sliding windows,
mapping back to the input grid, writing the label map) and its peak memory is that process's
peak RSS (``os.wait4``). Settings are run in interleaved rounds (a busy machine cannot favour
the first); the median time and the largest peak count. The first setting is the reference
the others are compared with.

The models: ``--checkpoint`` (a fine-tuned segmentation run), else a segmenter of
``--preset`` trained for ``--train-steps`` steps on ``abdomen_ct`` (liver, spleen) in the work
folder, made once: the figures are about speed and memory, not about the model's quality.
``reconstruct`` (``--commands``) uses a ``--preset`` pretraining run made the same way.

    python benchmarks/segment_full_ct.py --device cpu --sw-batch-size 4 16 --out seg_cpu.json
    python benchmarks/segment_full_ct.py --device cuda --preset base --precision fp32 bf16 \\
        --sw-batch-size 4 16 --overlap 0.25 0.5

Options a command does not have are not passed (None); ``--extra`` passes more flags as they
are.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ct import SHARED, make_full_ct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def maesil(*args: str) -> list[str]:
    """The ``maesil`` command of this checkout, whatever is installed."""
    return [sys.executable, "-m", "maesil_core.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall seconds, exit status and peak RSS of its process."""
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env())
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    return {"wall_s": wall, "exit": code, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def train_once(cmd: list[str], log: Path) -> None:
    """Run a training command of the work folder's models; exit with its log's name if it fails."""
    if run_measured(cmd, log)["exit"]:
        raise SystemExit(f"training a model to time failed: see {log}")


def ensure_models(args, work: Path) -> dict[str, Path]:
    """The segmentation (and pretraining) checkpoints to time, trained once when not given."""
    abdomen = SHARED / "abdomen_ct"
    common = ["--preset", args.preset, "--steps", str(args.train_steps), "--force"]
    common += ["--device", args.device]
    models: dict[str, Path] = {}
    if "segment" in args.commands:
        seg = Path(args.checkpoint) if args.checkpoint else work / f"seg_{args.preset}"
        if not args.checkpoint and not (seg / "best.safetensors").exists():
            images = ["--images", str(abdomen / "ct.nii.gz")]
            labels = ["--labels", str(abdomen / "labels.nii.gz"), "--classes", "liver", "spleen"]
            cmd = maesil("finetune", *images, *labels, "--out", str(seg), *common)
            train_once(cmd, work / f"train_seg_{args.preset}.log")
        models["segment"] = seg
    if "reconstruct" in args.commands:
        pre = Path(args.pretrained) if args.pretrained else work / f"pre_{args.preset}"
        if not args.pretrained and not any(pre.glob("step_*.safetensors")):
            cmd = maesil("pretrain", "--data", str(abdomen / "ct.nii.gz"), "--out", str(pre))
            train_once(cmd + common, work / f"train_pre_{args.preset}.log")
        models["reconstruct"] = pre
    return models


def command_for(name: str, setting: dict, model: Path, ct: Path, out: Path, args) -> list[str]:
    flags = ["--device", args.device]
    if name == "segment":
        cmd = ["segment", "--checkpoint", str(model), "--input", str(ct)]
        cmd += ["--out", str(out / "seg.nii.gz"), "--force"]
        for key, flag in (
            ("sw_batch_size", "--sw-batch-size"),
            ("overlap", "--overlap"),
            ("precision", "--precision"),
        ):
            if setting.get(key) is not None:
                flags += [flag, str(setting[key])]
    else:
        cmd = ["reconstruct", "--checkpoint", str(model), "--input", str(ct)]
        cmd += ["--out", str(out / "recon"), "--force"]
        if setting.get("precision") is not None:
            flags += ["--precision", str(setting["precision"])]
    return maesil(*cmd, *flags, *args.extra)


def summarise(settings: list[dict], runs: list[list[dict]]) -> list[dict]:
    """Per setting: the median wall time of its successful runs, its largest peak RSS."""
    results = []
    for s, rs in zip(settings, runs):
        ok = [r for r in rs if r["exit"] == 0]
        results.append(
            {
                **s,
                "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                "wall_s_rounds": [r["wall_s"] for r in rs],
                "peak_rss_gb": max((r["peak_rss_gb"] for r in rs), default=None),
                "exits": [r["exit"] for r in rs],
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/segment_full_ct"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--commands", nargs="+", choices=["segment", "reconstruct"], default=["segment"]
    )
    ap.add_argument("--checkpoint", help="segmentation run or .safetensors (default: train one)")
    ap.add_argument("--pretrained", help="pretraining run for reconstruct (default: train one)")
    ap.add_argument("--preset", default="smoke", help="preset of the models trained here")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--sw-batch-size", type=int, nargs="+", default=[None])
    ap.add_argument("--overlap", type=float, nargs="+", default=[None])
    ap.add_argument("--precision", nargs="+", default=[None], help="fp32 / bf16 / auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--slices", type=int, default=400, help="z slices of the CT (400; fewer: a smoke test)"
    )
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags, as given")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ct, _ = make_full_ct(args.work, slices=args.slices)
    made_s = time.perf_counter() - t
    models = ensure_models(args, args.work)
    settings = [
        {"command": c, "sw_batch_size": b, "overlap": o, "precision": p}
        for c in args.commands
        for b, o, p in itertools.product(args.sw_batch_size, args.overlap, args.precision)
        if c == "segment" or (b is None and o is None)
    ]
    if "reconstruct" in args.commands:  # reconstruct has neither windows' batch nor overlap
        settings += [
            {"command": "reconstruct", "sw_batch_size": None, "overlap": None, "precision": p}
            for p in args.precision
            if not any(s["command"] == "reconstruct" and s["precision"] == p for s in settings)
        ]
    meta = {
        "ct": str(ct),
        "ct_shape": [512, 512, args.slices],
        "made_s": made_s,
        "device": args.device,
        "cpus": os.cpu_count(),
        "load_avg_1min": [os.getloadavg()[0]],
        "rounds": args.rounds,
        "models": {k: str(v) for k, v in models.items()},
        "preset": args.preset,
    }
    runs: list[list[dict]] = [[] for _ in settings]
    for round_ in range(args.rounds):
        for i, s in enumerate(settings):
            out = args.work / f"out_{i}"
            out.mkdir(exist_ok=True)
            cmd = command_for(s["command"], s, models[s["command"]], ct, out, args)
            r = run_measured(cmd, args.work / f"run_{i}_{round_}.log")
            if r["exit"]:
                tail = (args.work / f"run_{i}_{round_}.log").read_text()[-800:]
                print(f"{' '.join(cmd)}\nexited {r['exit']}:\n{tail}", file=sys.stderr)
            runs[i].append(r)
            print(
                f"round {round_ + 1}: {s}: {r['wall_s']:.1f} s, peak RSS "
                f"{r['peak_rss_gb']:.2f} GB, exit {r['exit']}",
                flush=True,
            )
            results = summarise(settings, runs)
            if args.out:  # after every run: a step cut short by a timeout keeps what it did
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    meta["load_avg_1min"].append(os.getloadavg()[0])
    results = summarise(settings, runs)
    ref = results[0]["wall_s"]
    lines = [
        "| command | windows per pass | overlap | precision | wall (s) | vs first row | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = "" if not (r["wall_s"] and ref) else f"{ref / r['wall_s']:.2f}x speed"
        lines.append(
            f"| {r['command']} | {r['sw_batch_size'] or 'default'} | {r['overlap'] or 'default'} "
            f"| {r['precision'] or 'default'} | {r['wall_s'] or float('nan'):.1f} | {rel} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    lines.append("")
    load = meta["load_avg_1min"]
    lines.append(
        f"CT 512 x 512 x {args.slices} ({ct}, made in {made_s:.1f} s); device {args.device}; "
        f"{os.cpu_count()} CPUs, load {load[0]:.1f} -> {load[1]:.1f}; models: "
        + ", ".join(f"{k} {v}" for k, v in models.items())
    )
    print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(0 in r["exits"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
