"""The shared real CT for benchmarks, and the CT size users bring, made at run time: 512 x 512 x
400 voxels from the shared chest CT.

``../shared/data/chest_ct`` (512 x 512 x 61, 0.63 x 0.63 x 5 mm) resampled in z to 400 slices
of 0.76 mm (linear for the CT, nearest for its tumour label), slice by slice, with the
affine's z column scaled to match: the same patient, the same in-plane grid, a full-size
volume (117 MB as .nii.gz). Written once into a work folder and reused; never committed.

    from full_ct import make_full_ct
    ct, labels = make_full_ct(Path("/tmp/full_ct"))

Run as a script, it is the full-size benchmark of the commands that take a whole CT: time,
peak RSS and output size of ``maesil reconstruct``, ``maesil segment`` and ``maesil evaluate``
on that CT (BENCHMARKS.md, "Full-size CT"). A full-size figure of another command belongs
here too (a ``--only`` choice), not in a new script::

    python benchmarks/full_ct.py --before ../before/src --json full_ct.json  # ~30 min, 2 cores
    python benchmarks/full_ct.py --slices 40                                 # smoke run

How it measures, each command in its own process (``os.wait4`` gives its peak RSS,
``ru_maxrss``, also for one the kernel killed), one torch thread, nice'd:

1. **Models**, made once in ``--work`` with this checkout (smoke preset, a few steps: what a
   command costs does not depend on how well the model is trained): a MAESIL pretraining
   run on ``abdomen_ct`` and a segmenter fine-tuned from it on the full-size CT with ten
   classes: the real tumour label of ``chest_ct`` and nine HU bands of the same CT (lung,
   fat, soft tissue, bone, ...). Made-up organs, but a label map of the size and class count
   a user brings, which is what ``evaluate``'s memory depends on (a one-hot of it is 11 x
   the volume).
2. **Commands**: ``reconstruct`` (pretraining run), ``segment`` and ``evaluate`` (Dice and
   HD95 of the ten classes) on the full-size CT, ``--force`` into ``--work``.
3. **Before / after, same run**: with ``--before SRC`` (an older checkout's ``src/``, put
   first on ``PYTHONPATH``) every command runs with that code and then with this checkout,
   one after the other, and the table gives after / before ratios. ``--skip-before
   evaluate`` leaves out a "before" that would not fit in the machine's memory.
4. **Reference, same run**: reading the CT (``load_volume``, imports included) in its own
   process, per checkout; its time and peak RSS (the float32 volume, 400 MiB, plus the
   interpreter) are the unit, so figures from machines under other loads can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: the shared real CT: ``$MAESIL_DATA`` when set (a machine without ``../shared``, e.g. a
#: copy carried to a GPU machine), else ``../shared/data`` beside the repository
SHARED = Path(
    os.environ.get("MAESIL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
#: the four scans pretraining benchmarks train on (DICOM series and a scan not in HU included)
PRETRAIN_DATA = [
    SHARED / "abdomen_ct" / "ct.nii.gz",
    SHARED / "chest_ct" / "ct.nii.gz",
    SHARED / "dicom_ct",
    SHARED / "head_ct" / "ct_not_hu.nii.gz",
]
SHAPE = (512, 512, 400)
Z_SPACING = 0.76  #: mm between the made slices (5 mm x 61 slices = 305 mm of patient)


def make_full_ct(
    work: Path, source: Path | None = None, slices: int = SHAPE[2]
) -> tuple[Path, Path]:
    """``(ct, labels)``: ``work/full_ct/ct.nii.gz`` and ``labels.nii.gz``, made once.

    ``slices`` other than 400 (a smoke test) spreads the same 305 mm over that many slices.
    """
    import nibabel as nib

    src = source or SHARED / "chest_ct"
    shape = (SHAPE[0], SHAPE[1], int(slices))
    z_spacing = Z_SPACING * SHAPE[2] / shape[2]
    folder = work / ("full_ct" if shape == SHAPE else f"full_ct_{shape[2]}")
    ct_out, lab_out = folder / "ct.nii.gz", folder / "labels.nii.gz"
    if ct_out.is_file() and lab_out.is_file() and nib.load(str(ct_out)).shape == shape:
        return ct_out, lab_out
    ct_out.parent.mkdir(parents=True, exist_ok=True)
    for name, out, linear in (("ct.nii.gz", ct_out, True), ("labels.nii.gz", lab_out, False)):
        img = nib.load(str(src / name))
        arr = np.asanyarray(img.dataobj)
        old_z = float(np.linalg.norm(img.affine[:3, 2]))
        zs = np.minimum(np.arange(shape[2]) * z_spacing / old_z, arr.shape[2] - 1)
        made = np.empty(shape, dtype=arr.dtype)
        for k, z in enumerate(zs):  # slice by slice: bounded memory
            lo = int(np.floor(z))
            hi, w = min(lo + 1, arr.shape[2] - 1), z - lo
            if linear:
                mix = (1 - w) * arr[..., lo].astype(np.float32) + w * arr[..., hi]
                made[..., k] = np.rint(mix).astype(arr.dtype)
            else:
                made[..., k] = arr[..., lo if w < 0.5 else hi]
        affine = img.affine.copy()
        affine[:3, 2] *= z_spacing / old_z
        tmp = out.with_name("." + out.name)
        nib.save(nib.Nifti1Image(made, affine), str(tmp))
        tmp.replace(out)
    return ct_out, lab_out


#: the made-up classes of :func:`make_ten_classes`: id -> (name, HU band [low, high))
HU_BANDS = {
    1: ("lung", (-950, -700)),
    2: ("lung_edge", (-700, -400)),
    3: ("low_density", (-400, -150)),
    4: ("fat", (-150, -30)),
    5: ("fluid", (-30, 20)),
    6: ("soft_tissue", (20, 80)),
    7: ("enhanced", (80, 200)),
    8: ("trabecular_bone", (200, 600)),
    9: ("cortical_bone", (600, 4000)),
}
TUMOUR = 10


def make_ten_classes(ct: Path, tumour: Path) -> Path:
    """``labels10.nii.gz`` beside ``ct`` (uint8, its grid): the nine :data:`HU_BANDS` of the CT
    and the real tumour label as class 10, with a ``label_names.json``; made once."""
    import nibabel as nib

    out = ct.with_name("labels10.nii.gz")
    names = out.with_name("label_names.json")
    if out.is_file() and names.is_file():
        return out
    img = nib.load(str(ct))
    hu = np.asanyarray(img.dataobj)
    lab = np.zeros(hu.shape, dtype=np.uint8)
    for cid, (_, (low, high)) in HU_BANDS.items():
        lab[(hu >= low) & (hu < high)] = cid
    lab[np.asanyarray(nib.load(str(tumour)).dataobj) > 0] = TUMOUR
    tmp = out.with_name(".labels10.nii.gz")
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp))
    tmp.replace(out)
    table = {str(k): v[0] for k, v in HU_BANDS.items()} | {str(TUMOUR): "tumour"}
    names.write_text(json.dumps(table, indent=1))
    return out


# --------------------------------------------------------------------------- measuring


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if src is not None:  # another checkout's code, e.g. the commit before a change
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` nice'd in its own process: wall seconds, peak RSS (MiB), exit status
    (negative: the signal that ended it, -9 for the kernel's out-of-memory killer)."""
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["nice", "-n", "5", *cmd], stdout=f, stderr=f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "exit": proc.returncode,
    }


