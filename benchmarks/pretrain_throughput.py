"""Pretraining throughput: our MAESIL vs MONAI's MaskedAutoEncoderViT at the same configuration.

For each model, in one run: training steps/s and volumes/s (forward, masked-MSE loss,
backward and an AdamW step), peak memory, parameters, FLOPs per step (analytic for ours,
measured with ``torch.utils.flop_counter`` for both), and on CUDA the bf16 matmul peak of
this GPU and the utilisation (achieved FLOP/s / peak). bf16 autocast on CUDA when supported,
fp32 on CPU.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU each model is measured in its
own spawned process and the figure is that process's peak RSS (``ru_maxrss``) minus its RSS
after the imports, i.e. model + optimiser state + activations.

    python benchmarks/pretrain_throughput.py --preset tiny --device cpu --steps 10 --out bench.json

Timing: both models are built in one process and timed in interleaved rounds of ``--steps``
steps (after ``--warmup`` steps); the median round counts.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from maesil_core.config import ModelConfig, preset  # noqa: E402
from maesil_core.models.maesil import MAESIL  # noqa: E402

# --------------------------------------------------------------------------- models


def monai_config(cfg: ModelConfig) -> dict:
    """MaskedAutoEncoderViT arguments matching ``cfg`` (qkv bias on, as in our blocks).

    MONAI's 3D sin-cos embedding needs a width divisible by 6; where it is not (decoder 64 in
    tiny, 512 in base) MONAI gets a learnable decoder embedding instead: same compute.
    """
    return dict(
        in_channels=cfg.in_channels,
        img_size=cfg.superpatch,
        patch_size=cfg.patch,
        hidden_size=cfg.embed_dim,
        mlp_dim=int(cfg.mlp_ratio * cfg.embed_dim),
        num_layers=cfg.depth,
        num_heads=cfg.num_heads,
        masking_ratio=cfg.mask_ratio,
        decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_mlp_dim=int(cfg.mlp_ratio * cfg.decoder_embed_dim),
        decoder_num_layers=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        qkv_bias=True,
        pos_embed_type="sincos" if cfg.embed_dim % 6 == 0 else "learnable",
        decoder_pos_embed_type="sincos" if cfg.decoder_embed_dim % 6 == 0 else "learnable",
    )


class MonaiMAE(torch.nn.Module):
    """MONAI's model plus the masked MSE we compute for ours (it returns only (pred, mask))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        self.net = MaskedAutoEncoderViT(**monai_config(cfg))
        self.patchify = MAESIL.patchify.__get__(self)  # same (B, L, P) layout: C order over grid
        self.grid, self.patch = cfg.grid, cfg.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred, mask = self.net(x)  # (B, L, P), (B, L) int, 1 = masked
        per_patch = (pred.float() - self.patchify(x)).pow(2).mean(-1)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum()


