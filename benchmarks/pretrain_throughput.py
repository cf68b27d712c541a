"""Pretraining throughput: our MAESIL vs MONAI's MaskedAutoEncoderViT, and the real fed step.

For each case (model x per-device batch x decoder heads), in one process:

- **synthetic step**: forward, masked-MSE loss, backward, gradient clipping and the AdamW
  step of ``train.loop.fit`` (its optimiser: fused on CUDA; bf16 autocast where fit would
  use it) on a fixed random batch already on the device. Cases are timed in interleaved
  rounds of ``--steps`` steps after ``--warmup`` steps; the median round counts.
- **FLOPs per step**: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
  forward + backward with the attention kernel the dispatcher picks (flash / efficient /
  cuDNN on CUDA, the CPU flash kernel on CPU: formulas registered here for the CPU ops the
  counter does not know), and, for ours, analytic (3 x the forward matmuls). The counter's
  figure is a little higher than the model's: a flash backward recomputes QK^T.
- **utilisation** = model FLOPs per second / a peak, against both the matmul peak measured
  in this run (8192^3 bf16 on CUDA; on CPU 2048^3 in the step's dtype with this run's
  threads) and the card's specification (dense bf16, vendor datasheet; ``--spec-tflops``).
- **SDPA backend**: the attention operator the counter saw (which kernel actually ran).
- **memory**: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before;
  on CPU (``--memory``) each case in its own spawned process: peak RSS minus the RSS after
  the imports (model + optimiser state + activations).
- **fed step** (``--fed-steps N``): ``api.pretrain`` itself, i.e. ``maesil pretrain``'s
  loader (``--data``, its workers, its augmentation) feeding ``train.loop.fit``, for
  ``--fed-warmup`` + N steps; steps/s from fit's own log rows after the warm-up, beside the
  synthetic step of the same configuration. ``fed / synthetic`` < 1 is time lost to data.

The ``tiny`` and ``cpu`` presets turn MAESIL's decoder options on (an interpolation prior,
neighbour mixing), which MONAI's MAE does not have: their rows print no ours / MONAI ratio
and no analytic FLOPs; compare with MONAI at ``smoke``, ``small`` or ``base``.

    python benchmarks/pretrain_throughput.py --preset smoke --device cpu --steps 10 --out bench.json
    python benchmarks/pretrain_throughput.py --preset base --device cuda --batch-size 2 8 \\
        --decoder-heads 16 8 --models ours --fed-steps 40 --out base_sweep.json
    python benchmarks/pretrain_throughput.py --preset tiny --device cpu --models ours \\
        --batch-size 8 32 --extra '' '{"decoder_refine": 8}' --threads 1 --memory no
        # model options as cases (--extra: JSON merged into the preset's options)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ct import PRETRAIN_DATA  # noqa: E402
from maesil_core.config import PRESETS, ModelConfig, RunConfig, preset  # noqa: E402
from maesil_core.models import build_model  # noqa: E402
from maesil_core.train.loop import make_optimizer, pretrain_loss  # noqa: E402

#: dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' datasheets, matched
#: against ``torch.cuda.get_device_name`` in this order
SPEC_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX 4090", 165.2),
    ("A6000", 154.8),
    ("V100", 0.0),  # no bf16 tensor cores
]

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


def patchify(x: torch.Tensor, grid, patch) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, L, P), our layout (C order over the grid, (pd, ph, pw, C))."""
    b, c = x.shape[:2]
    (gd, gh, gw), (pd, ph, pw) = grid, patch
    x = x.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, gd * gh * gw, pd * ph * pw * c)


LossOut = namedtuple("LossOut", "loss logs")  #: what pretrain_loss reads from a model


