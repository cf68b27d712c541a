"""Fine-tuning beside pretraining at the same preset, in one run (issue 17, item 2).

For the smoke preset (batch 4 of 32³, one CPU thread unless ``--threads``), rounds alternate
between the pretraining step (MAESIL, fp32), the fine-tuning step (UNETR segmenter, feature
size 16, Dice + cross-entropy) in fp32 and, where the CPU computes bf16 natively (AMX), under
bf16 autocast as ``maesil finetune`` now runs it there; the median round counts, so every
setting sees the same load. Beside the rates: the arithmetic of each step (torch's
FlopCounterMode), what the fine-tuning's data preparation costs per step (the real crops of
``abdomen_ct`` with the default air margin, ``segmentation.data.crop_batches``) and what one
validation costs (sliding window over that whole scan on the model grid), so the profile's
answer to "where does the time go" is measured in the same run.

    python benchmarks/finetune_rate.py --rounds 5 --out /tmp/finetune_rate.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from maesil_core.config import preset  # noqa: E402
from maesil_core.threads import load_average  # noqa: E402
from maesil_core.train.optim import cpu_computes_bf16  # noqa: E402
from threads import finetune_step_fn, pretrain_step_fn  # noqa: E402

DATA = Path(os.environ.get("MAESIL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def flops_of(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def data_and_validation(batch: int, rounds: int) -> dict[str, float]:
    """ms per fine-tuning batch of real crops, and per validation of the whole abdomen_ct."""
    from maesil_core.data.io import load_labels, load_volume, read_label_names
    from maesil_core.data.labels import from_classes
    from maesil_core.models.segmenter import make_segmenter
    from maesil_core.segmentation import SegmentationConfig
    from maesil_core.segmentation.data import crop_batches, prepare_cases
    from maesil_core.segmentation.infer import predict_index

    cfg = preset("smoke")
    folder = DATA / "abdomen_ct"
    image = load_volume(folder / "ct.nii.gz")
    labels = load_labels(folder / "labels.nii.gz", image)
    names = read_label_names(folder / "label_names.json")
    labelset = from_classes(["liver", "spleen"], names)
    cases = prepare_cases([(image, labels)], labelset, cfg)
    seg = SegmentationConfig()
    roi = seg.roi_for(cfg)
    t = time.perf_counter()
    batches = crop_batches(cases, roi, batch, cfg.data.crops_per_volume, seg, seed=0)
    next(batches)  # the per-case preparation (air margin, where labels are) happens once
    first = time.perf_counter() - t
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        next(batches)
    per_batch = (time.perf_counter() - t) / n
    model = make_segmenter(cfg.model, len(labelset), feature_size=16).eval()
    times = []
    for _ in range(max(1, rounds // 2)):
        t = time.perf_counter()
        predict_index(model, cases[0].image, roi, seg, len(labelset))
        times.append(time.perf_counter() - t)
    return {
        "first_batch_ms": 1000 * first,
        "batch_ms": 1000 * per_batch,
        "validation_s": statistics.median(times),
        "validation_grid": list(cases[0].image.shape[1:]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pretrain-steps", type=int, default=20, help="steps per round")
    ap.add_argument("--finetune-steps", type=int, default=3, help="steps per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tasks = {
        "pretraining (fp32)": (pretrain_step_fn(args.batch), args.pretrain_steps),
        "fine-tuning (fp32)": (finetune_step_fn(args.batch), args.finetune_steps),
    }
    native = cpu_computes_bf16()
    if native:
        tasks["fine-tuning (bf16)"] = (finetune_step_fn(args.batch, bf16=True), args.finetune_steps)
    gflop = {name: flops_of(step) for name, (step, _) in tasks.items()}
    loads = [load_average()]
    rates: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(args.rounds):
        for name, (step, n) in tasks.items():
            step()  # warm
            t = time.perf_counter()
            for _ in range(n):
                step()
            rates[name].append(n / (time.perf_counter() - t))
        loads.append(load_average())
        print(f"round {r + 1}/{args.rounds}, load average {loads[-1]:.1f}", flush=True)
    extra = data_and_validation(args.batch, args.rounds)

    ref = statistics.median(rates["pretraining (fp32)"])
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "cpu_computes_bf16": native,
        "load_average": [min(loads), max(loads)],
        "steps_per_s": {k: {"median": statistics.median(v), "rounds": v} for k, v in rates.items()},
        "gflop_per_step": gflop,
        **extra,
    }
    print(
        f"\nsmoke preset, batch {args.batch} of 32³, {args.threads} thread(s), median of "
        f"{args.rounds} rounds, load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"{'step':<20} {'steps/s':>8} {'vol/s':>7} {'GFLOP':>7} {'vs pretraining':>15}")
    for name, vals in rates.items():
        med = statistics.median(vals)
        print(
            f"{name:<20} {med:8.2f} {med * args.batch:7.1f} {gflop[name]:7.2f} "
            f"{med / ref:14.3f}x (1/{ref / med:.1f})"
        )
    ft = 1000 / statistics.median(rates["fine-tuning (fp32)"])
    print(
        f"fine-tuning data per step: {extra['batch_ms']:.1f} ms ({extra['batch_ms'] / ft:.1%} of "
        f"the fp32 step; {extra['first_batch_ms']:.0f} ms once per run)"
    )
    print(
        f"one validation of abdomen_ct ({' x '.join(map(str, extra['validation_grid']))} on the "
        f"model grid): {extra['validation_s']:.2f} s = {1000 * extra['validation_s'] / ft:.1f} "
        "fp32 steps"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
