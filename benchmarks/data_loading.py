"""Data loading: superpatches/s the pretraining loader delivers from real CT vs what MAESIL eats.

For each ``--cache`` x ``--workers`` (x ``--loader``) setting the real loader of ``maesil
pretrain`` (``make_pretrain_loader(..., endless=True)`` + ``infinite``, the preset's spacing,
crops and batch size) is built from scratch and measured (``--loader per-epoch`` also
measures the loader re-iterated every epoch, as before ``endless`` existed; ``--copy-cache
yes`` the memory cache deep-copying the cached volume for every item, as it did before):

- **first batch**: seconds from building the loader to the first batch, so it includes
  filling the cache (``memory``: every volume is preprocessed up front; ``disk``: a fresh,
  empty cache folder, written as volumes are first drawn; ``none``: nothing cached).
- **delivered**: superpatches/s over ``--batches`` batches after the first epoch (so the
  disk cache is full and the workers are running), no model; timed per epoch-sized chunk,
  median chunk.
- **fed**: training steps/s of the model when it takes its batches from this loader
  (``--fed-steps`` steps, after one), i.e. the real training loop with data waits included.

The model's **consumption** rate is the training steps/s x batch size of the preset's model
(forward, loss, backward, gradient clipping, AdamW; bf16 autocast on CUDA as in ``fit``) on
a fixed batch already on the device. It is measured in rounds of ``--model-steps`` steps
interleaved with the loader settings (one round before each setting, one at the end, while no
loader workers are alive) and the median round counts. ratio = delivered / consumed: above 1
the loader can keep the model busy. On a CPU shared with other jobs these wall-clock rates
swing by several times between runs, so the loader's **CPU time per superpatch** (main
process + its workers, from ``/proc``) is measured too, and, on CPU, the model's CPU time
per superpatch it consumes; their ratio (model / loader CPU) moves far less with the load.
With ``--rounds R`` the list of settings is run R times in turn and each figure is the
median over the rounds.

    OMP_NUM_THREADS=1 python benchmarks/data_loading.py --preset smoke --threads 1 \\
        --workers 0 1 2 --cache memory none disk --batches 12 --out data_loading.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ct import PRETRAIN_DATA  # noqa: E402
from maesil_core.config import PRESETS, RunConfig, preset  # noqa: E402
from maesil_core.data import check_inputs, infinite, make_pretrain_loader, resolve_inputs  # noqa: E402
from maesil_core.data.batch_augment import BatchAugment, to_device  # noqa: E402
from maesil_core.models import build_model  # noqa: E402
from maesil_core.train.loop import autocast_dtype, make_optimizer, pretrain_loss  # noqa: E402
from pretrain_throughput import analytic_flops  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: 45 % of an H100 / H200's dense bf16 peak (989 TFLOP/s): the utilisation goal of issue 15
H100_45PCT_FLOPS = 0.45 * 989e12


def cpu_seconds(loader) -> float | None:
    """CPU seconds used so far by this process and the loader's worker processes (Linux)."""
    total = time.process_time()
    it = getattr(loader, "_iterator", None)
    for worker in getattr(it, "_workers", []) or []:
        try:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return total