def _size_mib(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 2**20, 1)


def commands(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Make the CT and the models (once, with this checkout); the command lines to measure."""
    maesil = [sys.executable, "-m", "maesil_core"]
    ct, tumour = make_full_ct(work, slices=args.slices)
    labels = make_ten_classes(ct, tumour)
    runs = work / f"runs_{args.slices}"
    runs.mkdir(exist_ok=True)
    pre, seg = runs / "pre", runs / "seg"
    common = ["--preset", "smoke", "--threads", "1", "--force"]
    if not (pre / "checkpoints").is_dir():
        measure(
            [*maesil, "pretrain", "--data", str(SHARED / "abdomen_ct" / "ct.nii.gz")]
            + ["--out", str(pre), "--steps", "10", *common],
            env,
            runs / "pretrain.log",
        )
    if not (seg / "checkpoints").is_dir():
        measure(
            [*maesil, "finetune", "--images", str(ct), "--labels", str(labels)]
            + ["--pretrained", str(pre), "--out", str(seg), "--steps", "10", *common],
            env,
            runs / "finetune.log",
        )
    read = (
        "import sys; from maesil_core.data import load_volume; v = load_volume(sys.argv[1]); "
        "print(v.array.shape, v.array.dtype)"
    )
    out = runs / "outputs"
    out.mkdir(exist_ok=True)
    cmds = {"read the CT (reference)": [sys.executable, "-c", read, str(ct)]}
    if "reconstruct" in args.only:
        cmds["reconstruct"] = [*maesil, "reconstruct", "--checkpoint", str(pre), "--input"]
        cmds["reconstruct"] += [str(ct), "--out", str(out / "recon"), "--force", "--threads", "1"]
    if "segment" in args.only:
        cmds["segment"] = [*maesil, "segment", "--checkpoint", str(seg), "--input", str(ct)]
        cmds["segment"] += ["--out", str(out / "seg.nii.gz"), "--force"]
    if "evaluate" in args.only:
        cmds["evaluate"] = [*maesil, "evaluate", "--checkpoint", str(seg), "--images", str(ct)]
        cmds["evaluate"] += ["--labels", str(labels), "--csv", str(out / "eval.csv"), "--force"]
    return cmds


def outputs_of(name: str, cmd: list[str]) -> list[Path]:
    """The files a command wrote (from its --out / --csv)."""
    if name == "reconstruct":
        return sorted(Path(cmd[cmd.index("--out") + 1]).glob("*.nii.gz"))
    if name == "segment":
        target = Path(cmd[cmd.index("--out") + 1])
        return [target, target.with_name(target.name.replace(".nii.gz", ".json"))]
    return []


def run_commands(args: argparse.Namespace) -> dict:
    """Each command with each checkout (``--before`` first, then this one), in its own
    process, one after the other in that order for every command: the figures as a dict."""
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    versions = {"after": _env(None)}
    if args.before:
        versions = {"before": _env(args.before.resolve()), **versions}
    cmds = commands(args, work, versions["after"])
    ct = Path(cmds["read the CT (reference)"][-1])
    results: dict[str, dict[str, dict]] = {v: {} for v in versions}
    for name, cmd in cmds.items():
        if name in args.skip_before and "before" in versions:
            results["before"][name] = {"skipped": True}
        for version, env in versions.items():
            if version == "before" and name in args.skip_before:
                continue
            r = measure(cmd, env, work / f"{version}_{name.split()[0]}.log")
            files = outputs_of(name, cmd)
            if files:
                r["output_mib"] = _size_mib(files)
            results[version][name] = r
    return {
        "shape": [SHAPE[0], SHAPE[1], args.slices],
        "input_mib": _size_mib([ct]),
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }


def table(figures: dict) -> str:
    """The Markdown table of one run's figures: each checkout's time and peak RSS (also as a
    ratio to reading the CT in the same run), outputs against the input, after / before."""
    lines = [
        f"CT {' x '.join(map(str, figures['shape']))} ({figures['input_mib']} MiB .nii.gz), "
        f"load average {figures['load_average'][0]:.1f} on {figures['cores']} cores, one "
        "torch thread",
        "",
        "| command | code | wall (s) | x reading | peak RSS (MiB) | x reading | outputs (MiB) "
        "| x input | after / before: time, RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    res = figures["results"]
    for name in res["after"]:
        for version in res:
            r, ref = res[version][name], res[version]["read the CT (reference)"]
            if r.get("skipped"):
                lines.append(f"| {name} | {version} | not run | | | | | | |")
                continue
            died = "" if r["exit"] == 0 else f" (exit {r['exit']})"
            outs = r.get("output_mib")
            size = "| " if outs is None else f"{outs} | {outs / figures['input_mib']:.2f}"
            ratio = ""
            b = res.get("before", {}).get(name)
            if version == "after" and b and not b.get("skipped"):
                ratio = (
                    f"{r['wall_s'] / b['wall_s']:.2f}, {r['peak_rss_mib'] / b['peak_rss_mib']:.2f}"
                )
            lines.append(
                f"| {name}{died} | {version} | {r['wall_s']:.1f} | "
                f"{r['wall_s'] / ref['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f} | {size} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="time, peak RSS and outputs of the commands on a full-size CT"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/maesil_full_ct"))
    ap.add_argument("--slices", type=int, default=SHAPE[2], help="z size (400: the full size)")
    ap.add_argument(
        "--before", type=Path, help="another checkout's src/ folder, measured beside this one"
    )
    ap.add_argument(
        "--skip-before", nargs="*", default=[], help="commands not to run with --before"
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument(
        "--only", nargs="+", default=["reconstruct", "segment", "evaluate"], help="commands"
    )
    args = ap.parse_args(argv)
    figures = run_commands(args)
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return (
        0
        if all(r.get("exit", 0) == 0 for v in figures["results"].values() for r in v.values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
