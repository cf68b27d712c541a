"""The one training loop: pretraining and fine-tuning, CLI, Python API and napari widgets.

It owns the optimisation machinery (AdamW, warm-up + cosine, bf16 autocast, clipping,
accumulation, DDP), the bookkeeping (CSV + TensorBoard logs, ``loss.png``, checkpoints every
N steps / minutes, at the end and on cancel, ``--resume``) and the user contract (a
``progress`` callback receiving plain dicts, and a ``cancel`` flag checked after each step).
What a step computes is the task's business: ``loss_fn(model, batch) -> (loss, logs)``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
)
from ..config import RunConfig, TrainConfig
from ..errors import CheckpointError
from ..files import atomic_write, atomic_write_text
from ..progress import CancelFlag, ProgressFn, cancel_fn
from ..resume_state import load_resume_state
from ..threads import torch_threads
from . import distributed as D
from .seeding import resume_rng, rng_state, seed_everything

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    """What a finished (or cancelled) run leaves behind."""

    run_dir: Path
    checkpoint: Path | None
    step: int
    cancelled: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None


def pretrain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Loss of a pretraining model on ``batch["image"]`` (B, C, D, H, W), leaving out the
    padding marked by ``batch["valid"]`` (B, 1, D, H, W) when the batch has it."""
    valid = batch.get("valid")
    out = model(batch["image"]) if valid is None else model(batch["image"], valid=valid)
    return out.loss, dict(out.logs)


