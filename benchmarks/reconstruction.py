"""Reconstruction benchmark: every pretraining method on the same real CT, scored on a held-out CT.

    python benchmarks/reconstruction.py                      # full CPU run (~15 min idle 2-core CPU)
    python benchmarks/reconstruction.py --quick --out /tmp/r # end-to-end smoke run (seconds)
    python benchmarks/reconstruction.py --ablation size      # superpatch 64/96/128 x patch 8/16
                                                             # at 1.5 mm (~40 min, 1 free core)

What it does, in one process:

1. **Data.** Pretraining volumes: ``chest_ct`` (HU), ``head_ct`` (not HU: intensity ``auto``
   falls back to percentile scaling) and the ``dicom_ct`` series from ``--data`` (default
   ``../shared/data`` beside the repository). Held out: ``abdomen_ct``, never seen in
   pretraining. Preprocessing = the ``smoke`` preset's (3 mm voxels, abdomen window -175..250
   HU, foreground crop). For each superpatch size one fixed pool of random crops is drawn
   with the MONAI pretraining loader (seeded) and every method trains on the SAME sequence
   of batches from it (same seed, same steps, same batch, same lr schedule).
2. **Training.** ``maesil_core.train.fit`` (the one training loop) per method, fp32 on CPU.
3. **Scoring.** The whole held-out volume, on the model grid, is tiled into non-overlapping
   superpatches and reconstructed with ``maesil_core.inference.reconstruct_volume`` (seed 0);
   MSE / PSNR / SSIM (3D, ``maesil_core.metrics``, [0, 1] scale) over every voxel of the volume
   ("whole": for masked models the composite = input where visible, prediction where masked)
   and over the masked voxels only ("masked"). Masked models are scored under their own
   training mask and under one common mask (random, ratio 0.75); the conv autoencoders see
   every voxel (their "masked" score is their output on the voxels the common mask would hide).
4. **Output.** ``<out>/reconstruction.md`` (table), ``<out>/reconstruction.json`` (all numbers)
   and ``<out>/reconstruction.png`` (the same slices reconstructed by every method).

``--ablation size`` runs, instead of the methods, MAESIL (dual masking, the same tiny widths)
at superpatch 64^3 / 96^3 / 128^3 x patch 8^3 / 16^3, by default at 1.5 mm voxels
(``--spacing``; at 3 mm a 128^3 superpatch is 384 mm, larger than every shared volume). The
coarse mask block is held at 32^3 voxels (4^3 patches of 8^3, 2^3 patches of 16^3), as the
``base`` preset does at 128^3/8^3. Every row has the same steps, batch and seed, except the
128^3/8^3 row (4096 tokens): it trains at a quarter of the batch (same steps), a control row
128^3/16^3 at that batch isolates the batch effect, and the s/step at the full batch is timed
(a few steps) and reported. Superpatches larger than a volume are zero-padded (in training,
by the loader, and the padded voxels are left out of the loss; in scoring, the held-out
tiles): the table reports the share of body voxels in each training pool and the share of
each held-out tile that is real volume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from maesil_core.config import RunConfig, preset  # noqa: E402
from maesil_core.data import inference_transforms, make_pretrain_loader  # noqa: E402
from maesil_core.data.transforms import FOREGROUND_THRESHOLD  # noqa: E402
from maesil_core.inference import reconstruct_volume  # noqa: E402
from maesil_core.metrics import interpolation_scores, reconstruction_scores  # noqa: E402
from maesil_core.models import build_model  # noqa: E402
from maesil_core.train import fit  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMON_MASK = ("random", 0.75)


@dataclasses.dataclass
class Entry:
    """One trained model of the benchmark."""

    name: str  #: row label
    method: str
    superpatch: int
    patch: int
    mask_mode: str = "dual"
    group: str = "methods"  #: "methods", "ablation" or "size"
    extra: dict = dataclasses.field(default_factory=dict)
    block: int | None = None  #: coarse mask block in patches (None: 2 if the grid is even, else 1)
    batch_div: int = 1  #: this row trains at batch // batch_div (same steps)
    id: str = ""  #: short name for --only (e.g. "sp128-p8")


def size_entries() -> list[Entry]:
    """The superpatch x patch grid (MAESIL, dual masking, 32^3-voxel coarse blocks)."""
    rows = []
    for sp in (64, 96, 128):
        for p in (8, 16):
            div = 4 if (sp, p) == (128, 8) else 1  # 4096 tokens: ~6 s/step at batch 4 on 1 core
            rows.append(
                Entry(f"superpatch {sp}, patch {p}", "maesil", sp, p, "dual", "size", block=32 // p,
                      batch_div=div, id=f"sp{sp}-p{p}")
            )  # fmt: skip
    # control: the 128/16 row at the reduced batch of the 128/8 row
    rows.append(
        Entry("superpatch 128, patch 16, reduced batch", "maesil", 128, 16, "dual", "size",
              block=2, batch_div=4, id="sp128-p16-small-batch")
    )  # fmt: skip
    return rows


def entries(quick: bool) -> list[Entry]:
    rows = [
        Entry("MAESIL (dual)", "maesil", 32, 8, "dual"),
        Entry("MAE-3D (random, p16)", "mae", 64, 16, "random"),
        Entry("SimMIM (random)", "simmim", 32, 8, "random"),
        Entry("GL-MAE (views 32^3)", "gl-mae", 64, 8, "random"),
        Entry("AE", "ae", 32, 8),
        Entry("VAE", "vae", 32, 8),
        Entry("VQ-VAE", "vq-vae", 32, 8),
        Entry("MAESIL random", "maesil", 32, 8, "random", "ablation"),
        Entry("MAESIL block", "maesil", 32, 8, "block", "ablation"),
        Entry("MAESIL dual, superpatch 48", "maesil", 48, 8, "dual", "ablation"),
        Entry("MAESIL dual, superpatch 64, patch 16", "maesil", 64, 16, "dual", "ablation"),
    ]
    if quick:
        rows = [r for r in rows if r.group == "methods"] + [rows[-4]]
    return rows


def row_batch(e: Entry, batch: int) -> int:
    return max(1, batch // e.batch_div)


def run_config(
    e: Entry, steps: int, batch: int, seed: int, spacing: float | None = None
) -> RunConfig:
    cfg = preset("smoke")
    cfg.data.num_workers = 0
    if spacing is not None:
        cfg.data.spacing = (float(spacing),) * 3
    if e.block is not None:
        block = (e.block,) * 3
    else:
        block = (2, 2, 2) if (e.superpatch // e.patch) % 2 == 0 else (1, 1, 1)
    model = dataclasses.replace(
        cfg.model,
        method=e.method,
        superpatch=(e.superpatch,) * 3,
        patch=(e.patch,) * 3,
        mask_mode=e.mask_mode,
        block=block,
        extra=dict(e.extra),
    )
    train = dataclasses.replace(
        cfg.train,
        steps=steps,
        batch_size=row_batch(e, batch),
        seed=seed,
        device="cpu",
        precision="fp32",
        warmup_steps=min(20, max(1, steps // 10)),
        checkpoint_every=steps,
        checkpoint_minutes=0.0,
        log_every=max(1, steps // 10),
        keep_checkpoints=1,
    )
    return dataclasses.replace(cfg, preset="bench-recon", model=model, train=train).validate()


def crop_pool(files: list[str], cfg: RunConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    """n random superpatch crops drawn by the pretraining loader, seeded: ``{"image": (n, 1,
    S, S, S), "valid": (n, 1, S, S, S)}`` (valid 0 on padding, which the losses leave out)."""
    loader = make_pretrain_loader(
        files, cfg.data, cfg.model.superpatch, cfg.data.crops_per_volume, seed=seed
    )
    crops: list[dict[str, torch.Tensor]] = []
    while len(crops) * cfg.data.crops_per_volume < n:
        for batch in loader:
            crops.append(batch)
    return {k: torch.cat([c[k] for c in crops])[:n] for k in ("image", "valid")}


def batches(pool: dict[str, torch.Tensor], batch: int, seed: int):
    """Endless batches from ``pool`` in one fixed shuffled order (the same for every method)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pool["image"]), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            pick = order[i : i + batch]
            yield {k: v[pick] for k, v in pool.items()}


