"""Label efficiency: does pretraining help when labelled scans are few, and which method?

Fine-tunes a segmenter from (a) an encoder pretrained by each method of ``--methods``
(maesil, mae, simmim, gl-mae, ae, vae, vq-vae), (b) a randomly initialised encoder
("scratch", always run), with 1, 2 and all 3 labelled training volumes, the same steps, seeds
and settings, and scores liver / spleen / stomach on a held-out volume.

Every method is pretrained here on the same volumes, for the same ``--pretrain-steps``, with
the same seed (``--pretrain-seed``) and the preset's batch and learning rate. The ViT methods
(maesil, mae, simmim, gl-mae) all use the preset's encoder (smoke: width 96, depth 4, 3 heads,
8^3 patches, 32^3 superpatch) and are fine-tuned with the same UNETR decoder, so their rows
differ only in the pretraining objective. The conv autoencoders (ae, vae, vq-vae) have a conv
encoder; they are fine-tuned with :class:`ConvAESegmenter` (pretrained encoder and decoder,
zero-initialised skips, the same full-resolution head as UNETR), and compared with their own
random-init reference "scratch-conv" (the same conv segmenter, no pretraining), added whenever
a conv method is in ``--methods``.

Data (real CT from ``../shared/data``, labels = TotalSegmentator output, ids 5 liver,
1 spleen, 6 stomach). There are only two labelled scans, so volumes are cut from them:

* held-out test volume: ``abdomen_ct`` axial slices 10-19 (the middle 30 mm), never trained on,
  not even in pretraining;
* training volume 1: ``abdomen_ct`` slices 20-29; volume 2: ``dicom_ct`` (another patient, the
  DICOM series with its LAS label map resampled onto it in world coordinates); volume 3:
  ``abdomen_ct`` slices 0-9. "1 labelled" uses volume 1, "2" volumes 1-2, "all" 1-3;
* pretraining (no labels): ``abdomen_ct`` slices 0-9 and 20-29, ``dicom_ct`` and ``chest_ct``.

Everything is resampled to the preset's spacing (3 mm for smoke); crops of ``--roi`` voxels
(default 48x48x8, i.e. 144 x 144 x 24 mm: the slabs are only 10 slices thin, and a window no
thicker than a slab keeps training crops and whole-CT inference windows free of padding) are
drawn around the labels; the pretraining superpatch (32^3) differs, so the encoder's position
embedding is recomputed for the fine-tuning grid (6 x 6 x 1 patches). The test volume is scored
every ``--eval-every`` steps (sliding window); the table reports the final step (no checkpoint
picking on the test volume) and the first step at which the liver Dice reached
``--threshold`` (0.7).

    OMP_NUM_THREADS=1 python benchmarks/label_efficiency.py --workers 1        # all methods, CPU
    python benchmarks/label_efficiency.py --methods maesil                     # MAESIL vs scratch
    python benchmarks/label_efficiency.py --pretrained runs/ct runs/ae         # reuse runs
    python benchmarks/label_efficiency.py --preset base --device cuda --steps 2000 --pretrain-steps 20000 --seeds 0 1 2

Writes ``--out`` (default ``runs/label_efficiency``): the cut volumes, the runs,
``results.json``, ``label_efficiency.png``, and the table into ``RESULTS.md``
(section "## Label efficiency", replaced on each run; ``--no-results`` to skip).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ORGANS = {"liver": [5], "spleen": [1], "stomach": [6]}
SIZES = (1, 2, 3)
METHODS = ("maesil", "mae", "simmim", "gl-mae", "ae", "vae", "vq-vae")
CONV = ("ae", "vae", "vq-vae")


def arms(methods: list[str]) -> list[str]:
    """Table order: the random-init references, then the methods as given."""
    refs = ["scratch"] + (["scratch-conv"] if any(m in CONV for m in methods) else [])
    return refs + list(methods)


def reference(arm: str) -> str:
    """The random-init arm a pretrained arm is compared with (same segmenter)."""
    return "scratch-conv" if arm in CONV or arm == "scratch-conv" else "scratch"


# --------------------------------------------------------------------------- data


def cut_volumes(shared: Path, out: Path) -> dict[str, list[str]]:
    """Write the training / test / pretraining volumes (NIfTI) under ``out/data``."""
    from maesil_core.data import load_labels, load_volume, save_volume
    from maesil_core.segmentation import crop_volume

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    ct = load_volume(shared / "abdomen_ct" / "ct.nii.gz")
    lab = load_labels(shared / "abdomen_ct" / "labels.nii.gz", ct)
    dicom = load_volume(shared / "dicom_ct")
    dicom_lab = load_labels(shared / "dicom_ct_labels" / "labels.nii.gz", dicom, resample=True)

    def write(name: str, vol, labels=None) -> tuple[str, str | None]:
        img_path = data / f"{name}.nii.gz"
        save_volume(vol.array, vol.affine, img_path, overwrite=True, dtype=np.int16)
        lab_path = None
        if labels is not None:
            lab_path = data / f"{name}_labels.nii.gz"
            save_volume(labels.array, labels.affine, lab_path, overwrite=True, dtype=np.uint8)
        return str(img_path), str(lab_path) if lab_path else None

    def slab(z0: int, z1: int):
        box = [(None, None), (None, None), (z0, z1)]
        return crop_volume(ct, box), crop_volume(lab, box)

    test = write("test_abdomen_z10-19", *slab(10, 20))
    train = [
        write("train1_abdomen_z20-29", *slab(20, 30)),
        write("train2_dicom_ct", dicom, dicom_lab),
        write("train3_abdomen_z00-09", *slab(0, 10)),
    ]
    pre = [write("pretrain_abdomen_z00-09", slab(0, 10)[0])[0]]
    pre.append(write("pretrain_abdomen_z20-29", slab(20, 30)[0])[0])
    return {
        "train_images": [t[0] for t in train],
        "train_labels": [t[1] for t in train],
        "test_image": [test[0]],
        "test_label": [test[1]],
        "pretrain": [*pre, str(shared / "dicom_ct"), str(shared / "chest_ct" / "ct.nii.gz")],
    }


# --------------------------------------------------------------------------- runs


def segmenter_params(model) -> tuple[int, int]:
    """(all parameters, those a pretraining checkpoint fills: ViT ``encoder.*``, conv
    ``enc.*``/``dec.*``)."""
    total = sum(p.numel() for p in model.parameters())
    pre = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith(("encoder.", "enc.", "dec."))
    )
    return total, pre


def run_one(job: dict) -> dict:
    """One fine-tuning run (in its own process): returns its validation history."""
    import torch

    torch.set_num_threads(job["threads"])
    from maesil_core import segmentation as ft
    from maesil_core.checkpoint import load_checkpoint
    from maesil_core.config import preset

    base = preset(job["preset"]).override(
        "train",
        steps=job["steps"],
        batch_size=job["batch_size"],
        lr=job["lr"],
        warmup_steps=job["warmup"],
        seed=job["seed"],
        log_every=job["eval_every"],
        checkpoint_every=10**9,
        device=job["device"],
    )
    # architecture, spacing and window of a pretraining run of the arm's encoder family; the
    # random-init references take them from such a run without its weights
    arch = load_checkpoint(job["arch"]) if job["arch"] else None
    cfg = ft.config_from_pretrained(arch, base=base)
    seg = ft.SegmentationConfig(
        roi=tuple(job["roi"]), feature_size=job["feature_size"], eval_every=job["eval_every"]
    )
    params, pre_params = segmenter_params(ft.build_segmenter(cfg, seg, len(ORGANS)))
    t0 = time.perf_counter()
    result = ft.finetune(
        job["data"]["train_images"],
        job["data"]["train_labels"],
        job["run_dir"],
        cfg,
        pretrained=job["pretrained"],
        seg=seg,
        labels_map=ORGANS,
        n_labelled=job["n"],
        val_images=job["data"]["test_image"],
        val_labels=job["data"]["test_label"],
        force=True,
    )
    curve = [
        {k: v for k, v in r.items() if k == "step" or k.startswith("val_dice")}
        for r in result.history
        if "val_dice" in r
    ]
    return {
        "init": job["init"],
        "n": job["n"],
        "seed": job["seed"],
        "curve": curve,
        "final": curve[-1],
        "seconds": time.perf_counter() - t0,
        "params": params,
        "pretrained_params": pre_params,
    }


def steps_to(curve: list[dict], threshold: float, metric: str = "val_dice_liver") -> int | None:
    for r in curve:
        if r.get(metric, float("nan")) >= threshold:
            return int(r["step"])
    return None


def pretrain_method(method: str, data: list[str], args) -> dict:
    """Pretrain ``method`` on ``data`` with the shared budget and seed; its run and numbers."""
    from maesil_core import api
    from maesil_core.config import preset
    from maesil_core.models import build_model

    cfg = preset(args.preset).override("model", method=method)
    cfg = cfg.override(
        "train",
        steps=args.pretrain_steps,
        seed=args.pretrain_seed,
        checkpoint_every=10**9,
        log_every=25,
        device=args.device,
    )
    cfg = cfg.override("data", num_workers=0)
    run = args.out / f"pretrain_{method}"
    print(f"pretraining {method} ({args.preset}, {args.pretrain_steps} steps) ...", flush=True)
    t0 = time.perf_counter()
    res = api.pretrain(data, run, cfg, force=True)
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in res.history if "loss" in r]
    print(f"  done in {seconds:.0f} s, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    return {
        "run": str(run),
        "seconds": seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "params": sum(p.numel() for p in build_model(cfg.model).parameters()),
    }


# --------------------------------------------------------------------------- report


def summarise(results: list[dict], threshold: float, order: list[str]) -> list[dict]:
    """One row per (labelled volumes, arm): Dice per organ and mean (mean, std over seeds),
    the mean Dice gap to the arm's random-init reference (paired by seed), steps to the
    threshold per seed."""
    rows = []
    final = {(r["init"], r["n"], r["seed"]): r["final"]["val_dice"] for r in results}
    for n in SIZES:
        for init in order:
            runs = sorted(
                (r for r in results if r["init"] == init and r["n"] == n), key=lambda r: r["seed"]
            )
            if not runs:
                continue
            row = {"init": init, "n": n, "seeds": len(runs)}
            for organ in ORGANS:
                vals = [r["final"][f"val_dice_{organ}"] for r in runs]
                row[organ] = (float(np.nanmean(vals)), float(np.nanstd(vals)))
            vals = [r["final"]["val_dice"] for r in runs]
            row["mean"] = (float(np.mean(vals)), float(np.std(vals)))
            ref = reference(init)
            gaps = [
                r["final"]["val_dice"] - final[(ref, n, r["seed"])]
                for r in runs
                if ref != init and (ref, n, r["seed"]) in final
            ]
            row["gap"] = (float(np.mean(gaps)), float(np.std(gaps))) if gaps else None
            row["steps_to"] = [steps_to(r["curve"], threshold) for r in runs]
            row["params"] = (runs[0]["params"], runs[0]["pretrained_params"])
            rows.append(row)
    return rows


def _pm(v: tuple[float, float], seeds: int, sign: bool = False) -> str:
    f = "+.3f" if sign else ".3f"
    return f"{v[0]:{f}}" if seeds == 1 else f"{v[0]:{f}} ± {v[1]:.3f}"


def _mparams(total: int, pre: int, pretrained: bool) -> str:
    return f"{total / 1e6:.2f}M ({pre / 1e6:.2f}M)" if pretrained else f"{total / 1e6:.2f}M"


def markdown(rows: list[dict], args, meta: dict, threshold: float) -> str:
    organs = list(ORGANS)
    head = (
        "| labelled volumes | init | segmenter params (pretrained) | "
        + " | ".join(organs)
        + " | mean Dice | Δ mean Dice vs its scratch | steps to liver Dice ≥ "
    )
    head += f"{threshold:g} |"
    lines = [head, "|" + "---|" * (len(organs) + 6)]
    for r in rows:
        reached = ", ".join("never" if s is None else str(s) for s in r["steps_to"])
        n = "all (3)" if r["n"] == 3 else str(r["n"])
        cells = [_pm(r[o], r["seeds"]) for o in organs]
        gap = "—" if r["gap"] is None else _pm(r["gap"], r["seeds"], sign=True)
        pre = not r["init"].startswith("scratch")
        lines.append(
            f"| {n} | {r['init']} | {_mparams(*r['params'], pre)} | "
            + " | ".join(cells)
            + f" | **{_pm(r['mean'], r['seeds'])}** | {gap} | {reached} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], rows: list[dict], path: Path, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10")
    methods = [a for a in order if not a.startswith("scratch")]
    colors = {m: cmap(i) for i, m in enumerate(methods)}
    colors.update({"scratch": "black", "scratch-conv": "dimgray"})
    style = {a: ("--" if a.startswith("scratch") else "-") for a in order}
    for init in order:
        pts = [r for r in rows if r["init"] == init]
        axes[0].errorbar(
            [r["n"] + 0.03 * (order.index(init) - len(order) / 2) for r in pts],
            [r["mean"][0] for r in pts],
            yerr=[r["mean"][1] for r in pts],
            marker="o",
            capsize=3,
            linestyle=style[init],
            color=colors[init],
            label=init,
        )
    axes[0].set_xticks(SIZES, ["1", "2", "all (3)"])
    axes[0].set_xlabel("labelled training volumes")
    axes[0].set_ylabel("mean Dice on the held-out volume (final step)")
    axes[0].set_ylim(0, 1)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    seed0 = min(r["seed"] for r in results)
    for r in results:
        if r["n"] != 1 or r["seed"] != seed0:
            continue
        axes[1].plot(
            [c["step"] for c in r["curve"]],
            [c["val_dice"] for c in r["curve"]],
            style[r["init"]],
            color=colors[r["init"]],
            label=r["init"],
        )
    axes[1].set_xlabel("fine-tuning step")
    axes[1].set_ylabel("mean Dice (liver, spleen, stomach)")
    axes[1].set_title(f"1 labelled volume, seed {seed0}", fontsize=9)
    axes[1].set_ylim(0, 1)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Label efficiency per pretraining method vs random init (smoke, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results_md(path: Path, section: str) -> None:
    """Replace (or append) the '## Label efficiency' section of RESULTS.md, keeping its
    hand-written '### Reading the numbers' subsection."""
    text = path.read_text() if path.exists() else "# Results\n"
    marker, keep = "## Label efficiency", "### Reading the numbers"
    if marker in text:
        start = text.index(marker)
        nxt = text.find("\n## ", start + len(marker))
        old = text[start:] if nxt == -1 else text[start:nxt]
        if keep in old:
            section = section.rstrip() + "\n\n" + old[old.index(keep) :].rstrip() + "\n"
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "label_efficiency")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--preset", default="smoke")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="pretraining methods to compare (scratch is always run; scratch-conv with ae/vae/vq-vae)",
    )
    p.add_argument(
        "--pretrained",
        nargs="+",
        default=[],
        help="pretraining runs/checkpoints to reuse (their method is read from the checkpoint); "
        "the other methods are pretrained here",
    )
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--roi", type=int, nargs=3, default=(48, 48, 8))
    p.add_argument("--feature-size", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument(
        "--threshold", type=float, default=0.7, help="liver Dice for 'steps to reach' (0.7)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (1 thread each on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", type=Path, default=ROOT / "RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    args = p.parse_args(argv)

    import torch

    from maesil_core.checkpoint import load_checkpoint

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data = cut_volumes(args.shared, args.out)
    methods = list(dict.fromkeys(args.methods))

    pre_info: dict[str, dict] = {}
    for path in args.pretrained:
        method = load_checkpoint(path).meta.method
        if method not in methods:
            p.error(f"--pretrained {path} is a {method} run; add {method} to --methods.")
        pre_info[method] = {"run": str(path), "seconds": 0.0, "given": True}
    for method in methods:
        if method not in pre_info:
            pre_info[method] = pretrain_method(method, data["pretrain"], args)

    def first_run(family: tuple[str, ...] | None) -> str | None:
        for m in ("maesil", "ae", *methods):
            if m in pre_info and ((m in CONV) == (family is CONV)):
                return pre_info[m]["run"]
        return None

    order = arms(methods)
    source = {m: pre_info[m]["run"] for m in methods}
    arch = {**source, "scratch": first_run(None), "scratch-conv": first_run(CONV)}

    cuda = args.device.startswith("cuda")
    workers = 1 if cuda else max(1, args.workers)
    jobs = []
    for seed in args.seeds:
        for n in SIZES:
            for init in order:
                jobs.append(
                    {
                        "init": init,
                        "n": n,
                        "seed": seed,
                        "data": data,
                        "pretrained": source.get(init),
                        "arch": arch[init],
                        "preset": args.preset,
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "lr": args.lr,
                        "warmup": args.warmup,
                        "roi": list(args.roi),
                        "feature_size": args.feature_size,
                        "eval_every": args.eval_every,
                        "device": args.device,
                        "threads": 1 if workers > 1 else max(1, torch.get_num_threads()),
                        "run_dir": str(args.out / f"{init}_n{n}_seed{seed}"),
                    }
                )
    print(
        f"{len(jobs)} fine-tuning runs of {args.steps} steps, {workers} at a time ...", flush=True
    )
    results = []
    partial = args.out / "runs.jsonl"
    partial.write_text("")

    def done(r: dict) -> None:
        print(
            f"  [{len(results) + 1}/{len(jobs)}] {r['init']:<12} n={r['n']} seed={r['seed']}: "
            f"mean Dice {r['final']['val_dice']:.3f} ({r['seconds']:.0f} s, "
            f"{(time.perf_counter() - t_start) / 60:.1f} min so far)",
            flush=True,
        )
        results.append(r)
        with partial.open("a") as f:
            f.write(json.dumps(r) + "\n")

    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                done(r)
    else:
        for job in jobs:
            done(run_one(job))
    results.sort(key=lambda r: (order.index(r["init"]), r["n"], r["seed"]))
    total = time.perf_counter() - t_start

    rows = summarise(results, args.threshold, order)
    meta = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "total_seconds": total,
        "pretraining": pre_info,
        "argv": argv,
    }
    (args.out / "results.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "meta": meta, "runs": results},
            indent=2,
        )
    )
    png = args.out / "label_efficiency.png"
    plot(results, rows, png, order)
    table = markdown(rows, args, meta, args.threshold)
    print(table)
    print(f"total {total / 60:.1f} min; plot {png}; numbers {args.out / 'results.json'}")
    if not args.no_results:
        write_results_md(args.results, section_text(table, args, meta, png))
        print(f"table written to {args.results}")
    return 0


def section_text(table: str, args, meta: dict, png: Path) -> str:
    """The RESULTS.md section (numbers and setup; the discussion is kept in RESULTS.md)."""
    env = os.environ.get("OMP_NUM_THREADS")
    cmd = (f"OMP_NUM_THREADS={env} " if env else "") + "python benchmarks/label_efficiency.py"
    if meta["argv"]:
        cmd += " " + shlex.join(meta["argv"])
    try:
        plot_rel = png.relative_to(ROOT)
    except ValueError:
        plot_rel = png
    pre_lines = []
    for m, info in meta["pretraining"].items():
        if info.get("given"):
            pre_lines.append(f"- {m}: checkpoint `{info['run']}` (not pretrained here)")
        else:
            pre_lines.append(
                f"- {m}: {info['params'] / 1e6:.2f}M parameters, {info['seconds']:.0f} s, "
                f"own loss {info['loss_first']:.4f} → {info['loss_last']:.4f}"
            )
    pre = "\n".join(pre_lines)
    return f"""## Label efficiency