class Trainer:
    """The preset's model with the training step of ``train.loop.fit``."""

    def __init__(self, run: RunConfig, device: torch.device):
        torch.manual_seed(0)
        self.dev, self.run = device, run
        self.model = build_model(run.model).to(device).train()
        self.opt = make_optimizer(self.model, run.train, device)
        self.amp = autocast_dtype(run.train, device)
        shape = (run.train.batch_size, run.model.in_channels, *run.model.superpatch)
        self.fixed = {"image": torch.rand(shape, device=device)}
        self.cpu_s_per_step: list[float] = []  #: process CPU seconds per step, per round

    def step(self, batch: dict | None = None) -> None:
        batch = self.fixed if batch is None else batch
        batch = {
            k: v.to(self.dev, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        with torch.autocast(
            self.dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            loss, _ = pretrain_loss(self.model, batch)
            loss.backward()
        if self.run.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def steps_per_s(self, steps: int, batches=None) -> float:
        """Steps/s over ``steps`` steps (on the fixed batch, or on ``next(batches)``)."""
        self.sync()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(None if batches is None else next(batches))
        self.sync()
        if batches is None:
            self.cpu_s_per_step.append((time.process_time() - c) / steps)
        return steps / (time.perf_counter() - t)


def shutdown(loader, batches) -> None:
    """Stop the loader's persistent workers now (not at garbage collection)."""
    batches.close()
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def measure_setting(
    files: list[str],
    run: RunConfig,
    cache: str,
    workers: int,
    n_batches: int,
    fed_steps: int,
    trainer: Trainer | None,
    cache_root: Path,
    mode: str = "endless",
    copy_cache: bool = False,
    augment: bool = True,
    augment_on: str = "loader",
    device: torch.device | None = None,
) -> dict:
    data_cfg = dataclasses.replace(
        run.data, cache=cache, num_workers=workers, augment=augment, augment_on=augment_on
    )
    batch_size = run.train.batch_size
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    loader = make_pretrain_loader(
        files,
        data_cfg,
        run.model.superpatch,
        batch_size,
        seed=run.train.seed,
        cache_dir=cache_root,  # a fresh folder per setting and round: a cold disk cache
        endless=mode == "endless",
        device=device,
    )
    if copy_cache:  # the earlier behaviour, set before any worker forks
        loader.dataset.copy_cache = True
    batches = infinite(loader)
    if augment and augment_on == "device":  # as api.pretrain does it: on the batch, there
        batches = to_device(batches, device, BatchAugment(run.train.seed))
    first = next(batches)
    first_s = time.perf_counter() - t0
    volumes_per_batch = max(1, math.ceil(batch_size / data_cfg.crops_per_volume))
    per_epoch = max(1, len(files) // volumes_per_batch)
    for _ in range(per_epoch - 1):  # rest of the first epoch: disk cache now full
        next(batches)

    chunk = max(1, min(per_epoch, n_batches))
    rates = []
    done = 0
    cpu0, total = cpu_seconds(loader), 0
    while done < n_batches:
        n = min(chunk, n_batches - done)
        items = 0
        t = time.perf_counter()
        for _ in range(n):
            items += int(next(batches)["image"].shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(items / (time.perf_counter() - t))
        done += n
        total += items
    cpu1 = cpu_seconds(loader)
    cpu_ms = None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / total
    fed = None
    if fed_steps > 0:
        trainer.step(next(batches))
        fed = trainer.steps_per_s(fed_steps, batches)
    shutdown(loader, batches)
    return {
        "cache": cache,
        "workers": workers,
        "loader": mode,
        "copy_cache": copy_cache,
        "augment": augment,
        "augment_on": augment_on if augment else None,
        "first_batch_s": first_s,
        "first_batch_shape": list(first["image"].shape),
        "batches_per_epoch": per_epoch,
        "delivered_per_s": statistics.median(rates),
        "delivered_chunks_per_s": rates,
        "loader_cpu_ms_per_superpatch": cpu_ms,
        "fed_steps_per_s": fed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--data", nargs="+", default=[str(p) for p in PRETRAIN_DATA])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--cache", nargs="+", choices=["memory", "none", "disk"], default=["memory", "none", "disk"]
    )
    ap.add_argument(
        "--loader",
        nargs="+",
        choices=["endless", "per-epoch"],
        default=["endless"],
        help="endless: one never-ending iterator, as maesil pretrain uses it; per-epoch: the "
        "loader re-iterated every epoch (the earlier behaviour), for comparison",
    )
    ap.add_argument(
        "--copy-cache",
        nargs="+",
        choices=["no", "yes"],
        default=["no"],
        help="memory cache only; yes: deep-copy the cached volume for every item (MONAI's "
        "copy_cache=True, the earlier behaviour), for comparison",
    )
    ap.add_argument(
        "--augment",
        nargs="+",
        choices=["yes", "no"],
        default=["yes"],
        help="yes: flips, turns and contrast jitter of every crop, as maesil pretrain does by "
        "default; no: without (--no-augment), for comparison",
    )
    ap.add_argument(
        "--augment-on",
        nargs="+",
        choices=["loader", "device"],
        default=["loader"],
        help="where the augmentation runs: loader (MONAI transforms in the loader's processes) "
        "or device (BatchAugment on the batch on --device, as maesil pretrain does on a GPU)",
    )
    ap.add_argument(
        "--feed",
        type=float,
        nargs="+",
        default=None,
        help="training steps/s to feed: the table says how many loader workers each setting "
        "needs for them (default: the steps/s of this preset at 45%% of an H100/H200's dense "
        "bf16 peak, 989 TFLOP/s, from the analytic FLOPs per step)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the settings this many times in turn; medians"
    )
    ap.add_argument("--batches", type=int, default=12, help="steady-state batches per setting")
    ap.add_argument(
        "--model-steps",
        type=int,
        default=5,
        help="steps per model timing round (0: loader only, no model)",
    )
    ap.add_argument(
        "--fed-steps", type=int, default=8, help="model steps on real batches (0: skip)"
    )
    ap.add_argument("--warmup", type=int, default=3, help="model warm-up steps")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the main process (default: torch's)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # head_ct's "not in HU" notice, once per file

    if args.threads:
        torch.set_num_threads(args.threads)
    run = preset(args.preset).validate()
    dev = torch.device(args.device)
    files = check_inputs(resolve_inputs(args.data))
    batch = run.train.batch_size
    print(
        f"preset {args.preset}: {run.model.method}, superpatch {run.model.superpatch}, "
        f"batch {batch}, spacing {run.data.spacing}, {run.data.crops_per_volume} crops/volume, "
        f"{len(files)} volumes, device {dev}, {torch.get_num_threads()} threads"
    )

    with_model = args.model_steps > 0
    trainer = Trainer(run, dev) if with_model else None
    for _ in range(args.warmup if with_model else 0):
        trainer.step()
    fed_steps = args.fed_steps if with_model else 0
    model_rounds: list[float] = []
    settings = [
        (c, w, m, cp == "yes", a == "yes", on)
        for c in args.cache
        for cp in (args.copy_cache if c == "memory" else ["no"])
        for a in args.augment
        for on in (args.augment_on if a == "yes" else ["loader"])
        for w in args.workers
        for m in args.loader
    ]
    runs: dict[tuple, list[dict]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="maesil-bench-cache-") as tmp:
        for round_ in range(args.rounds):
            for n, (cache, workers, mode, copy, aug, aug_on) in enumerate(settings):
                if with_model:
                    model_rounds.append(trainer.steps_per_s(args.model_steps))
                folder = Path(tmp) / f"r{round_}-s{n}"
                r = measure_setting(
                    files,
                    run,
                    cache,
                    workers,
                    args.batches,
                    fed_steps,
                    trainer,
                    folder,
                    mode,
                    copy,
                    aug,
                    aug_on,
                    dev,
                )
                print(
                    f"  round {round_ + 1}: cache={cache}{'+copy' if copy else ''}"
                    f"{'' if aug else ' no-augment'}{' augment-on-device' if aug_on == 'device' else ''} "
                    f"workers={workers} loader={mode}: first batch {r['first_batch_s']:.2f} s, "
                    f"{r['delivered_per_s']:.1f} superpatches/s",
                    flush=True,
                )
                runs[(cache, workers, mode, copy, aug, aug_on)].append(r)
    feed = args.feed or [H100_45PCT_FLOPS / analytic_flops(run.model, batch)]
    results = []
    for per_round in runs.values():
        r = dict(per_round[0])
        for key in (
            "first_batch_s",
            "delivered_per_s",
            "fed_steps_per_s",
            "loader_cpu_ms_per_superpatch",
        ):
            values = [x[key] for x in per_round]
            r[f"{key}_rounds"] = values
            r[key] = None if values[0] is None else statistics.median(values)
        results.append(r)
    if with_model:
        model_rounds.append(trainer.steps_per_s(args.model_steps))
    steps_per_s = statistics.median(model_rounds) if model_rounds else None
    consumed = None if steps_per_s is None else steps_per_s * batch
    model_cpu_ms = None
    if trainer is not None and dev.type == "cpu" and trainer.cpu_s_per_step:
        model_cpu_ms = 1000 * statistics.median(trainer.cpu_s_per_step) / batch
    for r in results:
        r["consumed_per_s"] = consumed
        r["ratio"] = None if consumed is None else r["delivered_per_s"] / consumed
        fed = r["fed_steps_per_s"]
        r["fed_over_synthetic"] = None if fed is None else fed / steps_per_s
        r["model_cpu_ms_per_superpatch"] = model_cpu_ms
        lc = r["loader_cpu_ms_per_superpatch"]
        r["cpu_ratio"] = None if model_cpu_ms is None or not lc else model_cpu_ms / lc
        # superpatches/s one loader core makes in this setting, and the cores (workers) that
        # the --feed steps/s need: rate x batch x CPU time per superpatch
        r["per_core_per_s"] = None if not lc else 1000.0 / lc
        r["workers_to_feed"] = {
            f"{s:.4g}": (None if not lc else math.ceil(s * batch * lc / 1000.0)) for s in feed
        }

    def num(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    feed_cols = "".join(f" | workers for {s:.3g} steps/s" for s in feed)
    lines = [
        "| cache | augment | workers | loader | first batch (s) | delivered (superpatches/s) "
        "| consumed (superpatches/s) | delivered / consumed | fed steps/s | fed / synthetic "
        f"| loader CPU (ms/superpatch) | model CPU / loader CPU | per loader core (/s){feed_cols} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(feed),
    ]
    for r in results:
        aug = "no" if not r["augment"] else f"on the {r['augment_on']}"
        need = "".join(f" | {num(n, 'd')}" for n in r["workers_to_feed"].values())
        lines.append(
            f"| {r['cache']}{' + copy' if r['copy_cache'] else ''} | {aug} | {r['workers']} "
            f"| {r['loader']} | {r['first_batch_s']:.2f} "
            f"| {r['delivered_per_s']:.1f} | {num(consumed, '.1f')} | {num(r['ratio'], '.2f')} "
            f"| {num(r['fed_steps_per_s'], '.2f')} | {num(r['fed_over_synthetic'], '.2f')} "
            f"| {num(r['loader_cpu_ms_per_superpatch'], '.2f')} | {num(r['cpu_ratio'], '.2g')} "
            f"| {num(r['per_core_per_s'], '.0f')}{need} |"
        )
    lines.append("")
    lines.append(
        "workers for S steps/s = S x batch x loader CPU per superpatch (a setting with 0 "
        "workers: its in-process CPU time, a lower bound for what a worker costs)"
        + ("" if args.feed else f"; S = {feed[0]:.3g}: 45% of 989 TFLOP/s at this preset")
    )
    if with_model:
        lines.append(
            f"model: {steps_per_s:.2f} steps/s x batch {batch} on a fixed batch "
            f"(median of {len(model_rounds)} rounds of {args.model_steps} steps: "
            + ", ".join(f"{s:.2f}" for s in model_rounds)
            + ")"
        )
        if model_cpu_ms is not None:
            lines.append(
                f"model CPU time: {model_cpu_ms:.2f} ms per superpatch consumed (median round)"
            )
    else:
        lines.append("model not run (--model-steps 0): loader figures only")
    print("\n".join(lines))

    if args.out:
        meta = {
            "preset": args.preset,
            "method": run.model.method,
            "superpatch": list(run.model.superpatch),
            "spacing": run.data.spacing,
            "crops_per_volume": run.data.crops_per_volume,
            "batch_size": batch,
            "files": files,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor(),
            "threads": torch.get_num_threads(),
            "batches": args.batches,
            "model_steps": args.model_steps,
            "fed_steps": args.fed_steps,
            "rounds": args.rounds,
            "model_steps_per_s": steps_per_s,
            "model_rounds_steps_per_s": model_rounds,
            "model_cpu_ms_per_superpatch": model_cpu_ms,
            "feed_steps_per_s": feed,
            "load_avg_1min": os.getloadavg()[0],
            "torch": torch.__version__,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