def time_steps(
    cfg: RunConfig, pool: dict[str, torch.Tensor], batch: int, n: int, seed: int
) -> float:
    """Seconds per optimiser step of a fresh model at ``batch`` (after one warm-up step)."""
    from maesil_core.train.loop import make_optimizer

    torch.manual_seed(seed)
    model = build_model(cfg.model).train()
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    it = batches(pool, batch, seed)
    t = 0.0
    for i in range(n + 1):
        b = next(it)
        t0 = time.perf_counter()
        model(b["image"], valid=b["valid"]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            t += time.perf_counter() - t0
    return t / max(1, n)


def score(
    model, volume: torch.Tensor, mode, ratio, seed: int
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Reconstruct ``volume`` (1, D, H, W); scores over the whole volume and over masked voxels."""
    tiled = reconstruct_volume(model, volume, mode=mode, ratio=ratio, seed=seed, batch_size=8)
    target = volume[0].numpy()
    recon = tiled.recon[0].numpy()
    mask = tiled.mask[0].numpy() > 0.5
    out = {f"whole_{k}": v for k, v in reconstruction_scores(recon, target).items()}
    if mask.any():
        out.update(
            {f"masked_{k}": v for k, v in reconstruction_scores(recon, target, mask).items()}
        )
        # the no-learning reference on the same mask: hidden voxels interpolated from visible
        fill = interpolation_scores(target, mask, model.cfg.patch, model.cfg.superpatch)
        out.update({f"interp_{k}": v for k, v in fill.items()})
    out["masked_fraction"] = float(mask.mean())
    # mean signed error of the prediction on masked body voxels: a model trained on mostly
    # zero-padded crops predicts too dark (its loss was dominated by padding)
    body = mask & (target > FOREGROUND_THRESHOLD)
    if body.any():
        out["masked_body_bias"] = float((tiled.pred[0].numpy()[body] - target[body]).mean())
    return out, recon, mask


def common_mask_scores(model, volume, seed: int) -> dict:
    """Scores under the common random mask (the AE's output on the voxels it would hide)."""
    mode, ratio = COMMON_MASK
    if getattr(model, "encoder", None) is not None:
        s, _, _ = score(model, volume, mode, ratio, seed)
        return {f"common_{k}": v for k, v in s.items() if k.startswith("masked_")}
    # conv autoencoder: draw the common mask on the patch grid, score its output there
    cfg = model.cfg
    ref = dataclasses.replace(cfg, method="maesil", mask_mode=mode, mask_ratio=ratio)
    tiled = reconstruct_volume(_MaskOnly(ref), volume, seed=seed, batch_size=8)
    mask = tiled.mask[0].numpy() > 0.5
    pred = reconstruct_volume(model, volume, seed=seed, batch_size=8).recon[0].numpy()
    s = reconstruction_scores(pred, volume[0].numpy(), mask)
    return {f"common_masked_{k}": v for k, v in s.items()}


class _MaskOnly(torch.nn.Module):
    """A stand-in model whose ``reconstruct`` only draws MAESIL's mask (for the AE's common mask)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def reconstruct(
        self, x, *, mode=None, ratio=None, generator=None, return_raw=False, valid=None
    ):
        from maesil_core.models.masking import make_mask, mask_to_voxels

        m = make_mask(self.cfg, x.shape[0], mode=mode, ratio=ratio, generator=generator)
        vox = mask_to_voxels(m, self.cfg.grid, self.cfg.patch).to(x.dtype)
        return x, vox, x


def figure(path: Path, target: np.ndarray, shown: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """Axial and coronal middle slices: target, then each method's reconstruction (masks dotted)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cols = 1 + len(shown)
    fig = Figure(figsize=(2.0 * cols, 4.4), dpi=110)
    z, y = target.shape[2] // 2, target.shape[1] // 2
    panels = [("held-out target", target, None)] + shown
    for c, (title, vol, mask) in enumerate(panels):
        for r, (sl, lab) in enumerate(
            [((slice(None), slice(None), z), "axial"), ((slice(None), y, slice(None)), "coronal")]
        ):
            ax = fig.add_subplot(2, cols, r * cols + c + 1)
            ax.imshow(np.rot90(vol[sl]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if mask is not None and mask[sl].any() and mask[sl].mean() < 1:
                ax.contour(
                    np.rot90(mask[sl].astype(float)),
                    levels=[0.5],
                    colors="tab:orange",
                    linewidths=0.4,
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(lab, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def table(rows: list[dict]) -> str:
    head = (
        "| method | params | train s | final loss | whole PSNR | whole SSIM | masked PSNR | "
        "masked SSIM | masked MSE | interpolation PSNR ‡ | common-mask PSNR | "
        "common-mask SSIM |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        dagger = " †" if r["sees_all"] else ""
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_s']:.0f} | {fmt(r['final_loss'], 4)} | "
            f"{fmt(r.get('whole_psnr'))} | {fmt(r.get('whole_ssim'), 3)} | "
            f"{fmt(r.get('masked_psnr'))}{dagger} | {fmt(r.get('masked_ssim'), 3)}{dagger} | "
            f"{fmt(r.get('masked_mse'), 4)}{dagger} | {fmt(r.get('interp_psnr'))} | "
            f"{fmt(r.get('common_masked_psnr'))}{dagger} | "
            f"{fmt(r.get('common_masked_ssim'), 3)}{dagger} |"
        )
    return head + "\n".join(lines) + "\n"


def size_table(rows: list[dict]) -> str:
    head = (
        "| superpatch | patch | tokens | params | batch | voxels/step | body share of crops | "
        "real share of held-out tiles | train s | s/step | final loss | whole PSNR | whole SSIM | "
        "masked PSNR | masked SSIM | masked-body bias | interpolation PSNR ‡ | "
        "common-mask PSNR | common-mask SSIM |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        sps = f"{r['s_per_step']:.2f}"
        if r.get("full_batch_s_per_step") is not None:
            sps += f" ({r['full_batch_s_per_step']:.2f} at batch {r['full_batch']})"
        lines.append(
            f"| {r['superpatch']}³ | {r['patch']}³ | {r['tokens']} | {r['params'] / 1e6:.2f}M | "
            f"{r['batch']} | {r['voxels_per_step'] / 1e6:.1f}M | {r['pool_body_share']:.2f} | "
            f"{r['heldout_real_share']:.2f} | {r['train_s']:.0f} | {sps} | "
            f"{fmt(r['final_loss'], 4)} | {fmt(r.get('whole_psnr'))} | "
            f"{fmt(r.get('whole_ssim'), 3)} | {fmt(r.get('masked_psnr'))} | "
            f"{fmt(r.get('masked_ssim'), 3)} | {fmt(r.get('masked_body_bias'), 3)} | "
            f"{fmt(r.get('interp_psnr'))} | "
            f"{fmt(r.get('common_masked_psnr'))} | {fmt(r.get('common_masked_ssim'), 3)} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument(
        "--ablation",
        choices=("methods", "size"),
        default="methods",
        help="methods: every method + masking ablations (3 mm); size: MAESIL at superpatch "
        "64/96/128 x patch 8/16 (1.5 mm)",
    )
    ap.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="isotropic voxel spacing in mm (default: 3 for methods, 1.5 for size)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench-recon, runs/bench-recon-size for --ablation size)",
    )
    ap.add_argument(
        "--results", type=Path, default=None, help="table file (default OUT/reconstruction.md)"
    )
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per method")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--pool", type=int, default=192, help="crops in the training pool per superpatch size"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared CPU, spinning OpenMP threads made "
        "the run 20x slower; 0 keeps torch's default)",
    )
    ap.add_argument(
        "--time-full-batch",
        type=int,
        default=3,
        help="for a row trained at a reduced batch: time this many steps at the full batch",
    )
    ap.add_argument("--only", nargs="*", default=None, help="method ids, row ids or row names")
    ap.add_argument("--quick", action="store_true", help="2 steps, tiny pool: a smoke test")
    args = ap.parse_args(argv)
    size = args.ablation == "size"
    if args.spacing is None:
        args.spacing = 1.5 if size else 3.0
    if args.quick:
        args.steps, args.pool, args.time_full_batch = 2, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out or Path("runs/bench-recon-size" if size else "runs/bench-recon")
    out.mkdir(parents=True, exist_ok=True)
    results_path = args.results or out / "reconstruction.md"

    data = args.data
    train_files = [
        str(data / "chest_ct" / "ct.nii.gz"),
        str(data / "head_ct" / "ct_not_hu.nii.gz"),
        str(data / "dicom_ct"),
    ]
    held_out = data / "abdomen_ct" / "ct.nii.gz"
    for f in [*train_files, str(held_out)]:
        if not Path(f).exists():
            raise SystemExit(f"missing {f}: pass --data pointing to the shared data folder")

    rows_cfg = size_entries() if size else entries(args.quick)
    if args.only:
        rows_cfg = [
            e for e in rows_cfg if e.method in args.only or e.name in args.only or e.id in args.only
        ]
        if not rows_cfg:
            raise SystemExit(f"--only {args.only} matches no row")
    base = run_config(rows_cfg[0], args.steps, args.batch, args.seed, args.spacing)
    volume = torch.as_tensor(
        np.asarray(inference_transforms(base.data)({"image": str(held_out)})["image"])
    )
    volume = volume.float()  # (1, D, H, W) on the model grid, [0, 1]
    t0 = time.perf_counter()
    pools: dict[int, dict[str, torch.Tensor]] = {}
    results, shown = [], []
    for e in rows_cfg:
        cfg = run_config(e, args.steps, args.batch, args.seed, args.spacing)
        batch = cfg.train.batch_size
        if e.superpatch not in pools:
            pools.clear()  # one pool in memory at a time (192 crops of 128^3 are 1.6 GB)
            pools[e.superpatch] = crop_pool(train_files, cfg, args.pool, args.seed)
        pool = pools[e.superpatch]
        torch.manual_seed(args.seed)
        model = build_model(cfg.model)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run_dir = out / "runs" / e.name.replace(" ", "_").replace(",", "").replace("^", "")
        t = time.perf_counter()
        res = fit(model, batches(pool, batch, args.seed), cfg, run_dir, device=torch.device("cpu"))
        train_s = time.perf_counter() - t
        model.eval()
        hist = [h for h in res.history if "loss" in h]
        row = {
            "name": e.name,
            "id": e.id,
            "method": e.method,
            "group": e.group,
            "superpatch": e.superpatch,
            "patch": e.patch,
            "tokens": cfg.model.num_patches,
            "block": list(cfg.model.block),
            "mask_mode": e.mask_mode if e.method not in ("ae", "vae", "vq-vae") else "none",
            "params": params,
            "batch": batch,
            "steps": args.steps,
            "voxels_per_step": batch * e.superpatch**3,
            "train_s": train_s,
            "s_per_step": train_s / args.steps,
            "first_loss": hist[0]["loss"] if hist else float("nan"),
            "final_loss": hist[-1]["loss"] if hist else float("nan"),
            "sees_all": e.method in ("ae", "vae", "vq-vae"),
            "logs": {
                k: v
                for k, v in (hist[-1] if hist else {}).items()
                if k not in ("step", "lr", "elapsed_s", "volumes_per_s")
            },
        }
        if size:
            padded = [math.ceil(n / e.superpatch) * e.superpatch for n in volume.shape[1:]]
            row["pool_body_share"] = float((pool["image"] > FOREGROUND_THRESHOLD).float().mean())
            row["heldout_real_share"] = float(volume[0].numel() / math.prod(padded))
        if batch != args.batch and args.time_full_batch > 0:
            row["full_batch"] = args.batch
            row["full_batch_s_per_step"] = time_steps(
                cfg, pool, args.batch, args.time_full_batch, args.seed
            )
        t = time.perf_counter()
        s, recon, mask = score(model, volume, None, None, args.seed)
        row.update(s)
        row.update(common_mask_scores(model, volume, args.seed))
        row["score_s"] = time.perf_counter() - t
        results.append(row)
        if e.group in ("methods", "size"):
            shown.append((e.name, recon, mask))
        print(
            f"{e.name:40s} {train_s:6.0f}s loss {row['first_loss']:.4f}->{row['final_loss']:.4f} "
            f"whole PSNR {fmt(row.get('whole_psnr'))} masked PSNR {fmt(row.get('masked_psnr'))}",
            flush=True,
        )
    pools.clear()

    total = time.perf_counter() - t0
    figure(out / "reconstruction.png", volume[0].numpy(), shown)
    meta = {
        "command": " ".join(["python benchmarks/reconstruction.py", *argv]),
        "ablation": args.ablation,
        "spacing_mm": args.spacing,
        "steps": args.steps,
        "batch": args.batch,
        "pool": args.pool,
        "seed": args.seed,
        "train_files": train_files,
        "held_out": str(held_out),
        "held_out_shape": list(volume.shape[1:]),
        "total_s": total,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
    }
    (out / "reconstruction.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    md = [
        f"Command: `{meta['command']}` ({args.steps} steps x batch {args.batch} per model, seed {args.seed}, "
        f"CPU fp32, {total / 60:.1f} min in all on {meta['machine']}).",
        f"Held-out volume: abdomen_ct, {tuple(volume.shape[1:])} voxels at {args.spacing:g} mm.",
        "",
    ]
    if size:
        md += [size_table(results)]
        reduced = [r for r in results if r["batch"] != args.batch]
        if reduced:
            md += [
                f"Rows at batch {reduced[0]['batch']} train the same {args.steps} steps on fewer "
                "crops; s/step in brackets: timed at the full batch."
            ]
        md += [
            "Body share: voxels above the foreground threshold in the training crops (zero "
            "padding and air both count as not body). Real share: the part of the held-out "
            "tiles (zero-padded up to a multiple of the superpatch) that is volume; only those "
            "voxels are scored. Masked-body bias: mean (prediction - target) on the masked "
            "voxels inside the body ([0, 1] scale; negative = too dark)."
        ]
    else:
        md += [table([r for r in results if r["group"] == "methods"])]
        abl = [r for r in results if r["group"] == "ablation"]
        if abl:
            md += [
                "Ablations (MAESIL):",
                "",
                table([r for r in results if r["name"] == "MAESIL (dual)"] + abl),
            ]
        md += [
            "† the model saw these voxels (a conv autoencoder has no mask): not comparable with "
            "a masked model's score."
        ]
    md += [
        "",
        "‡ the no-learning reference: the same hidden voxels interpolated from the visible ones "
        "(Gaussian-weighted mean, sigma half a patch; `maesil_core.metrics.fill_from_visible`). "
        "A masked model that scores below it has not learnt more than smoothing its input.",
    ]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("\n".join(md) + "\n")
    print(f"wrote {results_path}, {out / 'reconstruction.png'} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