class MonaiMAE(torch.nn.Module):
    """MONAI's model plus the masked MSE we compute for ours (it returns only (pred, mask))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        self.net = MaskedAutoEncoderViT(**monai_config(cfg))
        self.grid, self.patch = cfg.grid, cfg.patch

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None):
        pred, mask = self.net(x)  # (B, L, P), (B, L) int, 1 = masked
        per_patch = (pred.float() - patchify(x, self.grid, self.patch)).pow(2).mean(-1)
        m = mask.to(per_patch.dtype)
        return LossOut((per_patch * m).sum() / m.sum(), {})


MODELS = {"ours": "maesil (ours)", "monai": "monai MaskedAutoEncoderViT"}

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


def plain_decoder(cfg: ModelConfig) -> bool:
    """True when no decoder option is on (the preset's own, as tiny's and cpu's, or a case's
    --extra): the network is the plain ViT MAE that the analytic count and MONAI describe."""
    return cfg.options == type(cfg.options)()


def attention_share(cfg: ModelConfig) -> dict:
    """Share of the analytic step FLOPs in decoder attention (QK^T and AV) and in the decoder."""
    L = cfg.num_patches
    dd = cfg.decoder_embed_dim
    total = analytic_flops(cfg, 1)
    dec_attn = 3.0 * cfg.decoder_depth * 4 * L * L * dd
    m = int(cfg.mlp_ratio * dd)
    dec = 3.0 * cfg.decoder_depth * (2 * L * (4 * dd * dd + 2 * dd * m) + 4 * L * L * dd)
    return {"decoder_attention": dec_attn / total, "decoder": dec / total}


def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode formulas for the CPU flash-attention ops (it counts only the CUDA ones):
    the same counts as its formulas for the CUDA flash kernels."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    out = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            out[op] = formula
    return out


def counted_flops(step_fn) -> tuple[float, list[str]]:
    """FLOPs of ``step_fn()`` (forward + backward) with the attention kernels the dispatcher
    chooses, and the attention operators seen (the SDPA backend that actually ran)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())
    with counter:
        step_fn()
    ops = set()
    for per_module in counter.get_flop_counts().values():
        for op in per_module:
            name = str(op)
            if "attention" in name or "bmm" in name:
                ops.add(name.replace("aten.", ""))
    return float(counter.get_total_flops()), sorted(ops)


#: operators that only re-describe memory: they launch no kernel on a GPU
NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "permute", "detach", "expand", "unsqueeze",
    "squeeze", "as_strided", "select", "slice", "split", "split_with_sizes", "unbind",
    "alias", "reshape", "unflatten", "flatten", "lift_fresh", "_reshape_alias",
}  # fmt: skip


def count_ops(step_fn) -> tuple[int, int]:
    """(operators, kernel-launching operators) that one call of ``step_fn`` dispatches: what
    eager PyTorch issues one by one from Python, each costing a few microseconds of CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.total, self.kernels = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += 1
            self.kernels += func.__name__.split(".")[0] not in NO_KERNEL
            return func(*args, **(kwargs or {}))

    with Count() as c:
        step_fn()
    return c.total, c.kernels


def sdpa_backend(ops: list[str]) -> str:
    """A short name for the attention kernels the counter saw ("bmm" when none: explicit)."""
    names = {
        "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
        "_scaled_dot_product_flash_attention": "flash",
        "_scaled_dot_product_efficient_attention": "efficient",
        "_scaled_dot_product_cudnn_attention": "cuDNN",
        "_flash_attention_forward": "flash",
        "_efficient_attention_forward": "efficient",
    }
    seen = []
    for op in ops:
        base = op.split(".")[0]
        if base in names and names[base] not in seen:
            seen.append(names[base])
    return ", ".join(seen) or "explicit softmax (bmm)"


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s measured now: 8192^3 on CUDA, 2048^3 on CPU (this run's threads)."""
    n, iters = (8192, 30) if device.type == "cuda" else (2048, 5)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # never zeros: they run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - t)


