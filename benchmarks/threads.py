"""CPU threads: training steps/s with 1 thread, 2 threads and ``auto``, in one run.

For the smoke preset's pretraining step (MAESIL, batch 4 of 32³) and its fine-tuning step
(UNETR segmenter, batch 4 of 32³ crops, Dice + cross-entropy), rounds of ``--steps`` steps
alternate between the thread settings in one process (``torch.set_num_threads``), so every
setting sees the same load; the median round counts. ``auto`` is what
:func:`maesil_core.threads.auto_threads` chooses at the start of each of its rounds (the
count and the load average it saw are recorded). Ratios are against 1 thread.

    python benchmarks/threads.py --rounds 5 --steps 5 --out /tmp/threads.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from maesil_core.config import preset  # noqa: E402
from maesil_core.threads import auto_threads, load_average, usable_cores  # noqa: E402


def pretrain_step_fn(batch: int):
    from maesil_core.models import build_model

    cfg = preset("smoke")
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.rand(batch, 1, *cfg.model.superpatch)

    def step() -> None:
        model(x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def finetune_step_fn(batch: int, feature_size: int = 16, bf16: bool = False):
    from monai.losses import DiceCELoss

    from maesil_core.models.segmenter import make_segmenter

    cfg = preset("smoke")
    model = make_segmenter(cfg.model, 2, feature_size=feature_size)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *cfg.model.superpatch, generator=g)
    y = torch.randint(0, 3, (batch, 1, *cfg.model.superpatch), generator=g)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as fit runs it
            criterion(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="steps per round (fine-tuning)")
    ap.add_argument("--pretrain-steps", type=int, default=20, help="steps per round (pretraining)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    ap.add_argument("--tasks", nargs="+", default=["pretrain", "finetune"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tasks = {}
    if "pretrain" in args.tasks:
        tasks["pretrain"] = (pretrain_step_fn(args.batch), args.pretrain_steps)
    if "finetune" in args.tasks:
        tasks["finetune"] = (finetune_step_fn(args.batch), args.steps)
    rates: dict[str, dict[str, list[float]]] = {t: {s: [] for s in args.threads} for t in tasks}
    auto_seen: list[dict] = []
    before = torch.get_num_threads()
    for step, _ in tasks.values():  # warm-up: allocator, one-time kernels
        step()
    for r in range(args.rounds):
        for task, (step, n) in tasks.items():
            for setting in args.threads:
                if setting == "auto":
                    choice = auto_threads()
                    threads = choice.threads
                    auto_seen.append(
                        {"task": task, "round": r, "threads": threads, "load": choice.load}
                    )
                else:
                    threads = int(setting)
                torch.set_num_threads(threads)
                step()  # the first step after a change pays for the thread pool
                t = time.perf_counter()
                for _ in range(n):
                    step()
                rates[task][setting].append(n / (time.perf_counter() - t))
        print(f"round {r + 1}/{args.rounds} done, load average {load_average():.1f}", flush=True)
    torch.set_num_threads(before)

    result = {
        "machine": platform.processor() or platform.machine(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "batch": args.batch,
        "load_average_end": load_average(),
        "auto": auto_seen,
        "steps_per_s": {},
    }
    print(f"\n{usable_cores()} usable cores, batch {args.batch}, median of {args.rounds} rounds")
    print(f"{'task':<10} {'threads':<8} {'steps/s':>8} {'range':>15} {'vs 1 thread':>12}")
    for task in tasks:
        ref = statistics.median(rates[task][args.threads[0]])
        result["steps_per_s"][task] = {}
        for setting in args.threads:
            vals = rates[task][setting]
            med = statistics.median(vals)
            result["steps_per_s"][task][setting] = {"median": med, "rounds": vals}
            print(
                f"{task:<10} {setting:<8} {med:8.2f} {min(vals):7.2f}-{max(vals):<7.2f} "
                f"{med / ref:11.2f}x"
            )
    picks = sorted({a["threads"] for a in auto_seen})
    loads = [a["load"] for a in auto_seen]
    if loads:
        print(f"auto chose {picks} at load averages {min(loads):.1f}-{max(loads):.1f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