class OurMAE(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = MAESIL(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).loss


BUILDERS = {"maesil (ours)": OurMAE, "monai MaskedAutoEncoderViT": MonaiMAE}

# --------------------------------------------------------------------------- FLOPs


def analytic_flops(cfg: ModelConfig, batch: int) -> float:
    """Matmul FLOPs of one training step of MAESIL: 3 x forward (backward ~ 2 x forward)."""

    def block(n: int, d: int) -> float:
        m = int(cfg.mlp_ratio * d)
        return 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d  # qkv+proj, mlp, QK^T and AV

    L = cfg.num_patches
    n_keep = L - round(cfg.mask_ratio * L)
    p_in = math.prod(cfg.patch) * cfg.in_channels
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    fwd = 2 * L * p_in * d  # patch embed on all patches
    fwd += cfg.depth * block(n_keep, d)  # encoder on visible tokens
    fwd += 2 * n_keep * d * dd  # decoder embed
    fwd += cfg.decoder_depth * block(L, dd)  # decoder on all tokens
    fwd += 2 * L * dd * p_in  # prediction head
    return 3.0 * batch * fwd


def measured_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of forward + backward counted by FlopCounterMode (SDPA forced to its math path,
    whose matmuls the counter sees on every device)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(
    device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 50
) -> float:
    """Achievable dense matmul FLOP/s on this GPU, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - t)


# --------------------------------------------------------------------------- measurement


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class Trainer:
    """One model, its AdamW, a fixed random batch and one ``step()`` = fwd + loss + bwd + update."""

    def __init__(self, name: str, preset_name: str, device: str, batch: int):
        torch.manual_seed(0)
        self.dev = torch.device(device)
        self.cfg = preset(preset_name).model
        self.cfg.validate()
        self.name, self.batch = name, batch
        self.cuda = self.dev.type == "cuda"
        self.bf16 = self.cuda and torch.cuda.is_bf16_supported()
        self.model = BUILDERS[name](self.cfg).to(self.dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.x = torch.rand(batch, self.cfg.in_channels, *self.cfg.superpatch, device=self.dev)

    def step(self) -> None:
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(self.x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def seconds(self, steps: int) -> float:
        self.sync()
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return time.perf_counter() - t


def static_figures(name: str, preset_name: str, device: str, batch: int, warmup: int) -> dict:
    """Parameters, FLOPs per step and peak training memory of one model (fresh start)."""
    base_rss = rss_bytes()
    tr = Trainer(name, preset_name, device, batch)
    if tr.cuda:
        torch.cuda.reset_peak_memory_stats(tr.dev)
    for _ in range(max(2, warmup)):
        tr.step()
    tr.sync()
    if tr.cuda:
        peak_mem = torch.cuda.max_memory_allocated(tr.dev)
    else:  # ru_maxrss is in KiB on Linux
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    try:
        flops = measured_flops(tr.model, tr.x)
    except Exception as exc:  # noqa: BLE001 - report, don't fail the benchmark
        print(f"flop counter failed for {name}: {exc}", file=sys.stderr)
        flops = float("nan")
    return {
        "model": name,
        "params": sum(p.numel() for p in tr.model.parameters()),
        "peak_mem_bytes": peak_mem,
        "flops_per_step_measured": flops,
        "flops_per_step_analytic": analytic_flops(tr.cfg, batch)
        if name.startswith("maesil")
        else None,
        "precision": "bf16 autocast" if tr.bf16 else "fp32",
    }


def _static_in_child(args: tuple) -> dict:
    torch.set_num_threads(args[-1])
    return static_figures(*args[:-1])


def interleaved_speed(names, preset_name, device, batch, steps, warmup, rounds) -> dict:
    """steps/s of each model: ``rounds`` interleaved rounds of ``steps`` steps, median round.

    Interleaving keeps a busy machine from favouring whichever model ran first.
    """
    trainers = [Trainer(n, preset_name, device, batch) for n in names]
    for tr in trainers:
        for _ in range(warmup):
            tr.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for tr in trainers:
            times[tr.name].append(tr.seconds(steps))
    return {n: steps / statistics.median(t) for n, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "small", "base", "mim-med3d"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    run = preset(args.preset)
    batch = args.batch_size or run.train.batch_size
    dev = torch.device(args.device)
    cfg = run.model
    print(
        f"preset {args.preset}: superpatch {cfg.superpatch}, patch {cfg.patch}, "
        f"{cfg.num_patches} tokens, encoder {cfg.embed_dim}x{cfg.depth}, "
        f"decoder {cfg.decoder_embed_dim}x{cfg.decoder_depth}, batch {batch}, device {dev}"
    )

    results = []
    for name in BUILDERS:
        job = (name, args.preset, args.device, batch, args.warmup)
        if dev.type == "cpu":  # one fresh process per model so the peak RSS is its own
            with mp.get_context("spawn").Pool(1) as pool:
                results.append(pool.apply(_static_in_child, (job + (torch.get_num_threads(),),)))
        else:
            results.append(static_figures(*job))
            torch.cuda.empty_cache()
    speed = interleaved_speed(
        list(BUILDERS), args.preset, args.device, batch, args.steps, args.warmup, args.rounds
    )
    for r in results:
        r["steps_per_s"] = speed[r["model"]]
        r["volumes_per_s"] = speed[r["model"]] * batch

    peak = matmul_peak(dev) if dev.type == "cuda" else None
    for r in results:
        r["matmul_peak_flops"] = peak
        r["utilisation"] = r["flops_per_step_measured"] * r["steps_per_s"] / peak if peak else None

    mem_kind = "CUDA max allocated" if dev.type == "cuda" else "peak RSS delta"
    lines = [
        f"| model | params (M) | steps/s | volumes/s | {mem_kind} (MiB) | GFLOP/step measured "
        "| GFLOP/step analytic | GFLOP/s achieved | utilisation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gflops = r["flops_per_step_measured"] * r["steps_per_s"] / 1e9
        analytic = r["flops_per_step_analytic"]
        util = r["utilisation"]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['steps_per_s']:.2f} "
            f"| {r['volumes_per_s']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} "
            f"| {r['flops_per_step_measured'] / 1e9:.4g} "
            f"| {'' if analytic is None else f'{analytic / 1e9:.4g}'} | {gflops:.4g} "
            f"| {'n/a (CPU)' if util is None else f'{100 * util:.1f}%'} |"
        )
    ours, theirs = results
    speedup = ours["steps_per_s"] / theirs["steps_per_s"]
    lines.append("")
    lines.append(f"speed-up (ours / MONAI): {speedup:.2f}x; precision {ours['precision']}")
    if peak:
        lines.append(f"bf16 matmul peak measured in this run: {peak / 1e12:.0f} TFLOP/s")
    print("\n".join(lines))

    if args.out:
        meta = {
            "preset": args.preset,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor(),
            "threads": torch.get_num_threads(),
            "batch_size": batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "timing": "median of interleaved rounds of --steps steps",
            "torch": torch.__version__,
            "memory": mem_kind,
            "speedup": speedup,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