def has_trained_buffers(model: nn.Module) -> bool:
    """True when the model has persistent buffers, which training may change (VQ-VAE's EMA
    codebook); non-persistent ones (position embeddings) are constants derived from the
    config."""
    saved = set(model.state_dict())
    return any(name in saved for name, _ in model.named_buffers())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.min_lr`` at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms, embeddings and tokens; fused on CUDA.

    A model may carry ``param_lr_scale`` ({parameter name: factor}, e.g. layer-wise lr
    decay when fine-tuning); each group then keeps an ``lr_scale`` applied to the schedule.
    """
    scales = getattr(model, "param_lr_scale", None) or {}
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith("token") or "pos_embed" in name
        buckets.setdefault((no_wd, float(scales.get(name, 1.0))), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_wd else cfg.weight_decay,
            "lr_scale": scale,
        }
        for (no_wd, scale), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it (``auto``) or when asked; None means fp32."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if cfg.precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    return None


class MetricsLog:
    """``metrics.csv`` (always) and TensorBoard (when installed), written on rank 0."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                self.rows = [
                    {k: float(v) for k, v in r.items() if v not in ("", None)}
                    for r in csv.DictReader(f)
                ]
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV only
            self._tb = None

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(row["step"]))

    def flush(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        lines = [",".join(keys)]
        lines += [",".join(_fmt(r.get(k)) for k in keys) for r in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        if self._tb is not None:
            self._tb.flush()
        plot_loss(self.rows, self.path.parent / "loss.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"


def plot_loss(rows: list[dict[str, float]], path: Path) -> None:
    """Loss curve (log scale) of a run, written atomically as PNG."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _with_torch_threads(fn):
    """Run ``fit`` with ``cfg.train.threads`` torch threads on the CPU (0: auto, one per free
    core, :mod:`maesil_core.threads`), say how many in a ``prepare`` progress message, then
    restore them: an in-process caller (napari) keeps its own setting."""

    @functools.wraps(fn)
    def wrapper(model, batches, cfg, *args, **kwargs):
        device = kwargs.get("device") or D.select_device(cfg.train.device)
        with torch_threads(cfg.train.threads, device) as choice:
            progress = kwargs.get("progress")
            if choice is not None and progress is not None and not D.launched_by_torchrun():
                progress({"phase": "prepare", "message": f"computing with {choice.describe()}"})
            return fn(model, batches, cfg, *args, **kwargs)

    return wrapper


@_with_torch_threads
def fit(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    loss_fn: LossFn = pretrain_loss,
    kind: str = "pretrain",
    extra_meta: dict[str, Any] | None = None,
    evaluate: EvalFn | None = None,
    eval_every: int | None = None,
    best_metric: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> FitResult:
    """Train ``model`` on ``batches`` (an endless iterator of dicts of CPU tensors).

    progress receives ``{"step", "steps", "loss", "lr", "volumes_per_s", "elapsed_s",
    "eta_s", "phase", ...logs}`` every ``log_every`` steps and at checkpoints / the end.
    ``evaluate(model) -> {"val_...": value}`` runs every ``eval_every`` steps on rank 0;
    with ``best_metric`` the best-scoring weights are kept as ``best.safetensors``.
    """
    tc = cfg.train
    run_dir = Path(run_dir)
    is_cancelled = cancel_fn(cancel)
    device = device or D.select_device(tc.device)
    dist_info = D.init_distributed(device)
    main = dist_info.is_main

    # ---- resume: weights, optimiser, RNG, step
    start_step = 0
    resume_state = None
    model = model.to(device)
    optimizer = make_optimizer(model, tc, device)
    if resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(
                f"--resume: {run_dir} has no checkpoint to resume from; start without --resume."
            )
        last = load_checkpoint(found[-1])
        load_weights(model, last.state_dict, str(last.path))
        resume_state = load_resume_state(last.path)
        start_step = last.step  # from the metadata, not the file name
        if resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
        saved_rng = resume_state.get("rng") if resume_state is not None else None
        resume_rng(saved_rng, tc.seed, dist_info.rank, dist_info.world_size, start_step)
    else:
        seed_everything(tc.seed + dist_info.rank)

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # constant buffers (position embeddings) need no broadcast before every forward;
            # a model whose training changes its buffers (VQ-VAE's EMA codebook) keeps it
            broadcast_buffers=has_trained_buffers(model),
        )
    if tc.compile:
        train_model = torch.compile(train_model)
    amp_dtype = autocast_dtype(tc, device)

    log = MetricsLog(run_dir, start_step if resume else None) if main else None
    if main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    def emit(info: dict[str, Any]) -> None:
        if progress is not None and main:
            progress(info)

    def checkpoint(step: int, metrics: dict[str, float]) -> Path | None:
        path = None
        if main:
            path = save_checkpoint(
                run_dir,
                model,
                cfg,
                step,
                kind=kind,
                optimizer=optimizer,
                extra=extra_meta,
                metrics=metrics,
                rng=rng_state(),
            )
            prune_checkpoints(run_dir, tc.keep_checkpoints)
            log.flush()
        D.barrier()
        return path

    step = start_step
    last_ckpt: Path | None = list_checkpoints(run_dir)[-1] if resume else None
    best_value: float | None = None
    best_path: Path | None = None
    if resume and best_metric:  # a resumed run keeps its best so far unless it beats it
        best_value, best_path = _read_best(run_dir, best_metric)
    volumes_per_step = tc.batch_size * tc.accum_steps * dist_info.world_size
    t_start = time.perf_counter()
    t_last_ckpt = t_start
    t_window, window_steps, loss_sum, loss_n = t_start, 0, 0.0, 0
    cancelled = False
    last_row: dict[str, float] = {}
    model.train()

    def record(step: int, lr: float, now: float, logs: dict[str, float]) -> dict[str, float]:
        """Log one row (mean loss since the last row) and report progress."""
        nonlocal best_value, best_path
        elapsed = now - t_window
        mean_loss = D.mean_across_ranks(float(loss_sum) / max(1, loss_n), device)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the loss became {mean_loss} by step {step}; lower the learning rate "
                f"(now {tc.lr:g}) or check the input intensities."
            )
        vps = volumes_per_step * window_steps / max(elapsed, 1e-9)
        last_row = {
            "step": step,
            "loss": mean_loss,
            "lr": lr,
            "volumes_per_s": vps,
            "elapsed_s": now - t_start,
            **{k: float(v) for k, v in logs.items()},
        }
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == tc.steps):
            model.eval()
            with torch.no_grad():
                last_row.update(evaluate(model) if main else {})
            model.train()
            if (
                best_metric
                and main
                and best_metric in last_row
                and (best_value is None or last_row[best_metric] > best_value)
            ):
                best_value = last_row[best_metric]
                best_path = _save_best(run_dir, model, cfg, step, kind, extra_meta, last_row)
        if main:
            log.add(last_row)
        remaining = (tc.steps - step) / max(window_steps / max(elapsed, 1e-9), 1e-9)
        emit({**last_row, "steps": tc.steps, "eta_s": remaining, "phase": "train"})
        return last_row

    while step < tc.steps:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        logs: dict[str, float] = {}
        for micro in range(tc.accum_steps):
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in next(batches).items()
            }
            sync = micro == tc.accum_steps - 1 or not dist_info.enabled
            ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
            with (
                ctx,
                torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ),
            ):
                loss, logs = loss_fn(train_model, batch)
                (loss / tc.accum_steps).backward()
            loss_sum = loss_sum + loss.detach().float()  # stays on the device: no sync per step
            loss_n += 1
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            logs = {**logs, "grad_norm": grad_norm.detach()}  # read at log time only
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        now = time.perf_counter()
        ckpt_due = step % tc.checkpoint_every == 0 or (
            tc.checkpoint_minutes > 0 and now - t_last_ckpt > 60 * tc.checkpoint_minutes
        )
        ckpt_due = D.any_rank(ckpt_due, device)
        logged = False
        if step % tc.log_every == 0 or step == tc.steps or ckpt_due:
            last_row = record(step, lr, now, logs)
            t_window, window_steps, loss_sum, loss_n = now, 0, 0.0, 0
            logged = True
        # checked after the progress report, so a cancel asked for in a callback stops here
        stop = D.any_rank(is_cancelled(), device)
        if stop and not logged:
            last_row = record(step, lr, now, logs)
        if stop:
            cancelled = True
            break
        if ckpt_due and step < tc.steps:
            last_ckpt = checkpoint(step, last_row)
            t_last_ckpt = time.perf_counter()
            emit(
                {**last_row, "steps": tc.steps, "phase": "checkpoint", "checkpoint": str(last_ckpt)}
            )

    if step > start_step or last_ckpt is None:
        last_ckpt = checkpoint(step, last_row)
    if main:
        log.close()
    emit(
        {
            **last_row,
            "step": step,
            "steps": tc.steps,
            "phase": "cancelled" if cancelled else "done",
            "checkpoint": str(last_ckpt),
        }
    )
    history = list(log.rows) if log is not None else []
    return FitResult(run_dir, last_ckpt, step, cancelled, history, best_path)


def _read_best(run_dir: Path, metric: str) -> tuple[float | None, Path | None]:
    """The score and path of ``RUN_DIR/best.safetensors`` left by the run before a resume."""
    from ..checkpoint import read_meta

    best = run_dir / "best.safetensors"
    if not (best.is_file() and best.with_suffix(".json").is_file()):
        return None, None
    value = read_meta(best).metrics.get(metric)
    return (float(value), best) if value is not None else (None, None)


def _save_best(run_dir, model, cfg, step, kind, extra, metrics) -> Path:
    """Keep the best weights so far as ``RUN_DIR/best.safetensors`` (+ .json)."""
    import shutil

    tmp_dir = run_dir / ".best"
    path = save_checkpoint(tmp_dir, model, cfg, step, kind=kind, extra=extra, metrics=metrics)
    best = run_dir / "best.safetensors"
    shutil.move(str(path), best)
    shutil.move(str(path.with_suffix(".json")), best.with_suffix(".json"))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return best
