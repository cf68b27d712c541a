"""Why did the tiny pretraining learn slowly, and what fixes it? One variant of the tiny model
per row, trained with ``maesil pretrain``'s own pipeline, scored on a CT it never saw.

    python benchmarks/pretraining_ablation.py --split final     # the untouched check, 3 seeds
    python benchmarks/pretraining_ablation.py --split tune --rows all --seeds 0

Row names are as they were measured: ``tiny-pretrain`` is today's ``tiny`` preset (the
setting these measurements chose; named ``tiny-pretrain`` until 2026-12-02), ``tiny`` and the
``tiny-*`` rows are today's ``smoke`` preset (``tiny`` until then) and changes of it. The
default rows are ``tiny-pretrain``, ``tiny`` and MONAI's ``MaskedAutoEncoderViT`` at
tiny-pretrain's setting (``monai-mae``); ``--rows`` names others (``--rows all``: every row).
Every row other than ``tiny-pretrain`` changes the ``tiny`` preset at batch 8
(``tiny-pretrain-batch-8``: the preset until it took batch 32, the base all rows were measured
from); the ``cpu`` rows start from the ``cpu`` preset. Each row is trained by
:func:`maesil_core.api.pretrain` (the real loader: foreground crop, random crops,
augmentation, padding out of the loss) for ``--steps`` steps at ``--threads`` CPU threads, for
every seed in ``--seeds``. A finished run is not trained again (its ``result.json`` is
reused): the command can be stopped and started again.

Scores, per run:

- **reconstruction** of the held-out CT, tiled into superpatches as ``maesil reconstruct``
  does, under the model's own default mask and under one common mask (random, 0.75), seed 0:
  masked-voxel MSE as a ratio to filling the hidden voxels with the mean of each tile's visible
  voxels (``metrics.fill_with_visible_mean``: below 1 = more than a tile's brightness) and to
  interpolating them from the visible voxels (``metrics.fill_from_visible``: below 1 = more
  than smoothing);
- **linear probe** (``maesil_core.probe``) per organ: the frozen encoder's Dice, beside the
  same architecture at random initialisation (mean of 3) and four raw patch statistics.

Splits (the data of the final check, ``dicom_ct``, is never used for tuning):

- ``tune``: pretrain on ``chest_ct`` + ``abdomen_ct`` slices 0-14; reconstruct ``abdomen_ct``
  slices 15-29 (the cranial half, liver-rich as ``dicom_ct``); probe trained on one half of
  ``abdomen_ct`` and scored on the other, both ways, mean (the same patient);
- ``far``: pretrain on ``chest_ct`` + ``head_ct``; reconstruct all of ``abdomen_ct`` (no
  abdomen in pretraining); probe as ``tune``.
- ``final``: pretrain on ``abdomen_ct`` + ``chest_ct`` (as the issue's target); reconstruct the
  ``dicom_ct`` series (another patient); probe trained on ``abdomen_ct``, scored on
  ``dicom_ct`` with ``dicom_ct_labels`` (resampled in world coordinates).
- ``self``: no held-out data at all, a bound: pretrain on the ``dicom_ct`` series itself and
  reconstruct it (under other masks than the training ones); probe as ``final``. What the
  model reaches on a CT it was trained on says how much of ``final``'s gap is transfer to
  another patient and how much is what 1,000 steps can learn at all.

Writes ``OUT/SPLIT/ablation.json`` and ``ablation.md`` (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import monai_mae  # noqa: E402, F401  (registers the "monai-mae" method)
from maesil_core import api  # noqa: E402
from maesil_core import probe as pr  # noqa: E402
from maesil_core.config import RunConfig, preset  # noqa: E402
from maesil_core.data import inference_transforms, load_labels, load_volume  # noqa: E402
from maesil_core.inference import reconstruct_volume  # noqa: E402
from maesil_core.metrics import interpolation_scores, mse  # noqa: E402
from maesil_core.models.registry import build_from_checkpoint  # noqa: E402
from maesil_core.segmentation.data import crop_volume  # noqa: E402

DEFAULT_DATA = HERE.parents[1] / "shared" / "data"
COMMON_MASK = ("random", 0.75)
CLASSES = ["liver", "spleen"]

Variant = Callable[[RunConfig], RunConfig]


def _model(**kw) -> Variant:
    return lambda c: c.override("model", **kw)


def _train(**kw) -> Variant:
    return lambda c: c.override("train", **kw)


def _data(**kw) -> Variant:
    return lambda c: c.override("data", **kw)


def _extra(**kw) -> Variant:
    """Set MAESIL options; with none, clear them (another method takes none)."""

    def apply(c: RunConfig) -> RunConfig:
        c = copy.deepcopy(c)
        c.model.extra = {**c.model.extra, **kw} if kw else {}
        return c

    return apply


def _all(*vs: Variant) -> Variant:
    def apply(c: RunConfig) -> RunConfig:
        for v in vs:
            c = v(c)
        return c

    return apply


def _tiny(c: RunConfig) -> RunConfig:
    """The base (the ``tiny`` preset) -> the ``smoke`` preset (row ``tiny``, its name when
    measured): 3 mm, dual masking, decoder 64, batch 4, plain decoder."""
    c = _data(spacing=(3.0, 3.0, 3.0))(c)
    c = _model(mask_mode="dual", decoder_embed_dim=64)(c)
    c = _train(batch_size=4)(c)
    return _extra(decoder_prior="none", decoder_local=False)(c)


def _on_tiny(*vs: Variant) -> Variant:
    return _all(_tiny, *vs)


def _on_preset(name: str, *vs: Variant) -> Variant:
    """Another preset in place of the base, run as long and on the same threads and device."""

    def apply(c: RunConfig) -> RunConfig:
        t = c.train
        p = preset(name).override(
            "train", steps=t.steps, threads=t.threads, device=t.device, precision=t.precision,
            checkpoint_every=t.checkpoint_every, checkpoint_minutes=t.checkpoint_minutes,
            keep_checkpoints=t.keep_checkpoints,
        )  # fmt: skip
        return _all(_data(num_workers=c.data.num_workers), *vs)(p)

    return apply


#: name -> (what changes, the change): "tiny-pretrain" is that preset, every other row one
#: or two changes of it or of the ``tiny`` preset (rows ``tiny-*``)
ROWS: dict[str, tuple[str, Variant]] = {
    "tiny-pretrain": (
        "the tiny-pretrain preset (batch 32), called tiny since 2026-12-02",
        _train(batch_size=preset("tiny").train.batch_size),
    ),
    "tiny-pretrain-batch-8": (
        "the tiny-pretrain preset at batch 8 (its batch until 2026-12-02)",
        lambda c: c,
    ),
    "no-local": ("no neighbour mixing in the decoder", _extra(decoder_local=False)),
    "no-prior": (
        "the decoder predicts voxels, not the residual over interpolation",
        _extra(decoder_prior="none"),
    ),
    "plain-decoder": (
        "neither (MAE's decoder): the issue's like-for-like setting",
        _extra(decoder_prior="none", decoder_local=False),
    ),
    "monai-mae": (
        "MONAI MaskedAutoEncoderViT at tiny-pretrain-batch-8's setting (its own decoder)",
        _all(_model(method="monai-mae"), _extra()),
    ),
    "monai-mae-batch-32": (
        "MONAI MaskedAutoEncoderViT at the tiny preset's setting (batch 32; its own decoder)",
        _all(_model(method="monai-mae"), _extra(), _train(batch_size=32)),
    ),
    "lr-3e-4": ("peak lr 3e-4 instead of 1e-3", _train(lr=3e-4)),
    "plain-lr-3e-4": (
        "plain decoder at peak lr 3e-4",
        _all(_extra(decoder_prior="none", decoder_local=False), _train(lr=3e-4)),
    ),
    "plain-lr-1e-4": (
        "plain decoder at peak lr 1e-4",
        _all(_extra(decoder_prior="none", decoder_local=False), _train(lr=1e-4)),
    ),
    "no-prior-lr-2e-3": (
        "no-prior at peak lr 2e-3",
        _all(_extra(decoder_prior="none"), _train(lr=2e-3)),
    ),
    "no-prior-lr-4e-3": (
        "no-prior at peak lr 4e-3",
        _all(_extra(decoder_prior="none"), _train(lr=4e-3)),
    ),
    "no-prior-lr-2e-3-mask-0.9": (
        "no-prior at peak lr 2e-3, mask ratio 0.9",
        _all(_extra(decoder_prior="none"), _train(lr=2e-3), _model(mask_ratio=0.9)),
    ),
    "no-prior-lr-2e-3-decoder-4": (
        "no-prior at peak lr 2e-3, decoder 4 blocks deep",
        _all(_extra(decoder_prior="none"), _train(lr=2e-3), _model(decoder_depth=4)),
    ),
    "plain-lr-2e-3": (
        "plain decoder at peak lr 2e-3",
        _all(_extra(decoder_prior="none", decoder_local=False), _train(lr=2e-3)),
    ),
    "lr-2e-3": ("peak lr 2e-3 instead of 1e-3", _train(lr=2e-3)),
    "decoder-4": ("decoder 4 blocks deep instead of 2", _model(decoder_depth=4)),
    "decoder-4-lr-2e-3": (
        "decoder 4 blocks deep, peak lr 2e-3",
        _all(_model(decoder_depth=4), _train(lr=2e-3)),
    ),
    "refine-8": (
        "+ a voxel-level refinement of the prediction (3 dilated 3x3x3 convolutions, 8 wide)",
        _extra(decoder_refine=8),
    ),
    "batch-32": ("batch 32 instead of 8 (4x the crops per step)", _train(batch_size=32)),
    "batch-32-lr-2e-3": (
        "batch 32, peak lr 2e-3 (the square-root rule)",
        _train(batch_size=32, lr=2e-3),
    ),
    "tiny": ("the tiny preset (3 mm, dual mask, decoder 64, batch 4), now smoke", _tiny),
    "tiny-spacing-1.5": ("tiny at 1.5 mm", _on_tiny(_data(spacing=(1.5, 1.5, 1.5)))),
    "tiny-random-mask": ("tiny with random masking", _on_tiny(_model(mask_mode="random"))),
    "tiny-batch-8": ("tiny at batch 8", _on_tiny(_train(batch_size=8))),
    "tiny-local": (
        "tiny + neighbour mixing in the decoder",
        _on_tiny(_extra(decoder_local=True)),
    ),
    "tiny-random-decoder-96": (
        "tiny with random masking and decoder 96",
        _on_tiny(_model(mask_mode="random", decoder_embed_dim=96)),
    ),
    "tiny-prior-local": (
        "tiny + the interpolation prior and neighbour mixing in the decoder",
        _on_tiny(_extra(decoder_prior="interpolation", decoder_local=True)),
    ),
    "tiny-monai-mae": (
        "MONAI's MAE at tiny-random-decoder-96",
        _on_tiny(_model(method="monai-mae", mask_mode="random", decoder_embed_dim=96), _extra()),
    ),
    "tiny-no-augment": ("tiny without crop augmentation", _on_tiny(_data(augment=False))),
    "tiny-no-foreground-crop": (
        "tiny without the foreground crop",
        _on_tiny(_data(foreground_crop=False)),
    ),
    "tiny-warmup-100": (
        "tiny, warm-up 100 steps instead of 20",
        _on_tiny(_train(warmup_steps=100)),
    ),
    "tiny-betas-0.999": (
        "tiny, AdamW betas (0.9, 0.999)",
        _on_tiny(_train(betas=(0.9, 0.999))),
    ),
    "tiny-no-clip": ("tiny without gradient clipping", _on_tiny(_train(grad_clip=0.0))),
    "tiny-lr-3e-4": ("tiny at peak lr 3e-4", _on_tiny(_train(lr=3e-4))),
    "tiny-lr-3e-3": ("tiny at peak lr 3e-3", _on_tiny(_train(lr=3e-3))),
    "cpu": (
        "the cpu preset until 2026-12-02 (2 mm, 64³ superpatches, encoder 192x6, dual mask, "
        "plain decoder, batch 4)",
        _on_preset("cpu", _model(mask_mode="dual"), _extra()),
    ),
    "cpu-pretrain-options": (
        "cpu + tiny-pretrain's choices: random mask, interpolation prior, neighbour mixing "
        "(the cpu preset since 2026-12-02)",
        _on_preset(
            "cpu",
            _model(mask_mode="random"),
            _extra(decoder_prior="interpolation", decoder_local=True),
        ),
    ),
}

DEFAULT_ROWS = ("tiny-pretrain", "tiny", "monai-mae")

#: the batch every row but ``tiny-pretrain`` starts from: the preset's batch when the rows were
#: measured (batch 32 was measured as the row ``batch-32`` and then became the preset's)
BASE_BATCH = 8


# --------------------------------------------------------------------------- data


HALVES = ([(None, None), (None, None), (0, 15)], [(None, None), (None, None), (15, None)])


def abdomen_half(data: Path, half: int, out: Path) -> str:
    """``abdomen_ct`` slices 0-14 (half 0) or 15-29 (half 1) as a NIfTI file in ``out``
    (aligned in world coordinates), so the pretraining loader can read it."""
    from maesil_core.data import save_volume

    path = out / f"abdomen_ct_half{half}.nii.gz"
    if not path.is_file():
        vol = crop_volume(load_volume(data / "abdomen_ct" / "ct.nii.gz"), HALVES[half])
        out.mkdir(parents=True, exist_ok=True)
        save_volume(vol.array, vol.affine, path, dtype=np.int16)
    return str(path)


def split_data(split: str, data: Path, out: Path) -> dict:
    abdomen = data / "abdomen_ct"
    if split == "tune":
        return {
            "train": [str(data / "chest_ct" / "ct.nii.gz"), abdomen_half(data, 0, out)],
            "recon": abdomen_half(data, 1, out),
            "probe": "abdomen_ct slices 0-14 <-> 15-29 (two folds, mean)",
        }
    if split == "far":
        return {
            "train": [str(data / "chest_ct" / "ct.nii.gz"), str(data / "head_ct" / "ct_not_hu.nii.gz")],
            "recon": str(abdomen / "ct.nii.gz"),
            "probe": "abdomen_ct slices 0-14 <-> 15-29 (two folds, mean)",
        }  # fmt: skip
    if split == "self":
        return {
            "train": [str(data / "dicom_ct")],
            "recon": str(data / "dicom_ct"),
            "probe": "abdomen_ct -> dicom_ct (labels resampled)",
        }
    return {
        "train": [str(abdomen / "ct.nii.gz"), str(data / "chest_ct" / "ct.nii.gz")],
        "recon": str(data / "dicom_ct"),
        "probe": "abdomen_ct -> dicom_ct (labels resampled)",
    }


def probe_folds(split: str, data: Path, cfg: RunConfig) -> list[pr.ProbeData]:
    """The probe's train/test data on ``cfg``'s grid: one fold for ``final``; for ``tune`` two
    folds of ``abdomen_ct`` (slices 0-14 -> 15-29 and 15-29 -> 0-14), scores averaged (the
    liver's share differs a lot between the halves, so one direction alone is lopsided)."""
    abdomen = data / "abdomen_ct"
    names = abdomen / "label_names.json"
    if split not in ("final", "self"):
        image = load_volume(abdomen / "ct.nii.gz")
        labels = load_labels(abdomen / "labels.nii.gz", image)
        cut = [[crop_volume(v, box) for v in (image, labels)] for box in HALVES]
        return [
            pr.prepare_probe_data(
                cfg, [a[0]], [a[1]], [b[0]], [b[1]], classes=CLASSES, label_names=names
            )
            for a, b in ((cut[0], cut[1]), (cut[1], cut[0]))
        ]
    return [
        pr.prepare_probe_data(
            cfg, [abdomen / "ct.nii.gz"], [abdomen / "labels.nii.gz"], [data / "dicom_ct"],
            [data / "dicom_ct_labels" / "labels.nii.gz"], classes=CLASSES, label_names=names,
            resample_labels=True,
        )
    ]  # fmt: skip


def mean_over_folds(scores: list[dict[str, float]]) -> dict[str, float]:
    return {c: float(np.nanmean([s[c] for s in scores])) for c in scores[0]}


# --------------------------------------------------------------------------- scoring


def recon_scores(model, volume: torch.Tensor, mode, ratio) -> dict[str, float]:
    """Masked-voxel MSE of ``model`` on ``volume`` (1, D, H, W) and of the two references."""
    tiled = reconstruct_volume(model, volume, mode=mode, ratio=ratio, seed=0, batch_size=8)
    target = volume[0].numpy()
    mask = tiled.mask[0].numpy() > 0.5
    err = mse(tiled.pred[0].numpy(), target, mask)
    ref = interpolation_scores(target, mask, model.cfg.patch, model.cfg.superpatch)
    return {
        "mse": err,
        "mean_fill_mse": ref["mean_fill_mse"],
        "interp_mse": ref["mse"],
        "vs_mean_fill": err / ref["mean_fill_mse"],
        "vs_interp": err / ref["mse"],
        "interp_vs_mean_fill": ref["mse"] / ref["mean_fill_mse"],
    }


def arch_key(cfg: RunConfig) -> str:
    m = cfg.model
    return json.dumps(
        [m.method, m.superpatch, m.patch, m.embed_dim, m.depth, m.num_heads, m.decoder_embed_dim,
         m.decoder_depth, m.mlp_ratio, sorted(m.extra.items()), cfg.data.spacing],
        default=str,
    )  # fmt: skip


def references(cfg: RunConfig, folds: list[pr.ProbeData], cache: Path) -> dict:
    """Probe of the random-init architecture (mean of 3) and of patch statistics, cached."""
    store = json.loads(cache.read_text()) if cache.is_file() else {}
    key = arch_key(cfg)
    if key not in store:
        store[key] = {
            "random_init": mean_over_folds(
                [pr.probe_random_init(cfg, f, inits=3, seed=0) for f in folds]
            ),
            "patch_stats": mean_over_folds(
                [pr.probe_patch_stats(f, cfg.model.patch, seed=0) for f in folds]
            ),
        }
        cache.write_text(json.dumps(store, indent=1))
    return store[key]


def run_one(name: str, cfg: RunConfig, seed: int, args, split: dict, ctx: dict) -> dict:
    run_dir = args.out / args.split / name / f"seed{seed}"
    result_file = run_dir / "result.json"
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    if result_file.is_file():  # a finished run is reused only if it ran this row's setting
        done = json.loads(result_file.read_text())
        if done.get("config") != json.loads(json.dumps(cfg.to_dict())):
            raise SystemExit(
                f"{result_file} was made with another setting than row {name!r} has now (the "
                "rows changed since): move it away, or give another --out."
            )
        return done
    t0 = time.perf_counter()
    fit = api.pretrain(split["train"], run_dir, cfg, force=True)
    train_s = time.perf_counter() - t0
    model, _ = build_from_checkpoint(fit.checkpoint)
    dkey = json.dumps(cfg.data.spacing)
    if dkey not in ctx:  # the held-out volume and the probe data on this grid
        vol = inference_transforms(cfg.data)({"image": split["recon"]})["image"]
        volume = torch.as_tensor(np.asarray(vol)).float()
        ctx[dkey] = (volume, probe_folds(args.split, args.data, cfg))
    volume, folds = ctx[dkey]
    hist = [h for h in fit.history if "loss" in h]
    tail = [h["loss"] for h in hist[-10:]]
    row = {
        "row": name,
        "seed": seed,
        "steps": cfg.train.steps,
        "train_s": train_s,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": float(np.mean(tail)) if tail else float("nan"),
        "default": recon_scores(model, volume, None, None),
        "common": recon_scores(model, volume, *COMMON_MASK),
        "probe": mean_over_folds([pr.probe_model(model, f, seed=0) for f in folds]),
        "config": cfg.to_dict(),
    }
    row["references"] = references(cfg, folds, args.out / args.split / "references.json")
    result_file.write_text(json.dumps(row, indent=1))
    return row


# --------------------------------------------------------------------------- table


def _ms(values: list[float], nd: int = 2) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{nd}f}"
    return f"{np.mean(v):.{nd}f} ± {np.std(v, ddof=1):.{nd}f}"


