"""Attention at the decoder's shapes: which kernel runs, and what the head width costs.

For each width x heads x tokens case, forward + backward of self-attention laid out exactly as
``vit3d.Attention`` lays it out (one qkv tensor, permuted into heads), timed for:

- ``default``: ``F.scaled_dot_product_attention`` with whatever kernel the dispatcher picks
  (what training runs; the kernel is named from the operator the FLOP counter sees);
- ``flash`` / ``efficient`` / ``cudnn`` / ``math``: one SDPA backend forced (CUDA; an error
  row where a backend refuses the shape);
- ``explicit``: ``softmax(q k^T / sqrt(d)) v`` written out, as MONAI's ``SABlock`` does
  without flash attention (the N x N scores are materialised).

Cases are timed in interleaved rounds; the median round counts. TFLOP/s counts the model's
4 B N^2 E FLOPs of the forward and twice that for the backward (the usual 3x). On CUDA also
the peak memory above the inputs. bf16 on CUDA; on CPU ``--dtype`` (fp32 by default).

    python benchmarks/attention.py --device cpu --tokens 4096 --width 512 --heads 16 8 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_throughput import counted_flops, sdpa_backend, sync  # noqa: E402

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_fn(kind: str, qkv: torch.Tensor, heads: int):
    """fwd + bwd of attention on ``qkv`` (B, N, 3 * E) split into ``heads`` heads."""
    b, n, three_e = qkv.shape
    e = three_e // 3

    def run() -> None:
        q, k, v = qkv.view(b, n, 3, heads, e // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if kind == "explicit":  # MONAI SABlock without flash attention
            a = (q @ k.transpose(-2, -1)) * (e // heads) ** -0.5
            o = a.softmax(dim=-1) @ v
        elif kind == "default":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(BACKENDS[kind]):
                o = F.scaled_dot_product_attention(q, k, v)
        o.backward(torch.ones_like(o))
        qkv.grad = None

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        help="default explicit (CPU) / default flash efficient cudnn math explicit (CUDA)",
    )
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    kinds = args.kinds or (
        ["default", "flash", "efficient", "cudnn", "math", "explicit"]
        if cuda
        else ["default", "explicit"]
    )
    print(
        f"attention fwd+bwd, width {args.width}, batch {args.batch}, {dtype}, device {dev}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    cases = []
    for n in args.tokens:
        for h in args.heads:
            for kind in kinds:
                g = torch.Generator(device=dev).manual_seed(0)
                qkv = torch.randn(
                    args.batch, n, 3 * args.width, device=dev, dtype=dtype, generator=g
                ).requires_grad_()
                run = attention_fn(kind, qkv, h)
                case = {"tokens": n, "heads": h, "head_dim": args.width // h, "kind": kind}
                try:
                    if cuda:
                        sync(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                        before = torch.cuda.memory_allocated(dev)
                    run()
                    sync(dev)
                    if cuda:
                        case["peak_extra_mib"] = (
                            torch.cuda.max_memory_allocated(dev) - before
                        ) / 2**20
                    _, ops = counted_flops(run)
                    case["kernel"] = sdpa_backend(ops)
                except Exception as exc:  # noqa: BLE001 - a backend refusing a shape is a result
                    case["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    run = None
                case["_run"] = run
                case["flops"] = 3 * 4 * args.batch * n * n * args.width
                case["times"] = []
                cases.append(case)
    for _ in range(args.rounds):
        for case in cases:
            if case["_run"] is None:
                continue
            sync(dev)
            t = time.perf_counter()
            for _ in range(args.iters):
                case["_run"]()
            sync(dev)
            case["times"].append((time.perf_counter() - t) / args.iters)
    lines = [
        "| tokens | heads x dim | kind | kernel | ms fwd+bwd | TFLOP/s | peak extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        case.pop("_run")
        if "error" in case:
            lines.append(
                f"| {case['tokens']} | {case['heads']} x {case['head_dim']} | {case['kind']} "
                f"| {case['error']} | | | |"
            )
            continue
        t = statistics.median(case["times"])
        case["ms"] = 1e3 * t
        case["tflops"] = case["flops"] / t / 1e12
        lines.append(
            f"| {case['tokens']} | {case['heads']} x {case['head_dim']} | {case['kind']} "
            f"| {case['kernel']} | {case['ms']:.3g} | {case['tflops']:.3g} "
            f"| {case.get('peak_extra_mib', float('nan')):.0f} |"
        )
    lines.append("")
    for n in args.tokens:
        for kind in kinds:
            row = {
                c["heads"]: c for c in cases if c["tokens"] == n and c["kind"] == kind and "ms" in c
            }
            if len(row) >= 2:
                hs = sorted(row, reverse=True)
                ref = row[hs[0]]["ms"]
                lines.append(
                    f"{kind}, {n} tokens: "
                    + ", ".join(f"{h} heads {ref / row[h]['ms']:.2f}x" for h in hs[1:])
                    + f" the speed of {hs[0]} heads"
                )
    print("\n".join(lines), flush=True)
    if args.out:
        meta = {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "dtype": str(dtype),
            "batch": args.batch,
            "width": args.width,
            "threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0],
            "torch": torch.__version__,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "cases": cases}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