def spec_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in FLOP/s and where the figure comes from."""
    if override:
        return override * 1e12, "--spec-tflops"
    if device.type != "cuda":
        return None, "no specification for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in SPEC_BF16_TFLOPS:
        if key in name:
            return (tflops * 1e12 if tflops else None), f"datasheet ({key})"
    return None, f"unknown card {name!r}: pass --spec-tflops"


# --------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Start the peak-RSS count (VmHWM) afresh (Linux >= 4.0; the imports' peak is forgotten)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def case_config(
    preset_name: str, batch: int, heads: int | None, precision: str, extra: str = ""
) -> RunConfig:
    """The preset with the case's batch, decoder heads, precision and model options: ``extra``
    a JSON object merged into the preset's (``'{"decoder_refine": 8}'``), "" = as it is."""
    run = preset(preset_name)
    run.train.batch_size = batch
    run.train.precision = precision
    if heads:
        run.model.decoder_num_heads = heads
    if extra:
        run.model.extra = {**run.model.extra, **json.loads(extra)}
    return run.validate()


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What fit runs under: bf16 autocast on CUDA with bf16 ("auto"), or when asked."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    """One model, fit's optimiser, a fixed random batch and ``step()`` = fit's training step."""

    def __init__(self, model_key, preset_name, device, batch, heads, precision, compile_, extra=""):
        torch.manual_seed(0)
        self.dev = torch.device(device)
        self.run = case_config(preset_name, batch, heads, precision, extra)
        self.cfg = self.run.model
        self.key, self.batch, self.compiled, self.extra = model_key, batch, compile_, extra
        self.heads = self.cfg.decoder_num_heads
        self.name = f"{MODELS[model_key]}, batch {batch}, decoder heads {self.heads}"
        self.name += ", compiled" if compile_ else ""
        self.name += f", {extra}" if extra else ""
        raw = (build_model(self.cfg) if model_key == "ours" else MonaiMAE(self.cfg)).to(self.dev)
        self.raw = raw.train()
        self.model = torch.compile(raw) if compile_ else raw
        self.opt = make_optimizer(raw, self.run.train, self.dev)
        self.amp = amp_dtype(precision, self.dev)
        x = torch.rand(batch, self.cfg.in_channels, *self.cfg.superpatch, device=self.dev)
        self.batch_data = {"image": x}

    def forward_backward(self, eager: bool = False) -> torch.Tensor:
        model = self.raw if eager else self.model
        with torch.autocast(self.dev.type, dtype=self.amp or torch.float32, enabled=bool(self.amp)):
            loss, _ = pretrain_loss(model, self.batch_data)
        loss.backward()
        return loss

    def step(self) -> None:
        self.forward_backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.run.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def seconds(self, steps: int) -> float:
        sync(self.dev)
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.dev)
        return time.perf_counter() - t


def static_figures(tr: Trainer, warmup: int, measure_memory: bool) -> dict:
    """Parameters, FLOPs per step (counted + analytic), SDPA backend, peak memory (CUDA)."""
    out = {
        "model": MODELS[tr.key] + (f" {tr.extra}" if tr.extra else ""),
        "key": tr.key,
        "extra": tr.extra,
        "batch": tr.batch,
        "decoder_heads": tr.heads,
        "decoder_head_dim": tr.cfg.decoder_embed_dim // tr.heads,
        "compiled": tr.compiled,
        "params": sum(p.numel() for p in tr.raw.parameters()),
        "precision": "bf16 autocast" if tr.amp else "fp32",
    }
    t = time.perf_counter()  # the first step: with --compile, the compilation
    tr.step()
    sync(tr.dev)
    out["first_step_s"] = time.perf_counter() - t
    if tr.dev.type == "cuda" and measure_memory:
        sync(tr.dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(tr.dev)
        torch.cuda.reset_peak_memory_stats(tr.dev)
        for _ in range(max(2, warmup)):
            tr.step()
        sync(tr.dev)
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(tr.dev) - before
        out["memory"] = "CUDA max allocated above the state before the steps"
    if not tr.compiled:  # what the CPU issues per step: fit's step, operator by operator
        out["ops_per_step"], out["kernel_ops_per_step"] = count_ops(tr.step)
    try:
        flops, ops = counted_flops(lambda: tr.forward_backward(eager=True))
    except Exception as exc:  # noqa: BLE001 - report, don't fail the benchmark
        print(f"flop counter failed for {tr.name}: {exc}", file=sys.stderr)
        flops, ops = float("nan"), []
    tr.raw.zero_grad(set_to_none=True)
    out["flops_per_step_counted"] = flops
    out["attention_ops"] = ops
    # the analytic count knows the plain ViT only
    ours_plain = tr.key == "ours" and plain_decoder(tr.cfg)
    out["flops_per_step_analytic"] = analytic_flops(tr.cfg, tr.batch) if ours_plain else None
    out["like_monai"] = ours_plain or tr.key == "monai"  # same network as MONAI's, or MONAI's
    return out


def _cpu_memory_child(args: tuple) -> int:
    """Peak RSS above the post-import RSS of a few steps of one case, in a fresh process."""
    threads, case, preset_name, precision, compile_, extra = args
    torch.set_num_threads(threads)
    reset_peak_rss()
    base = rss_bytes()
    tr = Trainer(case[0], preset_name, "cpu", case[1], case[2], precision, compile_, extra)
    for _ in range(2):
        tr.step()
    return peak_rss_bytes() - base


def fed_rate(args, run: RunConfig, data: list[str], device: torch.device) -> dict:
    """Steps/s of ``api.pretrain`` (the real loader feeding the real fit) after a warm-up,
    from fit's own log rows (no extra synchronisation per step)."""
    from maesil_core import api

    cfg = RunConfig.from_dict(run.to_dict())
    log_every = max(1, min(10, args.fed_steps // 4))
    warm = max(log_every, math.ceil(args.fed_warmup / log_every) * log_every)
    cfg.train.steps = warm + math.ceil(args.fed_steps / log_every) * log_every
    cfg.train.log_every = log_every
    cfg.train.checkpoint_every = 10**9
    cfg.train.checkpoint_minutes = 0.0
    cfg.train.device = str(device)
    cfg.train.compile = args.compile == ["yes"]
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    rows: list[tuple[float, int]] = []

    def progress(info: dict) -> None:
        if info.get("phase") == "train":
            rows.append((time.perf_counter(), int(info["step"])))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maesil-fed-") as tmp:
        api.pretrain(data, Path(tmp) / "run", cfg, progress=progress)
    after = [(t, s) for t, s in rows if s >= warm]
    (t_a, s_a), (t_b, s_b) = after[0], after[-1]
    return {
        "fed_steps_per_s": (s_b - s_a) / (t_b - t_a),
        "fed_steps_timed": s_b - s_a,
        "fed_warmup_steps": warm,
        "fed_first_row_s": rows[0][0] - t0 if rows else None,
        "fed_workers": cfg.data.num_workers,
        "fed_augment": cfg.data.augment,
        "fed_cache": cfg.data.cache,
    }


def fmt(x, spec: str, scale: float = 1.0) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x / scale, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["ours", "monai"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=None, help="default: the preset's")
    ap.add_argument(
        "--decoder-heads", type=int, nargs="+", default=None, help="default: the preset's"
    )
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast on CUDA with bf16, fp32 elsewhere (what fit does)",
    )
    ap.add_argument(
        "--compile",
        nargs="+",
        choices=["no", "yes"],
        default=["no"],
        help="torch.compile the model (yes), as TrainConfig.compile does; both: compared",
    )
    ap.add_argument(
        "--extra",
        nargs="+",
        default=[""],
        metavar="JSON",
        help="model options per case, merged into the preset's (ours only), e.g. "
        "'' '{\"decoder_refine\": 8}': one case each; default: the preset's",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    ap.add_argument(
        "--memory",
        choices=["yes", "no"],
        default="yes",
        help="peak memory per case (CPU: one spawned process per case)",
    )
    ap.add_argument("--fed-steps", type=int, default=0, help="steps of api.pretrain (0: skip)")
    ap.add_argument("--fed-warmup", type=int, default=10, help="fed steps before timing")
    ap.add_argument("--data", nargs="+", default=[str(p) for p in PRETRAIN_DATA])
    ap.add_argument(
        "--workers", type=int, default=None, help="fed loader workers (default: config)"
    )
    ap.add_argument("--spec-tflops", type=float, default=None, help="the card's dense bf16 peak")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    run = preset(args.preset)
    batches = args.batch_size or [run.train.batch_size]
    heads = args.decoder_heads or [run.model.decoder_num_heads]
    cfg = run.model
    print(
        f"preset {args.preset}: superpatch {cfg.superpatch}, patch {cfg.patch}, "
        f"{cfg.num_patches} tokens, encoder {cfg.embed_dim}x{cfg.depth}, decoder "
        f"{cfg.decoder_embed_dim}x{cfg.decoder_depth}, batches {batches}, decoder heads {heads}, "
        f"device {dev}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    cases = [
        (m, b, h, c == "yes", e)
        for m in args.models
        for b in batches
        for h in heads
        for c in args.compile
        for e in (args.extra if m == "ours" else [""])
    ]
    trainers = [
        Trainer(m, args.preset, args.device, b, h, args.precision, c, e) for m, b, h, c, e in cases
    ]
    results = []
    for tr in trainers:
        results.append(static_figures(tr, args.warmup, args.memory == "yes"))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cpu" and args.memory == "yes":  # a fresh process per case: its own peak
        for r, case in zip(results, cases):
            job = (torch.get_num_threads(), case[:3], args.preset, args.precision, *case[3:])
            with mp.get_context("spawn").Pool(1) as pool:
                r["peak_mem_bytes"] = pool.apply(_cpu_memory_child, (job,))
            r["memory"] = "peak RSS above the RSS after imports (own process)"

    # ---- interleaved timing: a busy machine cannot favour whichever case runs first
    for tr in trainers:
        for _ in range(args.warmup):
            tr.step()
    times: dict[str, list[float]] = {tr.name: [] for tr in trainers}
    for _ in range(args.rounds):
        for tr in trainers:
            times[tr.name].append(tr.seconds(args.steps))
    for r, tr in zip(results, trainers):
        r["steps_per_s"] = args.steps / statistics.median(times[tr.name])
        r["steps_per_s_rounds"] = [args.steps / t for t in times[tr.name]]
        r["volumes_per_s"] = r["steps_per_s"] * tr.batch

    step_dtype = trainers[0].amp or torch.float32
    del trainers
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    peak = matmul_peak(dev, torch.bfloat16 if dev.type == "cuda" else step_dtype)
    spec, spec_src = spec_peak(dev, args.spec_tflops)
    for r in results:
        model_flops = r["flops_per_step_analytic"] or r["flops_per_step_counted"]
        achieved = model_flops * r["steps_per_s"]
        r["model_flops_per_s"] = achieved
        r["util_vs_measured_peak"] = achieved / peak
        r["util_vs_spec"] = achieved / spec if spec else None

    fed = None
    if args.fed_steps > 0:
        fed_run = case_config(args.preset, batches[0], heads[0], args.precision)
        fed = fed_rate(args, fed_run, args.data, dev)
        ref = next(r for r in results if r["key"] == "ours" and r["batch"] == batches[0])
        ref_heads = ref["decoder_heads"]
        fed.update(
            batch=batches[0],
            decoder_heads=ref_heads,
            synthetic_steps_per_s=ref["steps_per_s"],
            fed_over_synthetic=fed["fed_steps_per_s"] / ref["steps_per_s"],
        )

    mem_kind = "CUDA max allocated" if dev.type == "cuda" else "peak RSS delta"
    peak_name = "bf16 matmul" if dev.type == "cuda" else f"{str(step_dtype)[6:]} matmul"
    lines = [
        f"| model | batch | decoder heads x dim | compiled | first step (s) | params (M) "
        f"| steps/s | volumes/s "
        f"| {mem_kind} (MiB) | GFLOP/step counted | GFLOP/step analytic | attention op "
        f"| util vs measured {peak_name} peak | util vs spec | ops (kernels) per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['decoder_heads']} x {r['decoder_head_dim']} "
            f"| {'yes' if r['compiled'] else 'no'} | {r['first_step_s']:.3g} "
            f"| {r['params'] / 1e6:.2f} | {r['steps_per_s']:.3g} | {r['volumes_per_s']:.3g} "
            f"| {fmt(r.get('peak_mem_bytes'), '.0f', 2**20)} "
            f"| {fmt(r['flops_per_step_counted'], '.4g', 1e9)} "
            f"| {fmt(r['flops_per_step_analytic'], '.4g', 1e9)} "
            f"| {sdpa_backend(r['attention_ops'])} "
            f"| {100 * r['util_vs_measured_peak']:.1f}% "
            f"| {fmt(r['util_vs_spec'] and 100 * r['util_vs_spec'], '.1f')}"
            f"{'%' if r['util_vs_spec'] else 'n/a'} "
            f"| {r.get('ops_per_step', '')} ({r.get('kernel_ops_per_step', '')}) |"
        )
    lines.append("")
    share = ""  # the analytic model is the plain ViT's: none for decoder options (tiny, cpu)
    if plain_decoder(cfg):
        share = (
            f"; analytic share of the step in decoder attention: "
            f"{100 * attention_share(cfg)['decoder_attention']:.0f}% "
            f"(decoder {100 * attention_share(cfg)['decoder']:.0f}%) at the preset's batch"
        )
    lines.append(
        f"measured {peak_name} peak: {peak / 1e12:.3g} TFLOP/s; spec: "
        f"{fmt(spec, '.0f', 1e12) or 'n/a'} ({spec_src}){share}"
    )
    for b in batches:
        for h in heads:
            pair = [
                r
                for r in results
                if r["batch"] == b
                and r["decoder_heads"] == h
                and not r["compiled"]
                and not r["extra"]
                and r.get("like_monai", True)
            ]
            if len(pair) == 2 and {r["key"] for r in pair} == {"ours", "monai"}:
                o, m = pair
                mem = ""
                if o.get("peak_mem_bytes") and m.get("peak_mem_bytes"):
                    mem = f" at {o['peak_mem_bytes'] / m['peak_mem_bytes']:.2f}x the memory"
                lines.append(
                    f"ours / MONAI at batch {b}, decoder heads {h}: "
                    f"{o['steps_per_s'] / m['steps_per_s']:.2f}x steps/s{mem}"
                )
    for r in results:
        eager = [
            e
            for e in results
            if not e["compiled"]
            and (e["key"], e["batch"], e["decoder_heads"])
            == (r["key"], r["batch"], r["decoder_heads"])
        ]
        if r["compiled"] and eager:
            lines.append(
                f"compiled / eager, {r['model']} batch {r['batch']}: "
                f"{r['steps_per_s'] / eager[0]['steps_per_s']:.2f}x steps/s; first step "
                f"{r['first_step_s']:.1f} s against {eager[0]['first_step_s']:.1f} s"
            )
    if fed:
        lines.append(
            f"fed (api.pretrain, {fed['fed_workers']} workers, augment {fed['fed_augment']}, "
            f"cache {fed['fed_cache']}): {fed['fed_steps_per_s']:.3g} steps/s against "
            f"{fed['synthetic_steps_per_s']:.3g} synthetic: fed / synthetic "
            f"{fed['fed_over_synthetic']:.2f}"
        )
    print("\n".join(lines), flush=True)

    if args.out:
        meta = {
            "preset": args.preset,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "compile": args.compile,
            "timing": "median of interleaved rounds of --steps steps",
            "torch": torch.__version__,
            "measured_peak_flops": peak,
            "measured_peak_kind": peak_name,
            "spec_peak_flops": spec,
            "spec_source": spec_src,
            "attention_share": attention_share(cfg),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results, "fed": fed}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