def table(rows: dict[str, list[dict]]) -> str:
    head = (
        "| row | change | seeds | MSE / mean fill (own mask) | MSE / interpolation (own mask) | "
        "MSE / mean fill (random 0.75) | interpolation / mean fill (own mask) | probe liver | "
        "probe spleen | random-init liver | patch-stats liver | final loss | train s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, runs in rows.items():
        if not runs:
            continue
        g = lambda *path, runs=runs: [_get(r, path) for r in runs]  # noqa: E731
        ref = runs[0]["references"]
        lines.append(
            f"| {name} | {ROWS[name][0]} | {len(runs)} | {_ms(g('default', 'vs_mean_fill'))} | "
            f"{_ms(g('default', 'vs_interp'))} | {_ms(g('common', 'vs_mean_fill'))} | "
            f"{_ms(g('default', 'interp_vs_mean_fill'))} | {_ms(g('probe', 'liver'))} | "
            f"{_ms(g('probe', 'spleen'))} | {ref['random_init']['liver']:.2f} | "
            f"{ref['patch_stats']['liver']:.2f} | {_ms(g('final_loss'), 4)} | "
            f"{np.mean(g('train_s')):.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def _get(d: dict, path: tuple) -> float:
    for k in path:
        d = d[k]
    return float(d)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--split", choices=("tune", "far", "final", "self"), default="tune")
    ap.add_argument(
        "--rows", nargs="*", default=list(DEFAULT_ROWS), help=f"rows, or all: {list(ROWS)}"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    names = list(ROWS) if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {list(ROWS)}")
    torch.set_num_threads(args.threads)
    split = split_data(args.split, args.data, args.out / "data")
    base = preset("tiny")  # the rows' base: at batch 8, as every row was measured
    base = base.override("train", batch_size=BASE_BATCH, steps=args.steps, threads=args.threads, device="cpu",
                         precision="fp32", checkpoint_every=args.steps, checkpoint_minutes=0.0,
                         keep_checkpoints=1)  # fmt: skip
    base = base.override("data", num_workers=0)
    out = args.out / args.split
    out.mkdir(parents=True, exist_ok=True)
    ctx: dict = {}
    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for name in names:
        cfg = ROWS[name][1](base).validate()
        rows[name] = []
        for seed in args.seeds:
            r = run_one(name, cfg, seed, args, split, ctx)
            rows[name].append(r)
            print(
                f"{name:24s} seed {seed}  mean-fill {r['default']['vs_mean_fill']:.3f}  "
                f"interp {r['default']['vs_interp']:.3f}  common {r['common']['vs_mean_fill']:.3f}  "
                f"liver {r['probe']['liver']:.3f}  spleen {r['probe']['spleen']:.3f}  "
                f"loss {r['final_loss']:.4f}  {r['train_s']:.0f}s",
                flush=True,
            )
    meta = {
        "command": " ".join(["python benchmarks/pretraining_ablation.py", *argv]),
        "split": args.split,
        "data": split,
        "steps": args.steps,
        "seeds": args.seeds,
        "minutes": (time.perf_counter() - t0) / 60,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} threads={args.threads}",
    }
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        f"Command: `{meta['command']}` ({args.steps} steps per run, seeds {args.seeds}, "
        f"{args.threads} thread(s); {meta['minutes']:.0f} min this call).",
        f"Pretraining: {', '.join(Path(p).parent.name if Path(p).name.startswith('ct') else Path(p).name for p in split['train'])}; "
        f"reconstructed: {Path(split['recon']).parent.name if split['recon'].endswith('.gz') else Path(split['recon']).name}; "
        f"probe: {split['probe']}.",
        "",
        table(rows),
        "Mean ± standard deviation over seeds. MSE ratios: masked-voxel MSE of the model over that "
        "of filling the hidden voxels with the mean of the visible voxels of their tile, or of "
        "interpolating them (Gaussian, sigma half a patch, per tile); below 1 = better. Probe: "
        "linear per-voxel Dice on the test images (random init: mean of 3 networks).",
    ]
    (out / "ablation.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