Command: `{cmd}` ({args.preset} preset, device {args.device}, {meta["threads"]} thread(s) per
run on a {meta["cores"]}-core machine shared with other jobs, {meta["total_seconds"] / 60:.1f} min
in all). Plot: `{plot_rel}` (written by the command, under the git-ignored `runs/`); every number
is in `{args.out.name}/results.json`.

Pretraining: every method on the same 4 unlabelled volumes, {args.pretrain_steps} steps, the
{args.preset} preset's batch, learning rate and crops, seed {args.pretrain_seed}. The ViT methods
(maesil, mae, simmim, gl-mae) share the {args.preset} encoder (same width, depth, heads, patch and
superpatch), so their rows differ only in the pretraining objective; the conv autoencoders keep
their own conv encoder and decoder.

{pre}

Fine-tuning: ViT methods and `scratch` = UNETR decoder (feature size {args.feature_size}) on the
{args.preset} ViT encoder, pretrained or randomly initialised; ae / vae / vq-vae and
`scratch-conv` = the conv segmenter (`ConvAESegmenter`: the autoencoder's encoder and decoder,
zero-initialised skips, the same full-resolution head as UNETR), pretrained or randomly
initialised. "Δ vs its scratch" = mean Dice minus that of the random-init arm with the same
segmenter, same seed and same labelled volumes. Every arm: {args.steps} steps, batch
{args.batch_size}, AdamW lr {args.lr:g} (warm-up {args.warmup}, cosine), Dice + CE, crops of
{"x".join(map(str, args.roi))} voxels at 3 mm, seeds {" ".join(map(str, args.seeds))}. Dice on
the held-out volume (`abdomen_ct` slices 10-19) after the last step; "steps to" = first
evaluation (every {args.eval_every} steps) with liver Dice ≥ {args.threshold:g}, per seed.
Training volumes: 1 = `abdomen_ct` slices 20-29, 2 = + `dicom_ct` (other patient, labels
resampled in world coordinates), all = + `abdomen_ct` slices 0-9. Labels are
TotalSegmentator output (liver 5, spleen 1, stomach 6), not manual tracing.

{table}
"""


if __name__ == "__main__":
    sys.exit(main())
